#!/usr/bin/env python
"""Compile the engine's decode and prefill steps for an H100/H200 on a machine without one,
and say what each step launches and reads, against the bytes it must read.

    python scripts/aot_report.py --preset qwen3-30b-a3b --budget 20GB --batch 1 --gpu h100,h200
    python scripts/aot_report.py --preset qwen3-30b-a3b --budget 32GB --batch 32 --context 2048 --json
    python scripts/aot_report.py --model DIR --policy static --dump-hlo hlo/
    python scripts/aot_report.py --preset qwen3-30b-a3b --budget 20GB --steps decode --kernels

Needs the compile-only GPU stack (jax + jax-cuda13-plugin + jax-cuda13-pjrt, no GPU and no
CUDA wheels): `pip install -e ".[aot]"` into an environment of its own (README, "Compiling for
a GPU"). The script sets JAX_PLATFORMS=cpu itself. Nothing is allocated: a 30B model's steps
compile from abstract shapes.

Per step: the kernels (and copies) it executes, from the thunk sequence XLA emits for the GPU
(loop trip counts applied), per step and per layer, and of those how many run inside CUDA graphs
(XLA's command buffers) and how many launches the host makes (kernels outside graphs, and each
graph); bytes read and written per step, XLA's kernels from the HLO and the Pallas kernels from
their tiling (see `dynaexq_jax.runtime.aot`); the minimum bytes; their ratio; XLA's temporaries
against the plan's workspace; compile seconds (wall, and the process's CPU time, which a busy
machine does not inflate); and a predicted step time, bytes / HBM bandwidth
+ host launches x `aot.LAUNCH_S` + kernels in graphs x `aot.GRAPH_KERNEL_S`, with the tokens/s
it implies. `--kernels` lists every kernel of each step: executions per step, in a graph or
not, what it is, and its bytes per execution.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax starts: the CUDA plugin cannot start without a GPU

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

from dynaexq_jax.launch.flags import comma_list, command_parser  # noqa: E402

STEPS = ("decode", "prefill")


def parse_args(argv=None):
    p = command_parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face checkpoint directory (config.json is all that is read)")
    src.add_argument("--preset", default="qwen3-30b-a3b", help="preset name or config.json path")
    p.add_argument("--budget", help="device memory budget, e.g. 20GB (default: room for every expert)")
    p.add_argument("--policy", default="dynaexq", help="comma-separated: dynaexq, static, full")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=1024, help="tokens per sequence (KV cache) of the decode step")
    p.add_argument("--prompt", type=int, default=128, help="prompt length of the prefill step")
    p.add_argument("--gpu", default="h200", help="comma-separated: h100, h200")
    p.add_argument("--steps", default="decode,prefill", help="comma-separated: decode, prefill")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--lo-bits", type=lambda v: int(v) if v.isdigit() else v, choices=[4, 3, 2, "mxfp4"], default=4)
    p.add_argument("--hi-dtype", choices=["bfloat16", "int8"], default="bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--dump-hlo", help="write each step's optimized HLO into this folder (new, empty, or one this "
                                      "script wrote)")
    p.add_argument("--top", type=int, default=0, help="also list the N kernels that move the most bytes")
    p.add_argument("--kernels", action="store_true", help="list every kernel each step executes")
    p.add_argument("--command-buffer", metavar="KINDS",
                   help="XLA's xla_gpu_enable_command_buffer for the compile, e.g. FUSION,CUSTOM_CALL,WHILE "
                        "('' for none; default: XLA's, which leaves while loops out)")
    return p.parse_args(argv)


def rows(args):
    """Every (gpu, policy, batch, step) row, checked and planned before anything compiles."""
    import jax.numpy as jnp

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.io import files
    from dynaexq_jax.io.preset import preset_config
    from dynaexq_jax.models.registry import read_config
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime import aot
    from dynaexq_jax.runtime.build import plan_for

    cfg = read_config(args.model) if args.model else preset_config(args.preset)
    gpus = comma_list("--gpu", args.gpu, choices=tuple(aot.GPUS))
    policies = comma_list("--policy", args.policy, choices=("dynaexq", "static", "full"))
    batches = comma_list("--batch", args.batch, convert=int, low=1)
    steps = comma_list("--steps", args.steps, choices=STEPS)
    if args.context <= args.prompt or args.prompt < 1 or args.top < 0:
        raise UserError("--context must be longer than --prompt (>= 1), and --top >= 0")
    dump = files.OutputDir(args.dump_hlo, "--dump-hlo") if args.dump_hlo else None  # before anything compiles
    budget = budget_lib.parse_size(args.budget) if args.budget else None
    dtype = jnp.dtype(args.dtype)
    opts = DynaExqOptions(lo_bits=args.lo_bits, hi_dtype=args.hi_dtype)
    out = []
    for policy in policies:
        for batch in batches:
            try:
                plan = plan_for(cfg, policy, budget=budget, batch=batch, longest_prompt=args.prompt,
                                max_new_tokens=args.context - args.prompt, dtype_itemsize=dtype.itemsize, opts=opts)
            except budget_lib.BudgetError as e:
                out.append(dict(policy=policy, batch=batch, refused=str(e)))
                continue
            for step in steps:
                for gpu in gpus:
                    out.append(dict(cfg=cfg, policy=policy, batch=batch, step=step, gpu=gpu, plan=plan, dtype=dtype,
                                    group=budget_lib.expert_group_size(cfg, opts.group_size), dump=dump))
    if all("refused" in r for r in out):  # a report of no row would be a silent success
        first = out[0]
        raise UserError(f"no step to compile: policy {first['policy']} at batch {first['batch']} is refused "
                        f"({first['refused']})" + (f", and {len(out) - 1} more" if len(out) > 1 else ""))
    return cfg, out


def measure(args, row) -> dict:
    from dynaexq_jax.runtime import aot, engine

    cfg, plan, step, batch = row["cfg"], row["plan"], row["step"], row["batch"]
    context = engine.cache_bucket(args.context)
    experts = aot.abstract_experts(cfg, row["policy"], plan, dtype=row["dtype"], hi_dtype=args.hi_dtype,
                                   group=row["group"])
    fn, fargs = aot.step_args(cfg, experts, step=step, batch=batch, context=context, prompt=args.prompt,
                              dtype=row["dtype"])
    compiled = aot.compile_for(fn, fargs, row["gpu"], args.command_buffer)
    traffic, minimum = aot.traffic_and_min(cfg, row["policy"], plan, step=step, batch=batch, context=context,
                                           prompt=args.prompt, itemsize=row["dtype"].itemsize,
                                           hi_dtype=args.hi_dtype, group=row["group"])
    r = aot.report_step(compiled, traffic)
    hlo = None
    if row["dump"] is not None:
        name = f"{row['policy']}-{step}-b{batch}-c{context}-{row['gpu']}"
        hlo = str(row["dump"].write(name + ".hlo", compiled.as_text()))
        row["dump"].write(name + ".thunks", compiled.thunks)
    seconds = aot.predicted_s(r["bytes"], r["runs"], aot.GPUS[row["gpu"]][1])
    tokens = batch * (1 if step == "decode" else args.prompt)
    by_name = {k.name: k for k in r["by_kernel"]}
    listing = []
    for w in r["runs"].work:
        k = by_name.get(w.name)
        listing.append({"name": w.name, "kind": w.kind, "label": k.label if k else w.kind, "trips": w.trips,
                        "in_graph": w.in_graph, "bytes": aot.kernel_bytes(k, traffic) if k else 0,
                        "programs": math.prod(k.grid) if k and k.grid else None})
    return {
        "gpu": row["gpu"], "policy": row["policy"], "step": step, "batch": batch, "context": context,
        "layers": cfg.num_layers, "slots": plan.slots, "kernels": r["kernels"], "launches": r["launches"],
        "in_graphs": r["in_graphs"], "graphs": r["graphs"], "outside_graphs": r["outside_graphs"],
        "in_loops": r["in_loops"],
        "unknown_loops": r["unknown_loops"],
        "xla_bytes": r["xla_bytes"], "pallas_bytes": r["pallas_bytes"], "bytes": r["bytes"], "min_bytes": minimum,
        "temp_bytes": r["temp_bytes"], "workspace_bytes": plan.workspace, "compile_s": round(compiled.seconds, 2),
        "compile_cpu_s": round(compiled.cpu_seconds, 2),
        "predicted_s": seconds, "predicted_tokens_per_s": tokens / seconds, "hlo": hlo, "launch_list": listing,
        "top": [(k.label, k.name, k.trips * aot.kernel_bytes(k, traffic))
                for k in sorted(r["by_kernel"], key=lambda k: -k.trips * aot.kernel_bytes(k, traffic))[:args.top]],
    }


def table(results: list[dict]) -> str:
    head = ("| gpu | policy | step | batch | context | slots | launches (/layer) | in graphs / host launches | bytes "
            "| min | ratio | temp / workspace | compile | predicted |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    from dynaexq_jax.budget import format_size as gb
    for r in results:
        if "refused" in r:
            lines.append(f"| | {r['policy']} | | {r['batch']} | | | refused: {r['refused']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['gpu']} | {r['policy']} | {r['step']} | {r['batch']} | {r['context']} | {r['slots']} | "
            f"{r['launches']} ({r['launches'] / r['layers']:.1f}) | {r['in_graphs']} / {r['outside_graphs']} | "
            f"{gb(r['bytes'])} | {gb(r['min_bytes'])} | "
            f"{r['bytes'] / r['min_bytes']:.2f} | {gb(r['temp_bytes'])} / {gb(r['workspace_bytes'])} | "
            f"{r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} s CPU) | {r['predicted_s'] * 1e3:.2f} ms, "
            f"{r['predicted_tokens_per_s']:.0f} tok/s |")
        for label, name, b in r["top"]:
            lines.append(f"|   | {name} | {label} | | | | | | {gb(b)} | | | | | |")
    return "\n".join(lines)


def kernel_list(r: dict) -> str:
    """Every kernel a step executes, in the order the GPU runs them."""
    from dynaexq_jax.budget import format_size as gb

    lines = [f"{r['gpu']} {r['policy']} {r['step']} batch {r['batch']}: {r['launches']} kernels per step "
             f"({r['launches'] / r['layers']:.1f} per layer; {r['in_loops']} in the layer loop), "
             f"{r['in_graphs']} in CUDA graphs, "
             f"{r['outside_graphs']} host launches ({r['graphs']} of them graphs)",
             "| per step | graph | kernel | HLO | bytes each | programs |", "|---|---|---|---|---|---|"]
    for k in r["launch_list"]:
        lines.append(f"| {k['trips']} | {'yes' if k['in_graph'] else 'no'} | {k['label']} | {k['name']} | "
                     f"{gb(k['bytes'])} | {k['programs'] or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.errors import UserError

    try:
        _, todo = rows(args)
        results = [r if "refused" in r else measure(args, r) for r in todo]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        keep = lambda r: {k: v for k, v in r.items() if k != "top" and (args.kernels or k != "launch_list")}
        print(json.dumps({"steps": [keep(r) for r in results]}))
    else:
        print(table(results))
        for r in results:
            if args.kernels and "refused" not in r:
                print("\n" + kernel_list(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
