"""Benchmark the grouped (dequant) matmuls at Qwen3-30B-A3B expert shapes, in one run.

For each matrix shape (K x N = 2048 x 768 and 768 x 2048), token count (1, 8, 32, 256, each
routed to 8 of 128 experts) and weight format (int4, int2, bf16) it times:
  pallas      pallas_kernels.grouped_dequant_matmul / grouped_matmul_dense
  xla         dequantize (active experts only when rows < experts) + jax.lax.ragged_dot
  ragged_dot  jax.lax.ragged_dot on bf16 weights
and reports the median time per call, the bytes a call must move (the active experts'
stored weight bytes plus activations in and out), the achieved GB/s and its share of the
device-to-device copy bandwidth measured in the same run.

  python scripts/bench_kernels.py                 # GPU, full table
  python scripts/bench_kernels.py --markdown      # also append it to docs/PERFORMANCE.md
  python scripts/bench_kernels.py --smoke         # CPU-sized shapes, Pallas in interpret mode
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pallas_kernels  # noqa: E402
from dynaexq_jax.experts import quant  # noqa: E402
from dynaexq_jax.experts.matmul import grouped_matmul  # noqa: E402

FULL = dict(experts=128, top_k=8, shapes=((2048, 768), (768, 2048)), tokens=(1, 8, 32, 256),
            copy_bytes=1 << 30, group_size=128)
SMOKE = dict(experts=8, top_k=2, shapes=((256, 128), (128, 256)), tokens=(1, 4),
             copy_bytes=1 << 20, group_size=64)


def time_call(fn, *args, reps: int, inner: int) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls (seconds)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int, reps: int, inner: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (a read and a write of `nbytes`)."""
    a = jnp.zeros((nbytes,), jnp.uint8)
    copy = jax.jit(lambda v: v + jnp.uint8(1))
    return 2 * nbytes / time_call(copy, a, reps=reps, inner=inner)


def routing(tokens: int, experts: int, top_k: int, rng) -> np.ndarray:
    """Group sizes of `tokens` tokens each sent to `top_k` distinct random experts."""
    choice = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    return np.bincount(choice.ravel(), minlength=experts).astype(np.int32)


def weight_bytes_per_expert(k: int, n: int, bits: int, group_size: int) -> int:
    if bits == 16:
        return k * n * 2
    return k * n * bits // 8 + 2 * 2 * (k // group_size) * n


def sweep_paths(bits: int, k: int) -> dict:
    """Pallas tile configurations besides the defaults, labelled `pallas[bn,bk,warps]`."""
    kernel = pallas_kernels.grouped_matmul_dense if bits == 16 else (
        pallas_kernels.grouped_dequant_matmul)
    paths = {}
    for bn in (32, 64, 128):
        for bk in (b for b in (128, 256, 512) if k % b == 0):
            for warps in (4, 8):
                fn = functools.partial(kernel, block_n=bn, block_k=bk, num_warps=warps)
                paths[f"pallas[{bn},{bk},{warps}]"] = jax.jit(fn)
    return paths


def run(cfg, args) -> tuple[list[dict], float]:
    rng = np.random.default_rng(0)
    bw = copy_bandwidth(cfg["copy_bytes"], args.reps, args.inner)
    rows_out = []
    e, top_k, g = cfg["experts"], cfg["top_k"], cfg["group_size"]
    for k, n in cfg["shapes"]:
        key = jax.random.key(k * 7 + n)
        w = (jax.random.normal(key, (e, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        banks = {16: w}
        for bits in args.bits:
            if bits != 16:
                banks[bits] = quant.quantize(w, bits, g)
        for tokens in cfg["tokens"]:
            gs = jnp.asarray(routing(tokens, e, top_k, rng))
            t = tokens * top_k
            active = int(np.count_nonzero(np.asarray(gs)))
            x = jax.random.normal(jax.random.key(tokens), (t, k), jnp.bfloat16)
            act_bytes = t * k * 2 + t * n * 2
            for bits in args.bits:
                wb = banks[bits]
                paths = {
                    "pallas": jax.jit(lambda x, w, gs: grouped_matmul(x, w, gs, backend="pallas")),
                    "xla" if bits != 16 else "ragged_dot": jax.jit(
                        lambda x, w, gs: grouped_matmul(x, w, gs, backend="xla")),
                }
                if args.sweep:
                    paths.update(sweep_paths(bits, k))
                moved = active * weight_bytes_per_expert(k, n, bits, g) + act_bytes
                times = {p: time_call(f, x, wb, gs, reps=args.reps, inner=args.inner)
                         for p, f in paths.items()}
                base = times["xla" if bits != 16 else "ragged_dot"]
                for p, sec in times.items():
                    rows_out.append(dict(
                        shape=f"{k}x{n}", tokens=tokens, rows=t, active=active,
                        weights="bf16" if bits == 16 else f"int{bits}", path=p,
                        us=sec * 1e6, mb=moved / 1e6, gbs=moved / sec / 1e9,
                        pct=100 * moved / sec / bw, speedup=base / sec))
    return rows_out, bw


COLUMNS = [("shape", "K x N", "{}"), ("tokens", "tokens", "{}"), ("rows", "rows", "{}"),
           ("active", "experts hit", "{}"), ("weights", "weights", "{}"), ("path", "path", "{}"),
           ("us", "time (us)", "{:.1f}"), ("mb", "bytes (MB)", "{:.2f}"),
           ("gbs", "GB/s", "{:.0f}"), ("pct", "% copy BW", "{:.0f}"),
           ("speedup", "vs XLA", "{:.2f}x")]


def table(rows, markdown: bool) -> str:
    cells = [[fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    heads = [h for _, h, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt_row = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([fmt_row(heads)] + [fmt_row(c) for c in cells])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (interpret)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 16],
                    help="weight formats: 8/4/3/2 quantized, 16 = bf16 (default: 4 2 16)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time Pallas block_n x block_k x num_warps variants")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median taken)")
    ap.add_argument("--inner", type=int, default=None, help="calls per repetition")
    ap.add_argument("--markdown", nargs="?", const="docs/PERFORMANCE.md", default=None,
                    metavar="PATH", help="append the table as markdown (default PATH: %(const)s)")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    args.reps = args.reps or (3 if args.smoke else 25)
    args.inner = args.inner or (2 if args.smoke else 20)

    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', dev)}"
    rows, bw = run(cfg, args)
    header = (f"device {device}, jax {jax.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s, "
              f"E={cfg['experts']} top-{cfg['top_k']}, group {cfg['group_size']}, median of "
              f"{args.reps} x {args.inner} calls")
    print(header)
    print(table(rows, markdown=False))
    if args.markdown:
        cmd = "python scripts/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        stamp = datetime.date.today().isoformat()
        block = (f"\n### `{cmd.strip()}` ({stamp})\n\n{header}.\n\n{table(rows, markdown=True)}\n")
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(block)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
