#!/usr/bin/env python
"""The first thing to run on a lent GPU: one command, the answer first, two output files.

    python scripts/gpu_check.py --out gpu_check            # GPU: Qwen3-30B-A3B shapes, <= 8 minutes
    python scripts/gpu_check.py --smoke --out /tmp/check   # CPU: a small preset, the same stages

Stages, in order of what they answer (`dynaexq_jax.eval.gpu_check` says what each measures):
device facts and measured costs; decode tok/s of every policy and of transformers' own model,
the predicted step time beside each; a per-kernel profile of XLA's step and of the fused layer;
the fused layer's kernels and their variants; the grouped matmul kernels; the runtime's
promises. Each part runs in a process of its own under its own time limit, cut to what is left
of the whole check's 470 s (one that runs out is reported with what it had measured by then;
the rest still run).

Writes OUT/gpu_check.json (everything, rewritten after every part) and OUT/gpu_check.md (the
tables to paste into docs/PERFORMANCE.md with the device named).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from dynaexq_jax.errors import UserError
from dynaexq_jax.eval import gpu_check
from dynaexq_jax.eval.gpu_report import markdown
from dynaexq_jax.io import files
from dynaexq_jax.launch.flags import comma_list, command_parser


def parse_args(argv=None):
    p = command_parser(__doc__)
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md (new, empty, or "
                                                      "one this script wrote)")
    p.add_argument("--smoke", action="store_true", help="small preset and budgets: the CPU smoke test")
    p.add_argument("--stages", default=",".join(gpu_check.STAGES))
    p.add_argument("--cases", default=",".join(c[0] for c in gpu_check.CASES),
                   help="the decode stage's cases, comma-separated (default: all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stages = comma_list("--stages", args.stages, choices=gpu_check.STAGES)
        cases = comma_list("--cases", args.cases, choices=[c[0] for c in gpu_check.CASES])
        out = files.OutputDir(args.out, "--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def save(doc):
        out.write("gpu_check.json", json.dumps(doc, indent=1, default=str))
        out.write("gpu_check.md", markdown(doc))

    with tempfile.TemporaryDirectory() as dump:
        doc = gpu_check.check(gpu_check.SMOKE if args.smoke else gpu_check.GPU, stages, cases, save, Path(dump))
    print(markdown(doc))
    return 0 if gpu_check.passed(doc) else 1


if __name__ == "__main__":
    sys.exit(main())
