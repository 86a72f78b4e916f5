"""Time the fused decode layer's attention-side kernels one by one, with their tiling variants
(`dynaexq_jax.eval.layer_bench`: what is timed and how).

At Qwen3-30B-A3B's shapes, batch 1 and 32, context 1024: attn_in, decode_attention, attn_out and
route, each against its plain-jnp reference; on a GPU each kernel's tiling variants too.

  python scripts/bench_decode_layer.py            # GPU: the table, with the sweep
  python scripts/bench_decode_layer.py --smoke    # CPU-sized shapes, interpret mode

Off a GPU the kernels run in interpret mode: those times are the interpreter's, so no rate is
shown and there is no sweep. `scripts/gpu_check.py`'s layer-kernels stage runs the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynaexq_jax.eval import layer_bench  # noqa: E402
from dynaexq_jax.launch.flags import command_parser  # noqa: E402
from dynaexq_jax.runtime import costmodel  # noqa: E402


def parse_args(argv):
    ap = command_parser(__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU-sized shapes (qwen3-moe-smoke)")
    ap.add_argument("--no-sweep", action="store_true", help="GPU: time each kernel's default tiling only")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median taken)")
    ap.add_argument("--inner", type=int, default=None, help="calls per repetition")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = layer_bench.SMOKE if args.smoke else layer_bench.FULL
    args.reps, args.inner = args.reps or cfg["reps"], args.inner or cfg["inner"]
    if min(args.reps, args.inner) < 1:
        print("error: --reps and --inner must be at least 1", file=sys.stderr)
        return 2
    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    bw = costmodel.copy_bandwidth(cfg["copy_bytes"], args.reps, args.inner)
    rows = list(layer_bench.run(cfg, reps=args.reps, inner=args.inner, gpu=gpu, bw=bw,
                                 sweep_tiling=not args.no_sweep))
    print(f"device {dev.platform}: {getattr(dev, 'device_kind', dev)}, jax {jax.__version__}, copy bandwidth "
          f"{bw / 1e9:.0f} GB/s, {cfg['preset']} at context {cfg['context']}, median of {args.reps} x {args.inner} "
          "calls" + ("" if gpu else "; no GPU: interpret mode, so times are the interpreter's (no rate, no sweep)"))
    print(layer_bench.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
