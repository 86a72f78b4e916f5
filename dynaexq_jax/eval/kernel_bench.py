"""The grouped expert matmul timed at a preset's expert shapes (`scripts/bench_kernels.py`, and
gpu_check's kernels stage).

For each expert matrix of the preset (Qwen3-30B-A3B: gate_up K x N = 2048 x 1536, down 768 x
2048), token count (each routed to top-k of the experts) and weight format it times:
  pallas      pallas_kernels.tiled_matmul, planned as the engine plans it (row tiles)
  xla         the XLA tile loop (`grouped_matmul(backend="xla")`, the engine's CPU path)
  ragged_dot  jax.lax.ragged_dot on the bf16 weights (the baseline, once per shape and count)
and on a GPU the kernel's tiling knobs, block_n x num_warps: rows `pallas[bn=..,warps=..]`.
Per call: the median time, the bytes it must move (the routed experts' stored weights,
activations in and out), the achieved GB/s and its share of the copy bandwidth measured in the
same run, the speed against ragged_dot, and the largest error against
`pallas_kernels.tiled_matmul_reference` (relative to the output's largest value). Off a GPU the
Pallas kernel runs in interpret mode: its time is the interpreter's, so no rate is given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from dynaexq_jax import budget
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.matmul import ROW_TILES_MAX, grouped_matmul
from dynaexq_jax.io.preset import preset_config
from dynaexq_jax.runtime import costmodel

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


def run(cfg: dict, *, bits, tokens, reps: int, inner: int, gpu: bool, sweep_tiling: bool = True
        ) -> tuple[list[dict], float]:
    """Every row of the table, and the copy bandwidth their shares are of. `bits`: weight formats
    (16: bf16); `tokens`: token counts; each call timed as the median of `reps` x `inner`; on a
    GPU with `sweep_tiling`, every tiling variant too."""
    model = preset_config(cfg["preset"])
    experts, top_k = model.num_experts, model.experts_per_token
    group = budget.expert_group_size(model)
    rng = np.random.default_rng(0)
    bw = costmodel.copy_bandwidth(cfg["copy_bytes"], reps, inner)
    timed = functools.partial(costmodel.call_seconds, reps=reps, inner=inner)
    baseline = jax.jit(jax.lax.ragged_dot)
    xla = jax.jit(functools.partial(grouped_matmul, backend="xla"))
    out_rows = []
    for k, n in budget.expert_shapes(model):
        dense = (jax.random.normal(jax.random.key(k * 7 + n), (experts, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        banks = {b: dense if b == 16 else quant.quantize(dense, b, group) for b in bits}
        pallas = pallas_path(experts, n, interpret=not gpu)
        for count in tokens:
            gs = jnp.asarray(routing(count, experts, top_k, rng))
            t = count * top_k
            active = int(np.count_nonzero(np.asarray(gs)))
            x = jax.random.normal(jax.random.key(count), (t, k), jnp.bfloat16)
            act_bytes = 2 * (t * k + t * n)
            row = dict(shape=f"{k}x{n}", tokens=count, rows=t, active=active)

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
            for b, w in banks.items():
                paths = {"pallas" if gpu else "pallas (interpreted)": pallas}
                if gpu and sweep_tiling:
                    paths.update(sweep(w, experts, k, n, t))
                for name, fn in paths.items():
                    out_rows.append(measure(format_name(b), name, fn, w, base_s, interpreted=not gpu))
                out_rows.append(measure(format_name(b), "xla", xla, w, base_s))
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
