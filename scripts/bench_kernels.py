"""Benchmark the grouped expert matmul at Qwen3-30B-A3B expert shapes, in one run
(`dynaexq_jax.eval.kernel_bench`: what is timed and how).

For each expert matrix (gate_up 2048 x 1536, down 768 x 2048), token count (1, 8, 32, 256, each
routed to 8 of 128 experts) and weight format (int4, int2, int8, bf16): the Pallas tiled kernel,
the XLA tile loop and `ragged_dot`; on a GPU also the kernel's block_n x num_warps sweep.

  python scripts/bench_kernels.py                 # GPU, full table with the sweep
  python scripts/bench_kernels.py --markdown      # also append it to docs/PERFORMANCE.md
  python scripts/bench_kernels.py --smoke         # CPU-sized shapes

Off a GPU the Pallas kernel runs in interpret mode (an emulation of its grid): those rows time
the interpreter, so no rate or speed-up is shown for them.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynaexq_jax.errors import UserError  # noqa: E402
from dynaexq_jax.eval import kernel_bench  # noqa: E402
from dynaexq_jax.io import files  # noqa: E402
from dynaexq_jax.launch.flags import command_parser  # noqa: E402


def parse_args(argv):
    ap = command_parser(__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-sized shapes (qwen3-moe-smoke experts)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 8, 16], choices=[8, 4, 3, 2, 16],
                    help="weight formats: 8/4/3/2 quantized, 16 = bf16 (default: 4 2 8 16)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="token counts (default: 1 8 32 256; --smoke: 1 4)")
    ap.add_argument("--no-sweep", action="store_true", help="GPU: skip the block_n x num_warps sweep")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median taken)")
    ap.add_argument("--inner", type=int, default=None, help="calls per repetition")
    ap.add_argument("--markdown", nargs="?", const="docs/PERFORMANCE.md", default=None,
                    metavar="PATH", help="append the table as markdown (default PATH: %(const)s)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = kernel_bench.SMOKE if args.smoke else kernel_bench.FULL
    for knob in ("reps", "inner", "tokens"):  # unset: the shape set's own
        if getattr(args, knob) is None:
            setattr(args, knob, cfg[knob])
    if min(args.reps, args.inner, *args.tokens) < 1:
        print("error: --reps, --inner and --tokens must be at least 1", file=sys.stderr)
        return 2
    if args.markdown:
        try:
            files.check_append_file(args.markdown, "--markdown")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    rows, bw = kernel_bench.run(cfg, bits=args.bits, tokens=args.tokens, reps=args.reps, inner=args.inner, gpu=gpu,
                                sweep_tiling=not args.no_sweep)
    header = (f"device {dev.platform}: {getattr(dev, 'device_kind', dev)}, jax {jax.__version__}, copy bandwidth "
              f"{bw / 1e9:.0f} GB/s, {cfg['preset']} experts, median of {args.reps} x {args.inner} calls")
    if not gpu:
        header += ("; no GPU: the Pallas kernel ran in interpret mode, so its times are the interpreter's, "
                   "not kernel speed (no rate shown), and the tiling sweep is GPU-only")
    print(header)
    print(kernel_bench.table(rows, markdown=False))
    if args.markdown:
        cmd = "python scripts/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        stamp = datetime.date.today().isoformat()
        block = f"\n### `{cmd.strip()}` ({stamp})\n\n{header}.\n\n{kernel_bench.table(rows, markdown=True)}\n"
        path = Path(args.markdown)
        with path.open("a") as f:
            f.write(block)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
