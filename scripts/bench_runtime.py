#!/usr/bin/env python
"""Does the DynaExq runtime keep its promises? Budget vs allocator peak, and step times with
promotions in flight vs without.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/bench_runtime.py --preset qwen3-30b-a3b \\
        --budget 20GB --batch-size 32 --routing-skew 1.0 --routing-shift-every 32
    python scripts/bench_runtime.py --preset qwen3-moe-smoke --budget 64MB --gen-len 48   # CPU smoke

The hot set moves every `--routing-shift-every` decode steps, so promotions keep flowing. A
step counts as "in flight" when at least one host->device copy was outstanding when it was
dispatched. Also runs the blocking-migration variant (every promotion lands before the next
step) for comparison.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.cli import refusals_as_errors
from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files, preset
from dynaexq_jax.launch.flags import at_least_each, command_parser
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.build import build_engine, plan_for
from dynaexq_jax.runtime.engine import peak_device_bytes


def parse_args(argv=None):
    p = command_parser(__doc__)
    p.add_argument("--preset", default="qwen3-moe-smoke")
    p.add_argument("--budget", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--routing-skew", type=float, default=1.0)
    p.add_argument("--routing-shift-every", type=int, default=32)
    p.add_argument("--rebalance-every", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--json", help="write the figures here (a new file, or one this script wrote)")
    return p.parse_args(argv)


def timed_run(eng, prompts, gen_len, shift, shift_every):
    """Per decode step: wall time between consecutive tokens and whether copies were in flight."""
    swapper = eng.policy.swapper
    marks = []  # (time, in flight at dispatch of the next step)

    def on_tokens(_ids):
        marks.append((time.perf_counter(), bool(swapper.inflight)))
        if shift_every and len(marks) % shift_every == 0:
            eng.params = shift.params(eng.params, len(marks) // shift_every)

    gen = eng.generate(prompts, gen_len, eos_token_ids=(), on_tokens=on_tokens)
    steps = [(t1 - t0, fl) for (t0, fl), (t1, _) in zip(marks, marks[1:])]
    return gen, steps


def check_args(args, opts):
    """-> (config, budget) from the preset and the budget alone, before any weight is made: a
    budget too small, or one that leaves no slot to promote into, is refused here."""
    at_least_each(args, batch_size=1, prompt_len=1, gen_len=2, routing_shift_every=0, rebalance_every=1,
                  routing_skew=0)
    if args.json:
        files.check_output_file(args.json, "--json")
    budget = budget_lib.parse_size(args.budget)
    cfg = preset.preset_config(args.preset)
    plan = plan_for(cfg, "dynaexq", budget=budget, batch=args.batch_size, longest_prompt=args.prompt_len,
                    max_new_tokens=args.gen_len, dtype_itemsize={"bfloat16": 2, "float32": 4}[args.dtype], opts=opts)
    if plan.slots == 0:
        raise UserError(f"budget {budget_lib.format_size(budget)} leaves no high-precision slot (the minimum is "
                        f"{budget_lib.format_size(plan.minimum)} plus {budget_lib.format_size(plan.slot_bytes)} "
                        f"per slot); nothing would be promoted, so pass a larger --budget")
    return cfg, budget


@refusals_as_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    base = DynaExqOptions(rebalance_every=args.rebalance_every)
    cfg, budget = check_args(args, base)
    ckpt = preset.random_checkpoint(cfg, jnp.dtype(args.dtype), routing_skew=args.routing_skew)
    shift = preset.RouterShift(ckpt, args.routing_skew)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, (args.batch_size, args.prompt_len)).tolist()
    report = {"preset": args.preset, "budget_bytes": budget, "batch_size": args.batch_size}
    for variant, blocking in (("async", False), ("blocking", True)):
        eng, plan = build_engine(ckpt, "dynaexq", budget=budget, batch=args.batch_size,
                                 longest_prompt=args.prompt_len, max_new_tokens=args.gen_len,
                                 opts=dataclasses.replace(base, blocking=blocking))
        timed_run(eng, prompts, args.gen_len, shift, args.routing_shift_every)  # warm-up: compile, fill slots
        gen, steps = timed_run(eng, prompts, args.gen_len, shift, args.routing_shift_every)
        busy = [t for t, fl in steps if fl]
        idle = [t for t, fl in steps if not fl]
        med = lambda xs: float(np.median(xs)) if xs else None
        row = {
            "slots": plan.slots,
            "accounted_device_bytes": plan.total,
            "peak_device_bytes": peak_device_bytes(),
            "steps_with_copies_in_flight": len(busy),
            "steps_without": len(idle),
            "median_step_s_in_flight": med(busy),
            "median_step_s_without": med(idle),
            "ratio": med(busy) / med(idle) if busy and idle else None,
            "decode_tokens_per_s": gen.stats["decode_tokens_per_s"],
            "hi_hit_rate": gen.stats["hi_hit_rate"],
            "promotions": gen.stats["promotions"],
            "h2d_bytes": gen.stats["h2d_bytes"],
            "transfer_wait_s": gen.stats["transfer_wait_s"],
        }
        report[variant] = row
        peak = row["peak_device_bytes"]
        print(
            f"{variant:>8}: {plan.slots} slots, accounted {budget_lib.format_size(plan.total)} of "
            f"{budget_lib.format_size(budget)}, allocator peak "
            f"{'n/a (backend reports none)' if peak is None else budget_lib.format_size(peak)}; "
            f"step {row['median_step_s_in_flight'] or float('nan'):.4f} s with copies in flight "
            f"({len(busy)} steps) vs {row['median_step_s_without'] or float('nan'):.4f} s without ({len(idle)}); "
            f"decode {row['decode_tokens_per_s']:.1f} tok/s, hit {row['hi_hit_rate']:.1%}"
        )
        del eng
    if args.json:
        files.write_json(args.json, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
