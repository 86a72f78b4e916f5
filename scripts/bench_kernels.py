"""Benchmark the grouped expert matmul at Qwen3-30B-A3B expert shapes, in one run.

For each expert matrix of the engine (gate_up K x N = 2048 x 1536, down 768 x 2048), token
count (1, 8, 32, 256, each routed to 8 of 128 experts) and weight format (int4, int2, int8,
bf16) it times:
  pallas      pallas_kernels.tiled_matmul, planned as the engine plans it (row tiles)
  xla         the XLA tile loop (`grouped_matmul(backend="xla")`, the engine's CPU path)
  ragged_dot  jax.lax.ragged_dot on the bf16 weights (the baseline, once per shape and count)
On a GPU it also sweeps the kernel's tiling knobs, block_n (64, 128, 256 where they divide N)
and num_warps (4, 8): rows `pallas[bn=..,warps=..]`.

Reported per call: the median time, the bytes it must move (the routed experts' stored
weights, activations in and out), the achieved GB/s and its share of the device copy
bandwidth measured in the same run, the speed relative to ragged_dot, and the largest error
against the kernel's reference, `pallas_kernels.tiled_matmul_reference` (relative to the
output's largest value).

  python scripts/bench_kernels.py                 # GPU, full table with the sweep
  python scripts/bench_kernels.py --markdown      # also append it to docs/PERFORMANCE.md
  python scripts/bench_kernels.py --smoke         # CPU-sized shapes

Off a GPU the Pallas kernel runs in interpret mode (an emulation of its grid): those rows time
the interpreter, so no rate or speed-up is shown for them.
"""

from __future__ import annotations

import datetime
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pallas_kernels  # noqa: E402
from dynaexq_jax import budget  # noqa: E402
from dynaexq_jax.errors import UserError  # noqa: E402
from dynaexq_jax.experts import quant  # noqa: E402
from dynaexq_jax.experts.matmul import ROW_TILES_MAX, grouped_matmul  # noqa: E402
from dynaexq_jax.io import files  # noqa: E402
from dynaexq_jax.io.preset import preset_config  # noqa: E402
from dynaexq_jax.launch.flags import command_parser  # noqa: E402
from dynaexq_jax.runtime import costmodel  # noqa: E402

FULL = dict(preset="qwen3-30b-a3b", tokens=(1, 8, 32, 256), copy_bytes=1 << 30, reps=25, inner=20)
SMOKE = dict(preset="qwen3-moe-smoke", tokens=(1, 4), copy_bytes=1 << 20, reps=3, inner=2)
BLOCK_N = (64, 128, 256)
NUM_WARPS = (4, 8)


def routing(tokens: int, experts: int, top_k: int, rng) -> np.ndarray:
    """Group sizes of `tokens` tokens each sent to `top_k` distinct random experts."""
    choice = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    return np.bincount(choice.ravel(), minlength=experts).astype(np.int32)


def kernel_tier(w):
    """`w` as a tier of `tiled_matmul`: (arrays, packed layout or None)."""
    if isinstance(w, quant.QuantizedTensor):
        return (w.packed, w.scales, w.zeros), w.layout
    return (w,), None


def pallas_path(experts: int, n: int, *, interpret: bool, block_n: int | None = None, num_warps: int = 4):
    """The kernel as `grouped_matmul` runs it (same tile rows and planner), with the tiling
    knobs the sweep varies. -> jitted (x, w, group_sizes) -> [T, N]."""

    def run(x, w, group_sizes):
        rows = x.shape[0]
        keys = pallas_kernels.group_keys(group_sizes, rows)
        tm = pallas_kernels.default_block_m(rows, experts)
        if rows <= ROW_TILES_MAX:
            tiles = pallas_kernels.row_tiles(keys, tm)
        else:
            tiles = pallas_kernels.plan_tiles(keys, tm, pallas_kernels.max_tiles(rows, experts, tm))
        xp = jnp.pad(x, ((0, tm), (0, 0)))
        out = pallas_kernels.tiled_matmul(xp, [kernel_tier(w)], tiles, rows_per_tier=experts, n=n, tm=tm,
                                          out_dtype=x.dtype, interpret=interpret, block_n=block_n, num_warps=num_warps)
        return out[:rows]

    return jax.jit(run)


def sweep(w, experts: int, k: int, n: int, rows: int) -> dict:
    """`pallas[bn=..,warps=..]` paths for the GPU: every block_n dividing N that the kernel
    takes, times each num_warps, except the default pair (the `pallas` row)."""
    tm = pallas_kernels.default_block_m(rows, experts)
    default = (pallas_kernels.default_block_n(n, rows), 4)
    paths = {}
    for bn in BLOCK_N:
        if pallas_kernels.gpu_unsupported_reason(k, n, [kernel_tier(w)[1]], block_m=tm, block_n=bn):
            continue
        for warps in NUM_WARPS:
            if (bn, warps) != default:
                paths[f"pallas[bn={bn},warps={warps}]"] = pallas_path(experts, n, interpret=False, block_n=bn,
                                                                       num_warps=warps)
    return paths


