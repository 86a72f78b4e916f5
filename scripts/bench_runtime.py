#!/usr/bin/env python
"""Does the DynaExq runtime keep its promises? Budget vs allocator peak, and step times with
promotions in flight vs without (`dynaexq_jax.eval.runtime_bench`: what is measured and how).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/bench_runtime.py --preset qwen3-30b-a3b \\
        --budget 20GB --batch-size 32 --routing-skew 1.0 --routing-shift-every 32
    python scripts/bench_runtime.py --preset qwen3-moe-smoke --budget 64MB --gen-len 48   # CPU smoke

The hot set moves every `--routing-shift-every` decode steps, so promotions keep flowing. Also
runs the blocking-migration variant (every promotion lands before the next step) for comparison.
"""

from __future__ import annotations

import sys

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.cli import refusals_as_errors
from dynaexq_jax.eval import runtime_bench
from dynaexq_jax.io import files
from dynaexq_jax.launch.flags import at_least_each, command_parser


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


@refusals_as_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    at_least_each(args, batch_size=1, prompt_len=1, gen_len=2, routing_shift_every=0, rebalance_every=1,
                  routing_skew=0)
    if args.json:
        files.check_output_file(args.json, "--json")
    bench = runtime_bench.RuntimeBench(
        args.preset, budget_lib.parse_size(args.budget), batch=args.batch_size, prompt_len=args.prompt_len,
        gen_len=args.gen_len, routing_skew=args.routing_skew, shift_every=args.routing_shift_every,
        rebalance_every=args.rebalance_every, dtype=args.dtype)
    runtime_bench.check(bench)  # before any weight is made
    report = {"preset": args.preset, "budget_bytes": bench.budget, "batch_size": args.batch_size}
    for variant, row in runtime_bench.run(bench):
        report[variant] = row
        print(runtime_bench.line(variant, row, bench.budget))
    if args.json:
        files.write_json(args.json, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
