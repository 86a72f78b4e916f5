"""Evaluate residency policies: perplexity, multiple-choice accuracy, greedy exact match.

    python scripts/eval.py                       # full, static, dynaexq on the shipped tasks
    python scripts/eval.py --policies full,static,dynaexq --lo-bits 4,3,2 --budgets none,+25% \\
        --tiers auto,fixed --hotness checkpoints/tiny-qwen3-moe/tasks/hotness_train.json --json results.json
    python scripts/eval.py --policies full,offload --big-little --little-shares 0,0.25,0.5,0.75   # big-little rows
    python scripts/eval.py --policies full,floe --floe-sparsity 0.9      # FloE (scripts/calibrate.py first)

Budgets: "none", a size (64MB, 60MiB, bytes), or "+P%": the --lo-bits minimum (weights,
fallbacks, KV cache, workspace for this batch and length) plus P% of all experts as bf16 slots.
Static with a budget takes the widest width that fits it; without, its --lo-bits. Dynaexq with
auto tiers (the default) picks its fallback width and slot dtype within each budget, so
--lo-bits only anchors its "+P%"; `--tiers fixed` keeps the --lo-bits fallback and --hi-dtype
slots (bf16 for auto) beside it for comparison. On --mesh every policy runs with its experts
spread over the devices, dynaexq on fixed tiers.

Dynaexq starts warm: from --hotness, else the profile saved for this checkpoint, else one
computed on --calibration text when given, else the model's shipped tasks/hotness_train.json. See
scripts/accuracy_sweep.py for accuracy against memory.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files
from dynaexq_jax.launch.engine import check_hotness
from dynaexq_jax.launch.flags import at_least_each, comma_list, command_parser
from dynaexq_jax.launch.options import (
    DEFAULT_MODEL,
    FLOE_FLAGS,
    BigLittleSweep,
    MeshOptions,
    ModelOptions,
    PolicyOptions,
    check_applies,
    check_tiers,
)
from dynaexq_jax.policies import POLICIES

TASKS = DEFAULT_MODEL / "tasks"
POLICY_FLAGS = ("hi_dtype", "group_size", "quant_method", "hotness", "floe_sparsity", "floe_up_bits",
                "floe_calibration")


def parser():
    p = command_parser(__doc__)
    ModelOptions.add_flags(p, only=("model", "dtype"))
    p.add_argument("--ppl", action="append", help="perplexity task: JSONL of {\"text\"} or a text file (repeatable)")
    p.add_argument("--mc", action="append", help="multiple-choice JSONL of {\"context\", \"choices\", \"answer\"} "
                                                 "(repeatable)")
    p.add_argument("--em", action="append", help="exact-match JSONL of {\"prompt\", \"answer\"} (repeatable)")
    p.add_argument("--policies", default="full,static,dynaexq", help="comma-separated policies")
    p.add_argument("--budgets", default="none", help="comma-separated budgets: none, a size, or +P%% (see above)")
    p.add_argument("--lo-bits", dest="lo_widths", default="4",
                   help="comma-separated widths from 4,3,2: static without a budget, fixed tiers, and the anchor of "
                        "+P%% budgets")
    p.add_argument("--tiers", default="auto", help="comma-separated dynaexq tier modes from auto,fixed (fixed: the "
                                                   "--lo-bits fallback and --hi-dtype slots, bfloat16 for auto)")
    PolicyOptions.add_flags(p, only=POLICY_FLAGS)
    p.add_argument("--calibration", help="text (JSONL of {\"text\"} or a text file, never the eval data) whose routing "
                                         "gives dynaexq's profile when no other is found")
    p.add_argument("--residency", choices=["pass", "batch", "frozen"], default="pass",
                   help="when dynaexq's residency may change: between task passes (batch-size independent), "
                        "after every batch, or never")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens")
    p.add_argument("--max-length", type=int, default=512, help="longest multiple-choice sequence (contexts are "
                                                               "left-truncated)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens per exact-match prompt")
    p.add_argument("--limit", type=int, help="first N items (documents for perplexity) of each task")
    MeshOptions.add_flags(p, only=("mesh",))
    p.add_argument("--json", dest="json_path", help="write {\"results\": [...]} here (a new file, or one this "
                                                    "command wrote)")
    BigLittleSweep.add_flags(p)
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def run(args) -> list:
    import jax.numpy as jnp

    from dynaexq_jax.eval import evaluate
    from dynaexq_jax.io import loader
    from dynaexq_jax.models import registry
    from dynaexq_jax.policies.dynaexq import DynaExqOptions

    model, policy, mesh_opts = (ModelOptions.from_args(args), PolicyOptions.from_args(args),
                                MeshOptions.from_args(args))
    policies = comma_list("--policies", args.policies, choices=POLICIES)
    budgets = comma_list("--budgets", args.budgets)
    for spec in budgets:
        evaluate.budget_spec(spec)
    lo_bits = comma_list("--lo-bits", args.lo_widths, choices=(4, 3, 2), convert=int)
    tiers = comma_list("--tiers", args.tiers, choices=evaluate.TIER_MODES)
    at_least_each(args, batch_size=1, window=2, max_length=2, max_new_tokens=1, limit=1)
    policy.check()
    check_applies(policy, FLOE_FLAGS, "floe" in policies, "FloE", "add floe to --policies")
    if "dynaexq" in policies and "fixed" in tiers:
        for bits in lo_bits:
            check_tiers(policy.hi_dtype, bits, "--hi-dtype {hi} with --tiers fixed over --lo-bits {lo}")
    mesh_opts.check()
    sweep = BigLittleSweep.from_args(args).sweep()
    if args.json_path:
        files.check_output_file(args.json_path, "--json")
    cfg = registry.read_config(model.model)
    check_hotness(policy, cfg)  # read in full now: a bad profile must not end the evaluation after its first runs
    mesh = None
    if mesh_opts.mesh:
        from dynaexq_jax.runtime import mesh as mesh_lib

        mesh = mesh_lib.expert_mesh(mesh_opts.size())
        mesh_lib.check_split(cfg.num_experts, mesh.size)
    runs = evaluate.expand_runs(policies, budgets, lo_bits, tiers)
    given = args.ppl or args.mc or args.em
    if not given:
        args.ppl, args.mc, args.em = ([TASKS / "heldout.jsonl"], [TASKS / "next_line_mc.jsonl"],
                                      [TASKS / "next_line_em.jsonl"])
    fix = "check the path" if given else "build the shipped tasks with scripts/build_tasks.py"
    tasks = []
    for kind, paths in (("ppl", args.ppl), ("mc", args.mc), ("em", args.em)):
        for path in paths or []:
            task = evaluate.load_task(kind, path, what=f"--{kind}" if given else "task file", fix=fix)
            tasks.append(dataclasses.replace(task, items=task.items[: args.limit]) if args.limit else task)

    calibration = evaluate.load_task("ppl", args.calibration, what="--calibration").items if args.calibration else None
    shipped = Path(model.model) / "tasks" / "hotness_train.json"  # recorded on the model's training data
    ckpt = loader.load(model.model, jnp.dtype(model.dtype))
    opts = DynaExqOptions(hi_dtype=policy.hi_dtype, group_size=policy.group_size, quant_method=policy.quant_method)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    return evaluate.evaluate_runs(
        ckpt, runs, tasks, opts=opts, hotness_profile=policy.hotness, calibration=calibration,
        default_profile=str(shipped) if shipped.is_file() else None, batch_size=args.batch_size,
        window=args.window,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, residency=args.residency,
        progress=True, log=log, sweep=sweep, mesh=mesh, floe=policy.floe(),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.eval import evaluate
    from dynaexq_jax.runtime import compile_cache, host_memory

    host_memory.reuse_freed_memory()
    compile_cache.enable()  # DYNAEXQ_COMPILE_CACHE=0 turns it off
    try:
        results = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(evaluate.table(results))
    if args.json_path:
        payload = {"results": [dataclasses.asdict(r) for r in results]}
        try:
            files.write_json(Path(args.json_path), payload)
        except OSError as e:  # checked writable at the start; the disk may have filled since
            print(f"error: --json {args.json_path}: {e.strerror}; the table above holds the results", file=sys.stderr)
            return 2
    return 0