def stored_bytes_per_expert(w) -> int:
    return w.nbytes // w.shape[0]


def format_name(bits: int) -> str:
    return "bf16" if bits == 16 else f"int{bits}"


def reference(x, w, gs) -> np.ndarray:
    """The kernel's own reference (`pallas_kernels.tiled_matmul_reference`: the decoded weights
    in float32) on the rows `gs` groups, as float64."""
    keys = pallas_kernels.group_keys(gs, x.shape[0])
    out = pallas_kernels.tiled_matmul_reference(x, [kernel_tier(w)], keys, rows_per_tier=w.shape[0])
    return np.asarray(out, np.float64)


def run(cfg, args, gpu: bool) -> tuple[list[dict], float]:
    model = preset_config(cfg["preset"])
    experts, top_k = model.num_experts, model.experts_per_token
    group = budget.expert_group_size(model)
    rng = np.random.default_rng(0)
    bw = costmodel.copy_bandwidth(cfg["copy_bytes"], args.reps, args.inner)
    timed = functools.partial(costmodel.call_seconds, reps=args.reps, inner=args.inner)
    baseline = jax.jit(jax.lax.ragged_dot)
    xla = jax.jit(functools.partial(grouped_matmul, backend="xla"))
    out_rows = []
    for k, n in budget.expert_shapes(model):
        dense = (jax.random.normal(jax.random.key(k * 7 + n), (experts, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        banks = {bits: dense if bits == 16 else quant.quantize(dense, bits, group) for bits in args.bits}
        pallas = pallas_path(experts, n, interpret=not gpu)
        for tokens in args.tokens:
            gs = jnp.asarray(routing(tokens, experts, top_k, rng))
            t = tokens * top_k
            active = int(np.count_nonzero(np.asarray(gs)))
            x = jax.random.normal(jax.random.key(tokens), (t, k), jnp.bfloat16)
            act_bytes = 2 * (t * k + t * n)
            row = dict(shape=f"{k}x{n}", tokens=tokens, rows=t, active=active)

            def measure(weights, path, fn, w, base_s, interpreted=False):
                sec = timed(fn, x, w, gs)
                ref = reference(x, w, gs)
                err = np.abs(np.asarray(fn(x, w, gs), np.float64) - ref).max() / np.abs(ref).max()
                moved = active * stored_bytes_per_expert(w) + act_bytes
                rate = moved / sec
                # An interpreted kernel's time is the interpreter's: no rate, no speed-up.
                return dict(row, weights=weights, path=path, us=sec * 1e6, mb=moved / 1e6, err=err,
                            gbs=None if interpreted else rate / 1e9, pct=None if interpreted else 100 * rate / bw,
                            speedup=None if interpreted else (base_s or sec) / sec)

            out_rows.append(measure("bf16", "ragged_dot", baseline, dense, None))
            base_s = out_rows[-1]["us"] / 1e6
            for bits, w in banks.items():
                paths = {"pallas" if gpu else "pallas (interpreted)": pallas}
                if gpu and not args.no_sweep:
                    paths.update(sweep(w, experts, k, n, t))
                for name, fn in paths.items():
                    out_rows.append(measure(format_name(bits), name, fn, w, base_s, interpreted=not gpu))
                out_rows.append(measure(format_name(bits), "xla", xla, w, base_s))
    return out_rows, bw


COLUMNS = [("shape", "K x N", "{}"), ("tokens", "tokens", "{}"), ("rows", "rows", "{}"),
           ("active", "experts hit", "{}"), ("weights", "weights", "{}"), ("path", "path", "{}"),
           ("us", "time (us)", "{:.1f}"), ("mb", "bytes (MB)", "{:.2f}"),
           ("gbs", "GB/s", "{:.0f}"), ("pct", "% copy BW", "{:.0f}"),
           ("speedup", "vs ragged_dot", "{:.2f}x"), ("err", "rel err", "{:.1e}")]


def table(rows, markdown: bool) -> str:
    cells = [["-" if r[key] is None else fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    heads = [h for _, h, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt_row = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([fmt_row(heads)] + [fmt_row(c) for c in cells])


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
    cfg = SMOKE if args.smoke else FULL
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
    rows, bw = run(cfg, args, gpu)
    header = (f"device {dev.platform}: {getattr(dev, 'device_kind', dev)}, jax {jax.__version__}, copy bandwidth "
              f"{bw / 1e9:.0f} GB/s, {cfg['preset']} experts, median of {args.reps} x {args.inner} calls")
    if not gpu:
        header += ("; no GPU: the Pallas kernel ran in interpret mode, so its times are the interpreter's, "
                   "not kernel speed (no rate shown), and the tiling sweep is GPU-only")
    print(header)
    print(table(rows, markdown=False))
    if args.markdown:
        cmd = "python scripts/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        stamp = datetime.date.today().isoformat()
        block = f"\n### `{cmd.strip()}` ({stamp})\n\n{header}.\n\n{table(rows, markdown=True)}\n"
        path = Path(args.markdown)
        with path.open("a") as f:
            f.write(block)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
