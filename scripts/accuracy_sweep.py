#!/usr/bin/env python
"""Accuracy against memory: budgets from the int2 minimum to full precision.

At each budget: the best static width that fits, dynaexq with auto tiers (the plan picks the
fallback width, a share of experts at the next wider width, and the slots), dynaexq with
today's fixed tiers (int4 fallback, or the widest that fits below it, and bf16 slots), and
full as the reference. Runs that would compute
the same thing at several budgets (static at one width; dynaexq with the same tiers and slot
count) are evaluated once. Writes a Markdown table, and a PNG of perplexity against budget when
matplotlib is importable (the optional `bench` extra).

    python scripts/accuracy_sweep.py --dtype float32 --md sweep.md --plot docs/accuracy_sweep.png
    python scripts/accuracy_sweep.py --dtype float32 --to int4 --per-gap 3 --mc ''   # int2..int4, denser
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from dynaexq_jax.io import files
from dynaexq_jax.launch.flags import at_least_each, command_parser

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"
TASKS = DEFAULT_MODEL / "tasks"
FIXED_LO = 4  # today's fallback width


def parse_args(argv=None):
    p = command_parser(__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--ppl", default=str(TASKS / "heldout.jsonl"), help="perplexity task")
    p.add_argument("--mc", default=str(TASKS / "next_line_mc.jsonl"), help="multiple-choice task ('' to skip)")
    p.add_argument("--limit", type=int, help="first N items of each task")
    p.add_argument("--hotness", help="warm-start profile (default: the model's tasks/hotness_train.json if present, "
                                     "else the saved profile or --calibration)")
    p.add_argument("--calibration", help="calibration text (JSONL of {\"text\"} or a text file) for the profile")
    p.add_argument("--from-bits", type=int, choices=[2, 3, 4], default=2, help="lowest budget: this width's minimum")
    p.add_argument("--to", default="full", help="highest budget: 'full', or 'intN' (that width's minimum)")
    p.add_argument("--per-gap", type=int, default=1, help="budgets between each two width minima (and full)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--md", help="write the Markdown table here (a new file, or one this script wrote)")
    p.add_argument("--plot", help="write a PNG of perplexity against budget here (needs matplotlib; a new file, or "
                                  "one this script wrote)")
    p.add_argument("--json", dest="json_path", help="write every result here (a new file, or one this script wrote)")
    return p.parse_args(argv)


def check(args) -> None:
    """Every flag and output path, before the model is read."""
    at_least_each(args, limit=1, group_size=8, batch_size=1, window=2, max_length=2)
    for flag, path in (("--md", args.md), ("--plot", args.plot), ("--json", args.json_path)):
        if path:
            files.check_output_file(path, flag)


def budgets(cfg, args, plan_kw, itemsize) -> list[int]:
    """The minimum of each fallback width from --from-bits up to --to (and full's total when
    --to is full), with --per-gap budgets evenly spaced between each two: the points where the
    best static width changes, and between them, where slots must earn their bytes."""
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime.build import plan_for

    def minimum(bits):
        opts = DynaExqOptions(lo_bits=bits, group_size=args.group_size)
        return plan_for(cfg, "dynaexq", budget=None, dtype_itemsize=itemsize, opts=opts, **plan_kw).minimum

    if args.to != "full" and args.to not in ("int3", "int4", "int8"):
        raise UserError(f"--to {args.to!r}: give 'full' or int3/int4/int8")
    top = 16 if args.to == "full" else int(args.to[3:])
    anchors = [minimum(b) for b in (2, 3, 4, 8) if args.from_bits <= b <= top]
    if args.to == "full":
        anchors.append(plan_for(cfg, "full", budget=None, dtype_itemsize=itemsize,
                                opts=DynaExqOptions(group_size=args.group_size), **plan_kw).total)
    if len(anchors) < 2 or args.per_gap < 0:
        raise UserError(f"--to {args.to} must be above --from-bits int{args.from_bits}, and --per-gap >= 0")
    n = args.per_gap + 1
    return [a + (b - a) * i // n for a, b in zip(anchors, anchors[1:]) for i in range(n)] + [anchors[-1]]


def sweep(args) -> tuple[list[dict], dict]:
    import jax.numpy as jnp

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.eval import evaluate
    from dynaexq_jax.io import loader
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime.build import auto_tiers, plan_for

    check(args)
    tasks = [evaluate.load_task("ppl", args.ppl, what="--ppl")] + (
        [evaluate.load_task("mc", args.mc, what="--mc")] if args.mc else [])
    ckpt = loader.load(args.model, jnp.dtype(args.dtype))
    cfg, itemsize = ckpt.config, ckpt.dtype.itemsize
    if args.limit:
        tasks = [dataclasses.replace(t, items=t.items[: args.limit]) for t in tasks]
    longest = max([args.window] + ([args.max_length] if args.mc else []))
    plan_kw = dict(batch=args.batch_size, longest_prompt=longest, max_new_tokens=1)
    opts = DynaExqOptions(lo_bits="auto", hi_dtype="auto", group_size=args.group_size, save_profile=False)
    hotness = args.hotness or (str(Path(args.model) / "tasks" / "hotness_train.json")
                               if (Path(args.model) / "tasks" / "hotness_train.json").is_file() else None)
    calibration = evaluate.load_task("ppl", args.calibration, what="--calibration").items if args.calibration else None
    log = lambda s: print(s, file=sys.stderr, flush=True)
    profile = evaluate.warm_profile(ckpt, opts, hotness, calibration, window=args.window,
                                    batch_size=args.batch_size, log=log)
    ev_kw = dict(hotness_profile=profile, batch_size=args.batch_size, window=args.window,
                 max_length=args.max_length, max_new_tokens=1, log=log)

    done = {}
    # Dynaexq without slots or mixed fallback is static at its width: the same experts, the same numbers.
    key = lambda lo, hi, slots, mid=(): ("dynaexq", lo, hi, slots, mid) if slots or mid else ("static", lo)
    # A "bfloat16" slot holds the checkpoint's own weights in the compute dtype.
    hi_name = lambda hi: "int8" if hi == "int8" else {"bfloat16": "bf16", "float32": "f32"}[args.dtype]

    def run(spec, key):
        """Results of `spec` as {(task, metric): value}, once per distinct `key`."""
        if key not in done:
            res = evaluate.evaluate_runs(ckpt, [spec], tasks, opts=opts, **ev_kw)
            done[key] = {(r.task, r.metric): r.value for r in res}
        return done[key]

    full = run(evaluate.RunSpec("full", "none", FIXED_LO), ("full",))
    rows = []
    for b in budgets(cfg, args, plan_kw, itemsize):
        row = {"budget": b, "full": full}
        conc = lambda lo, hi: dataclasses.replace(opts, lo_bits=lo, hi_dtype=hi)
        static_bits = plan_for(cfg, "static", budget=b, dtype_itemsize=itemsize, opts=conc(FIXED_LO, "bfloat16"),
                               **plan_kw).lo_bits
        static = run(evaluate.RunSpec("static", str(b), static_bits), ("static", static_bits))
        row["static"] = (f"int{static_bits}", static)
        _, choice = auto_tiers(ckpt, opts, budget=b, hotness_profile=profile, **plan_kw)
        mid = f"/{len(choice.mid_experts)}xint{choice.mid_bits}" if choice.mid_experts else ""
        tiers = f"int{choice.lo_bits}{mid}" + (f"+{choice.slots}x{hi_name(choice.hi_dtype)}" if choice.slots else "")
        row["auto"] = (tiers, run(evaluate.RunSpec("dynaexq", str(b), choice.lo_bits, "auto"),
                                  key(choice.lo_bits, choice.hi_dtype, choice.slots, choice.mid_experts)))
        row["auto_expected"] = (choice.expected_error, choice.static_error)
        fixed_lo = min(FIXED_LO, static_bits)
        slots = plan_for(cfg, "dynaexq", budget=b, dtype_itemsize=itemsize, opts=conc(fixed_lo, "bfloat16"),
                         **plan_kw).slots
        row["fixed"] = (f"int{fixed_lo}" + (f"+{slots}x{hi_name('bfloat16')}" if slots else ""),
                        run(evaluate.RunSpec("dynaexq", str(b), fixed_lo, "fixed"),
                            key(fixed_lo, "bfloat16", slots)))
        log(f"{budget_lib.format_size(b)}: static {row['static'][0]}, auto {tiers}, fixed {row['fixed'][0]}")
        rows.append(row)
    return rows, {"tasks": [t.name for t in tasks], "ppl_task": tasks[0].name}


def table(rows, meta) -> str:
    """One row per budget: the tiers of each policy, perplexity, MC accuracy, and the share of
    the static -> full perplexity gap that auto tiers close."""
    from dynaexq_jax import budget as budget_lib

    ppl = (meta["ppl_task"], "ppl")
    mc = next(((t, "acc") for t in meta["tasks"][1:]), None)
    head = ["budget", "static", "ppl", "auto tiers", "ppl", "fixed tiers", "ppl", "full ppl"]
    if mc:
        head += ["mc acc static / auto / fixed / full"]
    head += ["auto closes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, a, f, full = r["static"][1][ppl], r["auto"][1][ppl], r["fixed"][1][ppl], r["full"][ppl]
        cells = [budget_lib.format_size(r["budget"]), r["static"][0], f"{s:.3f}", r["auto"][0], f"{a:.3f}",
                 r["fixed"][0], f"{f:.3f}", f"{full:.3f}"]
        if mc:
            cells.append(" / ".join(f"{x[mc]:.2f}" for x in (r["static"][1], r["auto"][1], r["fixed"][1], r["full"])))
        cells.append(f"{(s - a) / (s - full):.0%}" if s - full > 0.01 else "(gap < 0.01)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, meta, path: Path) -> bool:
    """Perplexity against budget in MB, one line per policy, static as a step function.
    False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ppl = (meta["ppl_task"], "ppl")
    mb = [r["budget"] / 1e6 for r in rows]
    full = rows[0]["full"][ppl]
    # Above: the whole range; below: the same near full precision, where int4 and wider differ.
    fig, axes = plt.subplots(2, 1, figsize=(7, 6.4), sharex=True)
    for ax in axes:
        ax.step(mb, [r["static"][1][ppl] for r in rows], where="post", label="best static that fits")
        ax.plot(mb, [r["fixed"][1][ppl] for r in rows], "s--", label="dynaexq, fixed tiers (int4 or narrower + slots)")
        ax.plot(mb, [r["auto"][1][ppl] for r in rows], "o-", label="dynaexq, auto tiers")
        ax.axhline(full, color="k", lw=0.8, ls=":", label="full")
        ax.set_ylabel(f"{meta['ppl_task']} perplexity")
    worst = max(r[k][1][ppl] for r in rows for k in ("static", "fixed", "auto") if r[k][1][ppl] < full + 0.1)
    axes[1].set_ylim(full - 0.01, worst + 0.01)
    axes[1].set_xlabel("memory budget (MB)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=files.png_metadata())
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.runtime import compile_cache

    compile_cache.enable()
    try:
        rows, meta = sweep(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = table(rows, meta)
    print(text)
    if args.md:
        files.write_markdown(Path(args.md), text + "\n")
    if args.json_path:
        flat = [{"budget": r["budget"], "static": r["static"][0], "auto": r["auto"][0], "fixed": r["fixed"][0],
                 "auto_expected_error": r["auto_expected"][0], "static_expected_error": r["auto_expected"][1],
                 **{f"{k} {t} {m}": v for k in ("static", "auto", "fixed") for (t, m), v in r[k][1].items()},
                 **{f"full {t} {m}": v for (t, m), v in r["full"].items()}} for r in rows]
        files.write_json(Path(args.json_path), {"rows": flat})
    if args.plot and not plot(rows, meta, Path(args.plot)):
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
