"""Grouped matmuls over rows sorted by expert: packed low-bit weights or dense bf16 weights.

One Pallas kernel body serves both: the grid is (row tile, N block); a row tile knows its
expert (see `tiling.py`), loops over K, and for each step loads only that expert's weight
tile, unpacks the codes in registers (shift, mask) for a tensor-core dot with f32
accumulation, and applies each group's scale and zero to the partial sums (`_quant_step`).
The bf16 weights of a quantized expert never exist in memory, and experts without rows are
never touched, so decode reads the active experts' packed bytes and nothing else.

GPU lowering: Pallas on Triton, chosen explicitly with `plgpu.CompilerParams` because jax >=
0.10 defaults `pl.pallas_call` to Mosaic GPU. Triton's mma takes 16-row tiles, which suits
decode (a few rows per expert); Mosaic GPU's wgmma wants 64-row warpgroup tiles and jax's
Mosaic GPU mixed-type example handles int8 only. The same kernel runs with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dynaexq_jax.experts.quant import QuantizedTensor, slices_per_group
from pallas_kernels.tiling import make_row_tiles


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def default_block_m(num_rows: int, num_groups: int) -> int:
    """Rows per tile: 16 for decode (the mma minimum), up to 64 as rows per expert grow."""
    per_expert = -(-num_rows // max(1, min(num_groups, num_rows)))
    return min(64, max(16, 1 << (per_expert - 1).bit_length()))


def default_block_n(n: int, num_rows: int) -> int:
    """Columns per program: narrow for decode (more programs in flight), wider for prefill."""
    prefer = (64, 32, 128, 16) if num_rows <= 256 else (128, 64, 32, 16)
    return next((b for b in prefer if n % b == 0), n)


def gpu_unsupported_reason(k: int, n: int, *, bits=None, group_size=None, block_m=16,
                           block_n=None, block_k=None) -> str | None:
    """Why the compiled (Triton) kernel cannot run these shapes, or None if it can."""
    bn = block_n or default_block_n(n, 0)
    if not (_is_pow2(bn) and bn >= 16 and n % bn == 0):
        return f"N={n} needs a power-of-two block_n >= 16 dividing it"
    if not (_is_pow2(block_m) and block_m >= 16):
        return f"block_m={block_m} must be a power of two >= 16"
    if bits is not None:
        r = group_size // slices_per_group(bits)
        if not (_is_pow2(r) and r >= 16):
            return (f"{bits}-bit, group_size={group_size} gives {r}-row slices; the GPU kernel "
                    f"needs a power of two >= 16 (group_size >= {16 * slices_per_group(bits)})")
    elif block_k is not None and not (_is_pow2(block_k) and block_k >= 16 and k % block_k == 0):
        return f"K={k} needs a power-of-two block_k >= 16 dividing it"
    return None


# --------------------------------------------------------------------------- K steps
# A step function returns one K step's [tm, bn] f32 contribution for the rows of `xload`.


def _quant_step(w_refs, xload, e, step, n0, *, bits, group_size, groups_per_step, bn):
    """Dots of raw codes, then the group's affine map on the [tm, bn] partial sums:

        sum_k x_k (q_k - z) s = s * (x . q) - (z s) * sum_k x_k

    so per weight only shift, mask and convert remain (codes <= 255 are exact in bf16), and
    the scale/zero work is per output element instead of per weight.
    """
    p_ref, s_ref, z_ref = w_refs
    s = slices_per_group(bits)
    r = group_size // s
    total = None
    for u in range(groups_per_step):
        gi = step * groups_per_step + u
        scale = s_ref[e, pl.ds(gi, 1), pl.ds(n0, bn)].astype(jnp.float32)  # [1, bn]
        zero_scaled = z_ref[e, pl.ds(gi, 1), pl.ds(n0, bn)].astype(jnp.float32) * scale
        base = gi * (group_size * bits // 8)  # first packed row of group gi
        if bits == 3:
            planes = [p_ref[e, pl.ds(base + b * r, r), pl.ds(n0, bn)].astype(jnp.int32)
                      for b in range(3)]  # 3 x [R, bn]
            codes = [((planes[0] >> p) & 1) | (((planes[1] >> p) & 1) << 1)
                     | (((planes[2] >> p) & 1) << 2) for p in range(s)]
        else:
            packed = p_ref[e, pl.ds(base, r), pl.ds(n0, bn)].astype(jnp.int32)  # [R, bn]
            codes = [(packed >> (p * bits)) & ((1 << bits) - 1) for p in range(s)]
        dots = xsum = 0.0
        for p, q in enumerate(codes):
            xk = xload(gi * group_size + p * r, r)  # [tm, R]
            dots += jnp.dot(xk, q.astype(xk.dtype), preferred_element_type=jnp.float32)
            xsum += jnp.sum(xk.astype(jnp.float32), axis=1, keepdims=True)  # [tm, 1]
        part = dots * scale - xsum * zero_scaled
        total = part if total is None else total + part
    return total


def _dense_step(w_refs, xload, e, step, n0, *, block_k, bn):
    (w_ref,) = w_refs
    k0 = step * block_k
    w = w_ref[e, pl.ds(k0, block_k), pl.ds(n0, bn)]  # [bk, bn]
    return jnp.dot(xload(k0, block_k), w, preferred_element_type=jnp.float32)


def _kernel(te_ref, rs_ref, re_ref, x_ref, *refs, k_step, num_steps, tm, bn):
    *w_refs, o_ref = refs
    # program_id outside pl.when: interpret mode only substitutes it at the kernel's top level.
    t = pl.program_id(0)
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    e = te_ref[t]

    @pl.when(e >= 0)
    def _():
        rs = rs_ref[t]
        xload = lambda k0, width: x_ref[pl.ds(rs, tm), pl.ds(k0, width)]  # [tm, width]
        body = lambda step, acc: acc + k_step(w_refs, xload, e, step, n0)
        acc = jax.lax.fori_loop(0, num_steps, body, jnp.zeros((tm, bn), jnp.float32))
        # Rows past the expert's end belong to the next expert's tiles: do not store them.
        rows = rs + jax.lax.broadcasted_iota(jnp.int32, (tm, bn), 0)
        plgpu.store(o_ref.at[pl.ds(rs, tm), pl.ds(n0, bn)], acc.astype(o_ref.dtype),
                    mask=rows < re_ref[t])


def _run(name, x, w_arrays, group_sizes, n, *, k_step, num_steps, tm, bn, out_dtype,
         interpret, num_warps, num_stages):
    t_rows = x.shape[0]
    if t_rows == 0:
        return jnp.zeros((0, n), out_dtype)
    tiles = make_row_tiles(group_sizes, t_rows, tm)
    num_tiles = tiles.expert.shape[0]
    # tm spare rows so the last tile's read stays in bounds; its extra rows are masked.
    x_pad = jnp.pad(x, ((0, tm), (0, 0)))  # [T + tm, K]
    out = pl.pallas_call(
        functools.partial(_kernel, k_step=k_step, num_steps=num_steps, tm=tm, bn=bn),
        out_shape=jax.ShapeDtypeStruct((t_rows + tm, n), out_dtype),
        grid=(num_tiles, n // bn),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(tiles.expert, tiles.row_start, tiles.row_end, x_pad, *w_arrays)
    rows = jnp.arange(t_rows)[:, None]
    return jnp.where(rows < tiles.num_valid_rows, out[:t_rows], 0).astype(out_dtype)


def _resolve(interpret, num_rows, num_groups, n, block_m, block_n):
    if interpret is None:
        interpret = not _on_gpu()
    tm = block_m or default_block_m(num_rows, num_groups)
    bn = block_n or default_block_n(n, num_rows)
    if n % bn:
        raise ValueError(f"block_n={bn} must divide N={n}.")
    return interpret, tm, bn


def _check_rows(x, group_sizes, num_groups, k):
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [T, K={k}], got shape {x.shape}.")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must be [{num_groups}], got shape {group_sizes.shape}.")


def grouped_dequant_matmul(x, qt: QuantizedTensor, group_sizes, *, interpret=None,
                           preferred_element_type=None, block_m=None, block_n=None,
                           block_k=None, num_warps=4, num_stages=3):
    """`x` [T, K] (rows sorted by expert) times dequantized `qt` [E, K, N] -> [T, N].

    `group_sizes` [E] int32 sums to at most T (`jax.lax.ragged_dot` semantics; rows past the
    sum come out zero). Dots run in x's dtype with f32 accumulation; the result is in
    `preferred_element_type` (default x's dtype). interpret=None: compiled on GPU, interpreted
    elsewhere.
    """
    if qt.ndim != 3:
        raise ValueError(f"qt must be stacked [E, K, N], got logical shape {qt.shape}.")
    e, k, n = qt.shape
    _check_rows(x, group_sizes, e, k)
    interpret, tm, bn = _resolve(interpret, x.shape[0], e, n, block_m, block_n)
    if not interpret:
        reason = gpu_unsupported_reason(k, n, bits=qt.bits, group_size=qt.group_size,
                                        block_m=tm, block_n=bn)
        if reason:
            raise ValueError(f"grouped_dequant_matmul on GPU: {reason}.")
    g = qt.group_size
    # K rows per loop step: whole groups, >= 256 when K allows, for more bytes in flight.
    bk = block_k or next((m * g for m in (256 // g, 2, 1) if m >= 1 and k % (m * g) == 0), g)
    if bk % g or k % bk:
        raise ValueError(f"block_k={bk} must be a multiple of group_size={g} dividing K={k}.")
    step = functools.partial(_quant_step, bits=qt.bits, group_size=g, groups_per_step=bk // g,
                             bn=bn)
    return _run("grouped_dequant_matmul", x, (qt.packed, qt.scales, qt.zeros), group_sizes, n,
                k_step=step,
                num_steps=k // bk, tm=tm, bn=bn,
                out_dtype=preferred_element_type or x.dtype, interpret=interpret,
                num_warps=num_warps, num_stages=num_stages)


def grouped_matmul_dense(x, w, group_sizes, *, interpret=None, preferred_element_type=None,
                         block_m=None, block_n=None, block_k=None, num_warps=4, num_stages=3):
    """Same contract as `grouped_dequant_matmul` for dense `w` [E, K, N] (e.g. bf16 slots)."""
    e, k, n = w.shape
    _check_rows(x, group_sizes, e, k)
    interpret, tm, bn = _resolve(interpret, x.shape[0], e, n, block_m, block_n)
    bk = block_k or next((b for b in (128, 64, 32, 16) if k % b == 0), k)
    if k % bk:
        raise ValueError(f"block_k={bk} must divide K={k}.")
    if not interpret:
        reason = gpu_unsupported_reason(k, n, block_m=tm, block_n=bn, block_k=bk)
        if reason:
            raise ValueError(f"grouped_matmul_dense on GPU: {reason}.")
    step = functools.partial(_dense_step, block_k=bk, bn=bn)
    return _run("grouped_matmul_dense", x.astype(w.dtype), (w,), group_sizes, n, k_step=step,
                num_steps=k // bk,
                tm=tm, bn=bn, out_dtype=preferred_element_type or x.dtype,
                interpret=interpret, num_warps=num_warps, num_stages=num_stages)
