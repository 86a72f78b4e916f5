"""Expert FFNs over routed (token, expert) pairs that read only the experts with rows.

`routed_ffn` sorts a layer's pairs by the (tier, row) their expert's handle names, cuts the
sorted rows into tiles of one expert each (`pallas_kernels.plan_tiles`), and multiplies tile
by tile, so a step reads each routed expert's stored weights (packed or dense, from whichever
tier holds it) once, and nothing else, whatever the size of the tiers.

The kernel is chosen per lowering platform (`jax.lax.platform_dependent`), never from the
backend the process runs on, so compiling for a GPU on a CPU-only machine gives exactly the
program a GPU would run:

- cuda: the Pallas-Triton `tiled_matmul`, one launch per matrix covering every tier;
- elsewhere (CPU): a loop over the used tiles (`lax.fori_loop`, the tile count its trip
  count) that fetches one expert at a time (dequantized if packed) and multiplies its rows.
  Its transient memory is one expert and its work the routed rows only; `jax.lax.ragged_dot`
  on the CPU multiplies every row by every group.

`grouped_matmul` is the same machinery for one weight array and `ragged_dot`-style group
sizes: what the kernel tests and benchmarks call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

import pallas_kernels
from dynaexq_jax.experts.expert_state import ExpertState, Weights
from dynaexq_jax.experts.quant import Mxfp4Tensor, QuantizedTensor
from pallas_kernels import INVALID

Activation = Callable[[jax.Array], jax.Array]  # [rows, 2I] gate|up -> [rows, I]
BACKENDS = (None, "pallas", "xla")
ROW_TILES_MAX = 2048  # up to this many routed pairs the Pallas grid has a slot per row (no compaction)


def swiglu(h):
    """h [rows, 2I] gate|up -> silu(gate) * up [rows, I]."""
    return pallas_kernels.silu_glu(*jnp.split(h, 2, axis=-1))


def clamped_swiglu(h, *, alpha: float, limit: float):
    """gpt-oss's SwiGLU (`pallas_kernels.clamped_glu`) of h [rows, 2I] gate|up -> [rows, I]."""
    return pallas_kernels.clamped_glu(*jnp.split(h, 2, axis=-1), alpha=alpha, limit=limit)


def xla_tile_rows(num_rows: int, num_groups: int) -> int:
    """Rows per tile of the XLA loop: about twice the mean rows per expert, so most experts
    take one iteration (1 for decode at batch 1, up to 256 for long prefills)."""
    per_group = -(-2 * num_rows // max(num_groups, 1))
    return min(256, 1 << max(per_group - 1, 0).bit_length())


def _dot(a, b):
    """float32 product of one tile (the XLA path: XLA:CPU has no bf16 x bf16 -> f32 dot, and a
    tile's operands are small)."""
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _fetch(w: Weights, row, dtype, cols: tuple | None = None):
    """One expert's [K, N] matrix, or its columns `cols` = (start, width), in `dtype`,
    dequantized when packed (see `runtime.engine.compiler_options`: XLA:CPU must not hoist this
    out of the tile loop)."""
    if isinstance(w, Mxfp4Tensor):  # N-major blocks: whole matrices only
        return w.take(row).dequantize(dtype)
    cut = (lambda a: a) if cols is None else (lambda a: jax.lax.dynamic_slice_in_dim(a, *cols, axis=a.ndim - 1))
    if isinstance(w, QuantizedTensor):
        t = w.take(row)
        if cols is not None:
            t = QuantizedTensor(cut(t.packed), cut(t.scales), cut(t.zeros), w.bits, w.group_size,
                                (w.shape[-2], cols[1]))
        return t.dequantize(dtype)
    return cut(jax.lax.dynamic_index_in_dim(w, row, 0, keepdims=False)).astype(dtype)


CPU_BLOCK_N = 256  # output columns a tile dequantizes at a time on the CPU: 2 MB of float32 at K 2048


def _blocked_dot(x, w: Weights, row):
    """x [tm, K] @ expert `row` of `w` -> float32 [tm, N], a column block at a time, so the
    dequantized block stays in the CPU's cache instead of a float32 copy of the whole matrix
    going through memory (3x its packed bytes read and written per tile)."""
    n = w.shape[-1]
    if isinstance(w, Mxfp4Tensor) or n % CPU_BLOCK_N or n == CPU_BLOCK_N:
        return _dot(x, _fetch(w, row, jnp.float32))

    def block(j, out):
        y = _dot(x, _fetch(w, row, jnp.float32, (j * CPU_BLOCK_N, CPU_BLOCK_N)))
        return jax.lax.dynamic_update_slice_in_dim(out, y, j * CPU_BLOCK_N, 1)

    return jax.lax.fori_loop(0, n // CPU_BLOCK_N, block, jnp.zeros((x.shape[0], n), jnp.float32))


def kernel_tier(w: Weights) -> pallas_kernels.grouped_matmul.Tier:
    """`w` as the Pallas expert kernels take a tier: its arrays and their layout."""
    if isinstance(w, QuantizedTensor):
        return (w.packed, w.scales, w.zeros), w.layout
    if isinstance(w, Mxfp4Tensor):
        return (w.blocks, w.scales), w.layout
    return (w,), None


# ------------------------------------------------------------------------- XLA loop path


def _xla_loop(rows: tuple, keys, *, num_groups: int, rows_per_tier: int, width: int, out_dtype, tile_fn):
    """Sorted rows tile by tile: `rows` is (x [P, K], and any per-row operands [P, ...]: the
    experts' biases), `tile_fn(tier, row, *tiles of rows [tm, ...])` -> [tm, width]. Rows no
    tile covers come out as zeros."""
    P = rows[0].shape[0]
    tm = xla_tile_rows(P, num_groups)
    tiles = pallas_kernels.plan_tiles(keys, tm, pallas_kernels.max_tiles(P, num_groups, tm))
    tier, row = pallas_kernels.split_key(tiles, rows_per_tier)
    padded = [jnp.pad(a, ((0, tm), (0, 0))) for a in rows]

    def body(t, out):
        y = tile_fn(tier[t], row[t], *(jax.lax.dynamic_slice_in_dim(a, tiles.start[t], tm) for a in padded))
        # Tiles run in row order, so rows a tile computes past its expert's end are rewritten
        # by the tiles that own them (or land in the spare rows).
        return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), tiles.start[t], 0)

    return jax.lax.fori_loop(0, tiles.count, body, jnp.zeros((P + tm, width), out_dtype))[:P]


