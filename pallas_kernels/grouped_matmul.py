"""Grouped matmul over row tiles whose weights come from one of several tiers.

`tiled_matmul(x, tiers, tiles, rows_per_tier=R)`: tile t multiplies its rows of `x` by weight
`key % R` of tier `key // R`, `key = tiles.key[t]` (the kernel splits the key itself: one
planning kernel less per call). A tier is dense ([R, K, N], e.g. bf16 slots) or
packed low-bit codes with per-group scales and zeros ([R, K*bits/8, N] uint8 + [R, K/g, N]),
in the layout `dynaexq_jax.experts.quant` describes, or MXFP4 as checkpoints ship it (e2m1
codes [R, N, K/2] uint8 + e8m0 scales [R, N, K/32], decoded by arithmetic in `_mxfp4_step`).
One call covers every tier, so a MoE layer whose experts sit in a bf16 slot pool and in int4
fallbacks is one kernel launch per matrix, and it reads exactly the weights of the experts
that have rows, once per N block.

Grid (tile, N block). A program loads its tier and row from the tile tables, loops over K,
and for packed tiers unpacks codes in registers (shift, mask) for a tensor-core dot with f32
accumulation, applying each group's scale and zero to the partial sums (`_packed_step`); the
bf16 weights of a packed expert never exist in memory.

GPU lowering: Pallas on Triton, chosen with `plgpu.CompilerParams`. Triton's mma takes
16-row tiles, which suits decode (a few rows per expert); Mosaic GPU's wgmma wants 64-row
warpgroup tiles. The same kernel runs with `interpret=True` on any backend (tests).
float32 inputs use IEEE float32 dots (no TF32), so float32 means float32 on the GPU too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tiling import INVALID, Tiles


@dataclasses.dataclass(frozen=True)
class Packed:
    """Static layout of a packed tier: `bits` per code, `group_size` rows per scale/zero, and
    the group cut into `slices` K-slices of group_size/slices rows, one shift each."""

    bits: int
    group_size: int
    slices: int

    @property
    def slice_rows(self) -> int:
        return self.group_size // self.slices


@dataclasses.dataclass(frozen=True)
class Mxfp4:
    """Static layout of an MXFP4 tier: blocks uint8 [R, N, K/2] (two e2m1 codes a byte, the lower
    K index in the low nibble) and e8m0 scales uint8 [R, N, K/32], as checkpoints store them."""

    block: int = 32  # values per scale along K


# A tier: ((w,), None) dense, ((packed, scales, zeros), Packed(...)), or ((blocks, scales), Mxfp4()).
Tier = tuple[tuple[jax.Array, ...], "Packed | Mxfp4 | None"]


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def default_block_m(num_rows: int, num_groups: int) -> int:
    """Rows per tile: 16 for decode (the mma minimum), up to 128 as rows per group grow (a
    group's weights are read once per tile: bigger tiles, fewer reads in prefill)."""
    per_group = -(-num_rows // max(1, min(num_groups, num_rows)))
    return min(128, max(16, 1 << (per_group - 1).bit_length()))


def default_block_n(n: int, num_rows: int) -> int:
    """Columns per program: narrow for decode (more programs in flight), wider for prefill."""
    prefer = (64, 32, 128, 16) if num_rows <= 256 else (128, 64, 32, 16)
    return next((b for b in prefer if n % b == 0), n)


def gpu_unsupported_reason(k: int, n: int, layouts: Sequence["Packed | None"], *, block_m: int,
                           block_n: int) -> str | None:
    """Why the compiled (Triton) kernel cannot run these shapes, or None if it can."""
    if not (_is_pow2(block_n) and block_n >= 16 and n % block_n == 0):
        return f"N={n} needs a power-of-two block_n >= 16 dividing it"
    if not (_is_pow2(block_m) and block_m >= 16):
        return f"block_m={block_m} must be a power of two >= 16"
    for lay in layouts:
        if lay is None:
            if _dense_block_k(k) is None:
                return f"K={k} needs a power-of-two block_k >= 16 dividing it"
        elif isinstance(lay, Mxfp4):
            if k % lay.block:
                return f"MXFP4 needs K={k} to be a multiple of {lay.block}"
        elif not (_is_pow2(lay.slice_rows) and lay.slice_rows >= 16):
            return (f"{lay.bits}-bit, group_size={lay.group_size} gives {lay.slice_rows}-row slices; the GPU "
                    f"kernel needs a power of two >= 16 (group_size >= {16 * lay.slices})")
    return None


def _dense_block_k(k: int) -> int | None:
    return next((b for b in (128, 64, 32, 16) if k % b == 0), None)


# --------------------------------------------------------------------------- K steps
# A step returns one K step's [tm, bn] f32 contribution for the rows `xload` gives.


def _dense_step(refs, xload, row, step, n0, *, bk, bn, precision):
    (w_ref,) = refs
    k0 = step * bk
    w = w_ref[row, pl.ds(k0, bk), pl.ds(n0, bn)]  # [bk, bn]
    x = xload(k0, bk)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)


def _packed_step(refs, xload, row, step, n0, *, lay: Packed, groups_per_step, bn, precision):
    """Dots of raw codes, then the group's affine map on the [tm, bn] partial sums:

        sum_k x_k (q_k - z) s = s * (x . q) - (z s) * sum_k x_k

    so per weight only shift, mask and convert remain (codes <= 255 are exact in bf16), and
    the scale/zero work is per output element instead of per weight.
    """
    p_ref, s_ref, z_ref = refs
    bits, g, r = lay.bits, lay.group_size, lay.slice_rows
    total = None
    for u in range(groups_per_step):
        gi = step * groups_per_step + u
        scale = s_ref[row, pl.ds(gi, 1), pl.ds(n0, bn)].astype(jnp.float32)  # [1, bn]
        zero_scaled = z_ref[row, pl.ds(gi, 1), pl.ds(n0, bn)].astype(jnp.float32) * scale
        base = gi * (g * bits // 8)  # first packed row of group gi
        if bits == 3:
            planes = [p_ref[row, pl.ds(base + b * r, r), pl.ds(n0, bn)].astype(jnp.int32) for b in range(3)]
            codes = [((planes[0] >> p) & 1) | (((planes[1] >> p) & 1) << 1) | (((planes[2] >> p) & 1) << 2)
                     for p in range(lay.slices)]
        else:
            packed = p_ref[row, pl.ds(base, r), pl.ds(n0, bn)].astype(jnp.int32)  # [R, bn]
            codes = [(packed >> (p * bits)) & ((1 << bits) - 1) for p in range(lay.slices)]
        dots = xsum = 0.0
        for p, q in enumerate(codes):
            xk = xload(gi * g + p * r, r)  # [tm, R]
            dots += jnp.dot(xk, q.astype(xk.dtype), preferred_element_type=jnp.float32, precision=precision)
            xsum += jnp.sum(xk.astype(jnp.float32), axis=1, keepdims=True)  # [tm, 1]
        part = dots * scale - xsum * zero_scaled
        total = part if total is None else total + part
    return total


def e2m1_decode(codes):
    """float32 values of e2m1 codes (an int array): sign, 2 exponent bits, 1 mantissa bit, decoded
    by arithmetic, since a Triton program cannot index a table held in registers."""
    codes = codes.astype(jnp.int32)
    e, m = (codes >> 1) & 3, (codes & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (2.0 + m) * (1 << e).astype(jnp.float32) * 0.25)
    return jnp.where(codes >= 8, -mag, mag)


def e8m0_decode(scales):
    """float32 2**(s - 127) of e8m0 scale bytes, exactly: the byte is the float's exponent field.
    s = 0 (2**-127) gives 0: like any product below float32's normal range, which XLA and the
    GPU flush to zero anyway (weights that small are zeros to any activation)."""
    return jax.lax.bitcast_convert_type(scales.astype(jnp.int32) << 23, jnp.float32)


def nibble_order(x, block: int = 32):
    """x [P, K] with each `block` of columns reordered evens first, then odds ([0, 2, .., 30, 1,
    3, .., 31]): the order of an MXFP4 block's low nibbles, then its high ones. The kernel dots
    decoded nibbles with contiguous slices of this copy, so it never interleaves nibbles
    (which Triton does poorly) nor loads strided columns (which interpret mode cannot)."""
    p, k = x.shape
    return jnp.swapaxes(x.reshape(p, k // block, block // 2, 2), -1, -2).reshape(p, k)


def _mxfp4_step(refs, xload, row, step, n0, *, lay: Mxfp4, blocks_per_step, bn, precision):
    """Per 32-value block along K: the [bn, 16] bytes decode to the block's even-K values (low
    nibbles) and odd-K values (high nibbles), scaled by the block's power of two (exact in bf16),
    each dotted with the matching 16 columns of x in nibble order (`nibble_order`)."""
    b_ref, s_ref, xn_ref = refs
    half = lay.block // 2
    total = None
    for u in range(blocks_per_step):
        gi = step * blocks_per_step + u
        scale = e8m0_decode(s_ref[row, pl.ds(n0, bn), pl.ds(gi, 1)])  # [bn, 1]
        byts = b_ref[row, pl.ds(n0, bn), pl.ds(gi * half, half)].astype(jnp.int32)  # [bn, 16]
        for nibble, codes in enumerate((byts & 0x0F, byts >> 4)):
            xk = xload(gi * lay.block + nibble * half, half, xn_ref)  # [tm, 16]: K = 32 gi + nibble + 2i
            w = (e2m1_decode(codes) * scale).astype(xk.dtype)  # [bn, 16]
            d = jnp.dot(xk, w.T, preferred_element_type=jnp.float32, precision=precision)  # [tm, bn]
            total = d if total is None else total + d
    return total


def _kernel(key_ref, *refs, steps, arity, tm, bn, row_tiles: bool, rows_per_tier: int):
    if row_tiles:  # tile t starts at row t
        end_ref, x_ref, *refs = refs
    else:
        start_ref, end_ref, x_ref, *refs = refs
    *w_refs, o_ref = refs
    # program_id outside pl.when: interpret mode only substitutes it at the kernel's top level.
    t = pl.program_id(0)
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    key, re = key_ref[t], end_ref[t]
    tier = jnp.where(key == INVALID, -1, key // rows_per_tier)  # -1: an unused tile, no branch runs
    row = key % rows_per_tier
    rs = t if row_tiles else start_ref[t]
    xload = _row_loader(x_ref, rs, re, tm)
    first = 0
    for i, ((step, num_steps), n_refs) in enumerate(zip(steps, arity)):
        _tier_branch(tier == i, step, num_steps, tuple(w_refs[first:first + n_refs]), xload, row, rs, re, n0, o_ref,
                     tm, bn)
        first += n_refs


def _row_loader(x_ref, rs, re, tm):
    """Loads of rows rs..rs+tm of x, those from `re` on masked: a GPU fetches only the tile's
    own rows (x is padded, so the block itself never leaves the array)."""
    def load(k0, width, ref=None):  # ref: a copy of x in another column order (same rows)
        rows = rs + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
        return plgpu.load((x_ref if ref is None else ref).at[pl.ds(rs, tm), pl.ds(k0, width)], mask=rows < re,
                          other=0)  # [tm, width]

    return load


def _tier_branch(active, step, num_steps, refs, xload, row, rs, re, n0, o_ref, tm, bn):
    @pl.when(active)
    def _():
        body = lambda s, acc: acc + step(refs, xload, row, s, n0)
        acc = jax.lax.fori_loop(0, num_steps, body, jnp.zeros((tm, bn), jnp.float32))
        # Rows past the group's end belong to the next group's tiles: do not store them.
        rows = rs + jax.lax.broadcasted_iota(jnp.int32, (tm, bn), 0)
        plgpu.store(o_ref.at[pl.ds(rs, tm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=rows < re)


def tier_steps(tiers: Sequence[Tier], k: int, n: int, bn: int, precision, xn=None):
    """Per tier, its K step and the number of steps over K, how many arrays it passes the
    kernel, and those arrays in order (an MXFP4 tier's followed by `xn`, x in nibble order)."""
    steps, arity, arrays = [], [], []
    for ws, lay in tiers:
        if isinstance(lay, Mxfp4):
            if ws[0].shape[1:] != (n, k // 2) or k % lay.block:
                raise ValueError(f"MXFP4 blocks {ws[0].shape} do not match x [.., {k}] and N={n}.")
            # whole 32-value blocks per loop step, up to 256 values when K allows
            bk = next(m * lay.block for m in (8, 4, 2, 1) if k % (m * lay.block) == 0)
            step = functools.partial(_mxfp4_step, lay=lay, blocks_per_step=bk // lay.block, bn=bn,
                                     precision=precision)
            steps.append((step, k // bk))
            ws = tuple(ws) + (xn,)
        elif ws[0].shape[1:] != ((k if lay is None else k * lay.bits // 8), n):
            raise ValueError(f"tier weights {ws[0].shape} do not match x [.., {k}] and N={n}.")
        elif lay is None:
            bk = _dense_block_k(k) or k
            step = functools.partial(_dense_step, bk=bk, bn=bn, precision=precision)
            steps.append((step, k // bk))
        else:
            g = lay.group_size
            # K rows per loop step: whole groups, >= 256 when K allows, for more bytes in flight.
            bk = next((m * g for m in (256 // g, 2, 1) if m >= 1 and k % (m * g) == 0), g)
            step = functools.partial(_packed_step, lay=lay, groups_per_step=bk // g, bn=bn, precision=precision)
            steps.append((step, k // bk))
        arity.append(len(ws))
        arrays.extend(ws)
    return tuple(steps), tuple(arity), arrays


def tiled_matmul(x, tiers: Sequence[Tier], tiles: Tiles, *, rows_per_tier: int, n: int, tm: int,
                 out_dtype, interpret: bool, block_n: int | None = None, num_warps: int = 4,
                 num_stages: int = 3, name: str = "tiled_matmul"):
    """Rows of `x` [P + tm, K] (sorted by group, `tm` spare rows at the end) times their tile's
    weights -> [P + tm, N]. Rows no tile stores (INVALID keys, the spare rows) are undefined:
    callers mask them. A tile's key is `tier * rows_per_tier + row` (INVALID: unused).
    """
    p_rows, k = x.shape
    bn = block_n or default_block_n(n, p_rows - tm)
    if n % bn:
        raise ValueError(f"block_n={bn} must divide N={n}.")
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    xn = nibble_order(x) if any(isinstance(lay, Mxfp4) for _, lay in tiers) else None
    steps, arity, arrays = tier_steps(tiers, k, n, bn, precision, xn)
    if not interpret:
        reason = gpu_unsupported_reason(k, n, [lay for _, lay in tiers], block_m=tm, block_n=bn)
        if reason:
            raise ValueError(f"tiled_matmul on GPU: {reason}.")
    num_tiles = tiles.key.shape[0]
    row_tiles = tiles.start is None
    num_warps = max(num_warps, tm * bn // 2048)  # big accumulators need the registers of 8 warps
    starts = () if row_tiles else (tiles.start,)
    return pl.pallas_call(
        functools.partial(_kernel, steps=steps, arity=arity, tm=tm, bn=bn, row_tiles=row_tiles,
                          rows_per_tier=rows_per_tier),
        out_shape=jax.ShapeDtypeStruct((p_rows, n), out_dtype),
        grid=(num_tiles, n // bn),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{name}_tm{tm}",  # tm in the name: what the AOT report's byte count needs
    )(tiles.key, *starts, tiles.end, x, *arrays)


def _layer_kernel(layer_ref, x_ref, w_ref, o_ref, *, step, num_steps, tm, bn, rows):
    t = pl.program_id(0)
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    layer = layer_ref[0]
    rs = t * tm
    xload = _row_loader(x_ref, rs, rows, tm)
    acc = jax.lax.fori_loop(0, num_steps, lambda s, acc: acc + step((w_ref,), xload, layer, s, n0),
                            jnp.zeros((tm, bn), jnp.float32))
    r = rs + jax.lax.broadcasted_iota(jnp.int32, (tm, bn), 0)
    plgpu.store(o_ref.at[pl.ds(rs, tm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=r < rows)


def _layer_tiles(M: int, N: int, block_n: int | None = None) -> tuple[int, int]:
    return max(16, min(64, 1 << (M - 1).bit_length())), block_n or default_block_n(N, M)


def layer_matmul_supported(K: int, N: int, M: int) -> bool:
    """Whether the compiled kernel takes these shapes (else use XLA's dot)."""
    tm, bn = _layer_tiles(M, N)
    return gpu_unsupported_reason(K, N, [None], block_m=tm, block_n=bn) is None


def layer_matmul(x, w, layer, *, out_dtype, interpret: bool, block_n: int | None = None, num_warps: int = 4,
                 num_stages: int = 3):
    """`x` [M, K] times `w[layer]` [K, N] of a stacked weight `w` [L, K, N] -> [M, N], reading
    the layer's weights in place (no slice of the stack is copied). For small M (decode)."""
    M, K = x.shape
    N = w.shape[-1]
    tm, bn = _layer_tiles(M, N, block_n)
    n_tiles = -(-M // tm)
    bk = _dense_block_k(K) or K
    if not interpret:
        reason = gpu_unsupported_reason(K, N, [None], block_m=tm, block_n=bn)
        if reason:
            raise ValueError(f"layer_matmul on GPU: {reason}.")
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    step = functools.partial(_dense_step, bk=bk, bn=bn, precision=precision)
    xp = jnp.pad(x, ((0, n_tiles * tm - M), (0, 0)))  # whole tiles: loads stay in bounds
    out = pl.pallas_call(
        functools.partial(_layer_kernel, step=step, num_steps=K // bk, tm=tm, bn=bn, rows=M),
        out_shape=jax.ShapeDtypeStruct((n_tiles * tm, N), out_dtype),
        grid=(n_tiles, N // bn),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"layer_matmul_tm{tm}_m{M}",  # tile and real rows: what the AOT report's byte count needs
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), xp, w)
    return out[:M]


def split_key(tiles: Tiles, rows_per_tier: int):
    """(tier, row) [M] of each tile from keys `tier * rows_per_tier + row`; -1 for unused tiles."""
    used = tiles.key != INVALID
    return (jnp.where(used, tiles.key // rows_per_tier, -1).astype(jnp.int32),
            jnp.where(used, tiles.key % rows_per_tier, 0).astype(jnp.int32))


# --------------------------------------------------------------------------- references
# What the kernels compute, the plain way and in pure jnp (weights decoded whole, float32
# dots at HIGHEST precision): the yardstick of tests, bench_kernels.py and gpu_check.py.


def tier_weights(tier: Tier) -> jax.Array:
    """A tier's weights decoded to float32 [R, K, N]: dense as they are, packed codes as
    (q - zero) * scale per group, MXFP4 as e2m1 values times their block's power of two."""
    ws, lay = tier
    f32 = jnp.float32
    if lay is None:
        return ws[0].astype(f32)
    if isinstance(lay, Mxfp4):
        blocks, scales = ws  # [R, N, K/2], [R, N, K/32]
        codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)  # [R, N, K]
        values = e2m1_decode(codes) * jnp.repeat(e8m0_decode(scales), lay.block, axis=-1)
        return jnp.swapaxes(values, -1, -2)
    packed, scales, zeros = ws  # [R, K*bits/8, N], [R, K/g, N] twice
    bits, g, r = lay.bits, lay.group_size, lay.slice_rows
    rows, kp, n = packed.shape
    k = kp * 8 // bits
    shifts = jnp.arange(lay.slices).reshape(lay.slices, 1, 1)  # slice p of a group: shift p (3 bits: bit planes)
    p = packed.astype(jnp.int32)
    if bits == 3:
        p = p.reshape(rows, k // g, 3, 1, r, n)
        q = sum(((p[:, :, b] >> shifts) & 1) << b for b in range(3))
    else:
        q = (p.reshape(rows, k // g, 1, r, n) >> (shifts * bits)) & ((1 << bits) - 1)  # [R, K/g, slices, r, N]
    q = q.reshape(rows, k, n).astype(f32)
    return (q - jnp.repeat(zeros.astype(f32), g, axis=1)) * jnp.repeat(scales.astype(f32), g, axis=1)


def tiled_matmul_reference(x, tiers: Sequence[Tier], keys, *, rows_per_tier: int):
    """`tiled_matmul`'s result for the rows its tiles hold: row p of `x` [P, K] times the weight
    its key `keys[p]` names (`tier * rows_per_tier + row`), decoded by `tier_weights` ->
    float32 [P, N]. `keys` sorted, INVALID last (as the kernel takes them): those rows are 0."""
    w = jnp.concatenate([jnp.pad(tier_weights(t), ((0, rows_per_tier - t[0][0].shape[0]), (0, 0), (0, 0)))
                         for t in tiers])  # [tiers * rows_per_tier, K, N]
    sizes = jnp.zeros(w.shape[0], jnp.int32).at[keys].add(1, mode="drop")  # INVALID keys fall off the end
    return jax.lax.ragged_dot(x.astype(jnp.float32), w, sizes, precision=jax.lax.Precision.HIGHEST)


def layer_matmul_reference(x, w, layer):
    """`layer_matmul`'s result: `x` [M, K] times `w[layer]` [K, N] -> float32 [M, N]."""
    return jnp.dot(x.astype(jnp.float32), w[layer].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