def _switch(tier, branches, *operands):
    return branches[0](*operands) if len(branches) == 1 else jax.lax.switch(tier, branches, *operands)


# ----------------------------------------------------------------------- Pallas path


def _pallas_plan(xs, keys, num_groups: int, rows_per_tier: int):
    P = xs.shape[0]
    tm = pallas_kernels.default_block_m(P, num_groups)
    if P <= ROW_TILES_MAX:
        tiles = pallas_kernels.row_tiles(keys, tm)
    else:
        tiles = pallas_kernels.plan_tiles(keys, tm, pallas_kernels.max_tiles(P, num_groups, tm))
    return tm, tiles, jnp.pad(xs, ((0, tm), (0, 0)))


def _pallas_supported(k: int, weights: Sequence[Weights], num_rows: int, num_groups: int) -> bool:
    n = weights[0].shape[-1]
    layouts = [kernel_tier(w)[1] for w in weights]
    tm = pallas_kernels.default_block_m(num_rows, num_groups)
    bn = pallas_kernels.default_block_n(n, num_rows)
    return pallas_kernels.gpu_unsupported_reason(k, n, layouts, block_m=tm, block_n=bn) is None


def _tiled(xp, weights, tiles, rows_per_tier, tm, out_dtype, interpret: bool):
    return pallas_kernels.tiled_matmul(xp, [kernel_tier(w) for w in weights], tiles, rows_per_tier=rows_per_tier,
                                       n=weights[0].shape[-1], tm=tm, out_dtype=out_dtype, interpret=interpret)


# ------------------------------------------------------------------------------ FFNs


def routed_ffn(state: ExpertState, layer, x, expert_ids, weights, token_valid, residual=None, *,
               activation: Activation = swiglu):
    """MoE experts of MoE layer `layer` (an int or a traced index) for routed pairs.

    x [T, H]; expert_ids, weights [T, k]: each token's experts and combine weights;
    token_valid [T] bool, or [T, k] per pair: pairs of invalid tokens (padding) or invalid
    pairs (big-little's dropped ones) are not computed (sorted past every tile: no rows, no
    weight reads), nor are pairs whose expert's handle has a negative row (not available to
    this call). Each expert computes activation(x @ gate_up + gate_up_bias) @ down + down_bias
    (biases where the state has them).
    -> `residual` [T, H] (default zeros) plus the weighted expert outputs, in x's dtype.
    """
    T, k = expert_ids.shape
    P = T * k
    tier = state.tier_of[layer][expert_ids]  # [T, k]
    row = state.row_of[layer][expert_ids]
    valid = (token_valid if token_valid.ndim == 2 else token_valid[:, None]) & (row >= 0)
    R = state.rows_per_tier
    keys = jnp.where(valid, tier * R + row, INVALID).reshape(-1)  # [P]
    order = jnp.argsort(keys, stable=True)
    keys = keys[order]
    token_of = order // k
    xs = x[token_of]  # [P, H]
    E = state.num_experts
    dt = x.dtype
    f32 = jnp.float32
    # Biases are indexed by (layer, expert), not by the tier serving it: every tier (fallback,
    # slots) adds the same full-precision rows, gathered per sorted pair.
    if state.gate_up_bias is not None:
        pair_expert = expert_ids.reshape(P)[order]
        bias_rows = (state.gate_up_bias[layer, pair_expert].astype(f32),  # [P, 2I]
                     state.down_bias[layer, pair_expert].astype(f32))  # [P, H]
    else:
        bias_rows = ()

    def elsewhere(xs, keys, *bias):
        def tier_ffn(t, row, xt, *b):  # b: the tile's (gate_up, down) bias rows, if any
            h = _blocked_dot(xt, t.gate_up, row)
            h = activation((h + b[0] if b else h).astype(dt))
            y = _blocked_dot(h, t.down, row)
            return (y + b[1] if b else y).astype(dt)

        branches = [lambda row, xt, *b, t=t: tier_ffn(t, row, xt, *b) for t in state.tiers]

        def ffn(tier, row, xt, *b):
            return _switch(tier, branches, row, xt, *b)

        return _xla_loop((xs,) + bias, keys, num_groups=E, rows_per_tier=R, width=x.shape[1], out_dtype=dt,
                         tile_fn=ffn)

    def cuda(xs, keys, *bias):
        gu, dn = [t.gate_up for t in state.tiers], [t.down for t in state.tiers]
        H = xs.shape[1]
        I = dn[0].shape[1]
        if not (_pallas_supported(H, gu, P, E) and _pallas_supported(I, dn, P, E)):
            return elsewhere(xs, keys, *bias)
        tm, tiles, xp = _pallas_plan(xs, keys, E, R)
        pad = lambda b: jnp.pad(b, ((0, tm), (0, 0)))
        h = _tiled(xp, gu, tiles, R, tm, f32 if bias else dt, interpret=False)  # [P + tm, 2I]
        h = activation((h + pad(bias[0]) if bias else h).astype(dt))
        y = _tiled(h, dn, tiles, R, tm, f32 if bias else dt, interpret=False)[:P]
        return (y + bias[1] if bias else y).astype(dt)

    ys = jax.lax.platform_dependent(xs, keys, *bias_rows, cuda=cuda, default=elsewhere)
    used = keys != INVALID
    w = jnp.where(used, weights.reshape(-1)[order], 0).astype(dt)
    ys = jnp.where(used[:, None], ys, 0) * w[:, None]  # rows no tile stored are undefined on GPU
    return (jnp.zeros_like(x) if residual is None else residual).at[token_of].add(ys)


def grouped_matmul(x, w: Weights, group_sizes, *, backend: str | None = None, out_dtype=None):
    """Rows of `x` [T, K], sorted by group, times `w[g]` [K, N] for their group g -> [T, N].

    `jax.lax.ragged_dot` semantics: `group_sizes` [G] counts rows per group; rows past their
    sum come out zero (a sum past T is clamped, never read out of bounds). `w` is a dense
    [G, K, N] array, a `QuantizedTensor` or an `Mxfp4Tensor`. backend None: the Pallas kernel when lowering for
    CUDA (if its shape limits allow), the XLA tile loop elsewhere; "pallas": the kernel
    everywhere (interpreted off GPU); "xla": the tile loop everywhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    T = x.shape[0]
    G = w.shape[0]
    dt = out_dtype or x.dtype
    if T == 0:
        return jnp.zeros((0, w.shape[-1]), dt)
    keys = pallas_kernels.group_keys(group_sizes, T)

    def xla(x, keys):
        tile_fn = lambda tier, row, xt: _blocked_dot(xt, w, row)
        return _xla_loop((x,), keys, num_groups=G, rows_per_tier=G, width=w.shape[-1], out_dtype=dt, tile_fn=tile_fn)

    def pallas(interpret: bool):
        def run(x, keys):
            if not interpret and not _pallas_supported(x.shape[1], [w], T, G):
                return xla(x, keys)
            tm, tiles, xp = _pallas_plan(x, keys, G, G)
            return _tiled(xp, [w], tiles, G, tm, dt, interpret)[:T]

        return run

    if backend == "xla":
        y = xla(x, keys)
    elif backend == "pallas":
        y = jax.lax.platform_dependent(x, keys, cuda=pallas(False), default=pallas(True))
    else:
        y = jax.lax.platform_dependent(x, keys, cuda=pallas(False), default=xla)
    return jnp.where((keys != INVALID)[:, None], y, 0).astype(dt)
