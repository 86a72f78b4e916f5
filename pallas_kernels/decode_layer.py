"""A decoder layer's attention half for one new token per row, in two kernels around attention.

`attn_in`: the residual stream x = x1 + the MoE rows the previous layer left pending (added
here, so no kernel of its own), its RMSNorm, the q/k/v projection, the per-head q/k RMSNorm and
the rotary embedding, and the new key and value written into the stacked KV cache in place.
One program per head (D columns of the projection); each sees every column of x, so the
input norm is applied after the dot as a per-row factor (`rsqrt(mean(x^2))` is a row's scalar).

`attn_out`: the merge of decode attention's per-split partial softmaxes
(`pallas_kernels.decode_attention_partials`, sinks included), the output projection and the
residual add. One program per block of output columns; each merges every head's partials
before its dot (they are a few hundred KB at most, read from L2).

Both read their layer's weights straight from the stacked parameters [L, ...] at the layer
index they are given, like `layer_matmul`. Rows are the batch (B <= 64); tiles of >= 16 rows
(tensor-core dots), rows past B masked. Every gather, scatter and masked access uses array
indices, which interpret mode (the CPU tests) and the Triton lowering both take.
`attn_in_reference` and `attn_out_reference` are the same computations in plain jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import _NEG, merge_partials

F32 = jnp.float32


def row_tile(rows: int) -> int:
    """Rows per tile for `rows` rows (the batch): a power of two >= 16 (tensor-core dots)."""
    return max(16, 1 << (rows - 1).bit_length())


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _rows(tm: int, batch: int):
    """(rows_ok [tm], index [tm]) of a tile over `batch` rows: rows past the batch index one past
    the end. Masked, they are never touched on a GPU; interpreted, a scatter drops them where a
    repeated in-bounds index could write a stale value back."""
    rows = _iota((tm,), 0)
    ok = rows < batch
    return ok, jnp.where(ok, rows, batch)


def _pending_rows(pos_ref, pairs, rows_ok, safe_rows):
    """Each row's pending MoE rows (pos [rows, j], -1: none) as `pairs` vectors [tm], read once
    per program: inside the K loop a read of pos ahead of each row's read of y made a chain of
    2 x pairs dependent loads per step (the kernel's latency on the H200, 2026-12-04)."""
    return [plgpu.load(pos_ref.at[safe_rows, j], mask=rows_ok, other=-1) for j in range(pairs)]


def _pending(x_ref, y_ref, pending, rows_ok, safe_rows, cols):
    """x [tm, width] float32 at `cols` of the rows: x1 plus each pending MoE row (`_pending_rows`),
    added in the order of j; every read is issued before the first add needs one."""
    shape = (safe_rows.shape[0], cols.shape[1])
    live = jnp.broadcast_to(rows_ok[:, None], shape)
    x = plgpu.load(x_ref.at[safe_rows[:, None], cols], mask=live, other=0).astype(F32)
    ys = [plgpu.load(y_ref.at[jnp.where(p >= 0, p, 0)[:, None], cols],
                     mask=jnp.broadcast_to((rows_ok & (p >= 0))[:, None], shape), other=0) for p in pending]
    for y in ys:
        x = x + y.astype(F32)
    return x


# ----------------------------------------------------------------------------------- attn_in


def _attn_in_kernel(layer_ref, index_ref, x1_ref, y_ref, pos_ref, nw_ref, w_ref, *refs, batch, hidden, head_dim,
                    heads, kv_heads, pairs, tm, bk, eps, has_bias, has_qk_norm, dtype):
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    qk_ref = refs.pop(0) if has_qk_norm else None
    cos_ref, sin_ref, _kv_in, x_ref, q_ref, kv_ref = refs
    p = pl.program_id(0)  # the head: q heads, then k heads, then v heads
    layer = layer_ref[0]
    half = head_dim // 2
    rows_ok, safe = _rows(tm, batch)
    c0 = p * head_dim
    precision = _precision(dtype)
    pending = _pending_rows(pos_ref, pairs, rows_ok, safe)

    def body(s, carry):
        acc_a, acc_b, ss = carry
        k0 = s * bk
        cols = k0 + _iota((1, bk), 1)
        x = _pending(x1_ref, y_ref, pending, rows_ok, safe, cols).astype(dtype)  # [tm, bk]: the residual stream

        @pl.when(p == 0)
        def _():  # one program writes it for the output projection's residual add
            plgpu.store(x_ref.at[safe[:, None], cols], x, mask=jnp.broadcast_to(rows_ok[:, None], x.shape))

        xf = x.astype(F32)
        xn = (x * nw_ref[layer, pl.ds(k0, bk)][None, :]).astype(dtype)
        wa = w_ref[layer, pl.ds(k0, bk), pl.ds(c0, half)]
        wb = w_ref[layer, pl.ds(k0, bk), pl.ds(c0 + half, half)]
        acc_a += jnp.dot(xn, wa, preferred_element_type=F32, precision=precision)
        acc_b += jnp.dot(xn, wb, preferred_element_type=F32, precision=precision)
        return acc_a, acc_b, ss + jnp.sum(xf * xf, axis=1)

    zero = jnp.zeros((tm, half), F32)
    acc_a, acc_b, ss = jax.lax.fori_loop(0, hidden // bk, body, (zero, zero, jnp.zeros((tm,), F32)))
    r = jax.lax.rsqrt(ss / hidden + eps)[:, None]  # the input RMSNorm, a factor per row
    a, b = (acc_a * r).astype(dtype), (acc_b * r).astype(dtype)
    if has_bias:
        a = (a + b_ref[layer, pl.ds(c0, half)][None, :]).astype(dtype)
        b = (b + b_ref[layer, pl.ds(c0 + half, half)][None, :]).astype(dtype)
    is_q = p < heads
    rotated = p < heads + kv_heads  # q and k heads; v passes as projected
    ra, rb = a, b
    if has_qk_norm:  # each q and k head RMS-normalized over its D values, then q_norm's or k_norm's weight
        af, bf = a.astype(F32), b.astype(F32)
        rn = jax.lax.rsqrt((jnp.sum(af * af, axis=1) + jnp.sum(bf * bf, axis=1)) / head_dim + eps)[:, None]
        off = (p >= heads).astype(jnp.int32) * head_dim  # q_norm then k_norm
        ra = (qk_ref[layer, pl.ds(off, half)][None, :] * (af * rn).astype(dtype)).astype(dtype)
        rb = (qk_ref[layer, pl.ds(off + half, half)][None, :] * (bf * rn).astype(dtype)).astype(dtype)
    # Rotate half: (a, b) -> (a cos - b sin, b cos + a sin), each product rounded as XLA's are.
    rc = _iota((tm, half), 1)
    trig = lambda ref, c: plgpu.load(ref.at[safe[:, None], c], mask=jnp.broadcast_to(rows_ok[:, None], (tm, half)),
                                     other=0)
    ca, cb, sa, sb = trig(cos_ref, rc), trig(cos_ref, rc + half), trig(sin_ref, rc), trig(sin_ref, rc + half)
    ra2 = ((ra * ca).astype(dtype) + ((-rb) * sa).astype(dtype)).astype(dtype)
    rb2 = ((rb * cb).astype(dtype) + (ra * sb).astype(dtype)).astype(dtype)
    a = jnp.where(rotated, ra2, a)
    b = jnp.where(rotated, rb2, b)
    live = jnp.broadcast_to(rows_ok[:, None], (tm, half))
    r2 = safe[:, None]

    @pl.when(is_q)
    def _():
        plgpu.store(q_ref.at[r2, p, rc], a, mask=live)
        plgpu.store(q_ref.at[r2, p, rc + half], b, mask=live)

    slot = plgpu.load(index_ref.at[safe], mask=rows_ok, other=0)[:, None]  # each row's current slot

    for kind, first in ((0, heads), (1, heads + kv_heads)):  # k heads into kv[.., 0], v heads into kv[.., 1]
        @pl.when((p >= first) & (p < first + kv_heads))
        def _(kind=kind, first=first):
            h = p - first
            plgpu.store(kv_ref.at[layer, kind, r2, h, slot, rc], a.astype(kv_ref.dtype), mask=live)
            plgpu.store(kv_ref.at[layer, kind, r2, h, slot, rc + half], b.astype(kv_ref.dtype), mask=live)


def attn_in_supported(hidden: int, head_dim: int) -> bool:
    """Whether the compiled kernel takes these shapes (dots of power-of-two sizes >= 16)."""
    half = head_dim // 2
    return half >= 16 and half & (half - 1) == 0 and hidden % 16 == 0


def attn_in(x1, y, pos, norm_w, w, cos, sin, kv, layer, index, *, heads: int, kv_heads: int, eps: float,
            interpret: bool, bias=None, qk_norm=None, num_warps: int = 4, num_stages: int = 2):
    """The attention half's first kernel for one new token per row.

    x1 [B, H]: the residual stream before the pending MoE rows; y [P, H] those rows (each
    already weighted), pos [>= B, k] int32 each row's pending rows of y (-1: none); norm_w
    [L, H] the input RMSNorm weights; w [L, H, (Hq + 2 KVH) D] the q/k/v projections (q heads,
    then k, then v); bias [L, (Hq + 2 KVH) D] or None; qk_norm [L, 2D] (q_norm's weight, then
    k_norm's) or None; cos, sin [B, D]; kv [Lkv, 2, B, KVH, S, D] (written in place at
    `layer` and each row's `index`, [] or [B]).
    -> (x [B, H] the residual stream, q [B, Hq, D] normed and rotated, kv).
    """
    B, H = x1.shape
    N = w.shape[-1]
    D = N // (heads + 2 * kv_heads)
    tm = row_tile(B)
    bk = next(b for b in (128, 64, 32, 16) if H % b == 0)
    dt = x1.dtype
    extra = tuple(a for a in (bias, qk_norm) if a is not None)
    args = (jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.broadcast_to(index, (B,)).astype(jnp.int32), x1, y,
            pos, norm_w, w, *extra, cos, sin, kv)
    return pl.pallas_call(
        functools.partial(_attn_in_kernel, batch=B, hidden=H, head_dim=D, heads=heads, kv_heads=kv_heads,
                          pairs=pos.shape[1], tm=tm, bk=bk, eps=eps, has_bias=bias is not None,
                          has_qk_norm=qk_norm is not None, dtype=dt),
        out_shape=(jax.ShapeDtypeStruct((B, H), dt), jax.ShapeDtypeStruct((B, heads, D), dt),
                   jax.ShapeDtypeStruct(kv.shape, kv.dtype)),
        grid=(heads + 2 * kv_heads,),
        input_output_aliases={len(args) - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"attn_in_m{B}",
    )(*args)


def pending_sum(x1, y, pos, pairs: int):
    """x1 plus each row's pending MoE rows, in x1's dtype (the residual stream `attn_in` sees)."""
    x = x1.astype(F32)
    for j in range(pairs):
        p = pos[: x1.shape[0], j]
        x = x + jnp.where((p >= 0)[:, None], y[jnp.maximum(p, 0)].astype(F32), 0)
    return x.astype(x1.dtype)


def attn_in_reference(x1, y, pos, norm_w, w, cos, sin, kv, layer, index, *, heads: int, kv_heads: int, eps: float,
                      bias=None, qk_norm=None):
    """`attn_in` in plain jnp (the norm applied as the kernel applies it: after the dot)."""
    dt = x1.dtype
    B, H = x1.shape
    D = w.shape[-1] // (heads + 2 * kv_heads)
    x = pending_sum(x1, y, pos, pos.shape[1])
    xf = x.astype(F32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=1, keepdims=True) + eps)
    xn = (x * norm_w[layer][None, :]).astype(dt)
    proj = (jnp.dot(xn, w[layer], preferred_element_type=F32, precision=_precision(dt)) * r).astype(dt)
    if bias is not None:
        proj = (proj + bias[layer]).astype(dt)
    heads_all = proj.reshape(B, heads + 2 * kv_heads, D)
    qk, v = heads_all[:, : heads + kv_heads], heads_all[:, heads + kv_heads:]
    if qk_norm is not None:
        f = qk.astype(F32)
        n = (f * jax.lax.rsqrt(jnp.mean(f * f, axis=-1, keepdims=True) + eps)).astype(dt)
        wq = jnp.where((jnp.arange(heads + kv_heads) < heads)[:, None], qk_norm[layer, :D], qk_norm[layer, D:])
        qk = (wq * n).astype(dt)
    half = D // 2
    a, b = qk[..., :half], qk[..., half:]
    c, s = cos[:, None, :].astype(dt), sin[:, None, :].astype(dt)
    qk = jnp.concatenate([((a * c[..., :half]).astype(dt) + ((-b) * s[..., :half]).astype(dt)).astype(dt),
                          ((b * c[..., half:]).astype(dt) + (a * s[..., half:]).astype(dt)).astype(dt)], -1)
    q, k = qk[:, :heads], qk[:, heads:]
    slots = jnp.broadcast_to(index, (B,))
    rows = jnp.arange(B)
    kv = kv.at[layer, 0, rows, :, slots].set(k.astype(kv.dtype))
    kv = kv.at[layer, 1, rows, :, slots].set(v.astype(kv.dtype))
    return x, q, kv


# ---------------------------------------------------------------------------------- attn_out


def _attn_out_kernel(layer_ref, o_ref, m_ref, l_ref, x_ref, w_ref, *refs, batch, head_dim, heads, group, splits,
                     unroll, tm, bn, has_bias, has_sinks, dtype):
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    sinks_ref = refs.pop(0) if has_sinks else None
    (out_ref,) = refs
    n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    layer = layer_ref[0]
    rows_ok, safe = _rows(tm, batch)
    d = _iota((1, head_dim), 1)
    live_d = jnp.broadcast_to(rows_ok[:, None], (tm, head_dim))
    precision = _precision(dtype)

    def merged(hq):  # [tm, D] head hq's attention output: its splits' partial softmaxes merged
        kvh, g = jax.lax.div(hq, jnp.int32(group)), jax.lax.rem(hq, jnp.int32(group))  # (jnp's % fails to lower)
        # Every split's read issued at once: a loop over the splits chained 3 x splits loads a
        # head, heads x that a program (the kernel's latency on the H200, 2026-12-04).
        ms = [plgpu.load(m_ref.at[s, safe, kvh, g], mask=rows_ok, other=_NEG) for s in range(splits)]  # [tm]
        ls = [plgpu.load(l_ref.at[s, safe, kvh, g], mask=rows_ok, other=0) for s in range(splits)]
        top = jnp.full((tm,), _NEG, F32)
        for m in ms:
            top = jnp.maximum(top, m)
        if has_sinks:
            sink = sinks_ref[layer, hq].astype(F32)
            top = jnp.maximum(top, sink)
        num, den = jnp.zeros((tm, head_dim), F32), jnp.zeros((tm,), F32)
        for s, (m, l) in enumerate(zip(ms, ls)):
            wt = jnp.exp(m - top)
            den += l * wt
            num += plgpu.load(o_ref.at[s, safe[:, None], kvh, g, d], mask=live_d, other=0) * wt[:, None]
        if has_sinks:
            den += jnp.exp(sink - top)
        return (num / jnp.maximum(den, 1e-30)[:, None]).astype(dtype)

    def step(t, acc):  # `unroll` heads: their merges' reads overlap
        for u in range(unroll):
            hq = t * unroll + u
            wblk = w_ref[layer, pl.ds(hq * head_dim, head_dim), pl.ds(n0, bn)]
            acc += jnp.dot(merged(hq), wblk, preferred_element_type=F32, precision=precision)
        return acc

    acc = jax.lax.fori_loop(0, heads // unroll, step, jnp.zeros((tm, bn), F32))
    out = acc.astype(dtype)
    if has_bias:
        out = (out + b_ref[layer, pl.ds(n0, bn)][None, :]).astype(dtype)
    cols = n0 + _iota((1, bn), 1)
    live = jnp.broadcast_to(rows_ok[:, None], (tm, bn))
    x = plgpu.load(x_ref.at[safe[:, None], cols], mask=live, other=0)
    plgpu.store(out_ref.at[safe[:, None], cols], (x + out).astype(dtype), mask=live)


def attn_out_block_n(hidden: int) -> int:
    """`attn_out`'s default columns a program: `hidden` / it programs."""
    return next(b for b in (64, 32, 128, 16) if hidden % b == 0)


def attn_out(o, m, l, x, w, layer, *, heads: int, interpret: bool, bias=None, sinks=None, block_n: int | None = None,
             num_warps: int = 4, num_stages: int = 2):
    """The attention half's last kernel: x + merge(o, m, l) @ w[layer] (+ bias[layer]).

    (o, m, l): decode attention's partials (`decode_attention_partials`); x [B, H] the residual
    stream; w [L, Hq D, H] the output projections; bias [L, H] or None; sinks [L, Hq] (gpt-oss)
    or None. -> [B, H] in x's dtype.
    """
    splits, B, KVH, _, D = o.shape
    H = w.shape[-1]
    tm = row_tile(B)
    bn = block_n or attn_out_block_n(H)
    unroll = next(u for u in (4, 2, 1) if heads % u == 0 and u * splits <= 16)  # a step's reads: <= 16 splits' o
    extra = tuple(a for a in (bias, sinks) if a is not None)
    return pl.pallas_call(
        functools.partial(_attn_out_kernel, batch=B, head_dim=D, heads=heads, group=heads // KVH, splits=splits,
                          unroll=unroll, tm=tm, bn=bn, has_bias=bias is not None, has_sinks=sinks is not None,
                          dtype=x.dtype),
        out_shape=jax.ShapeDtypeStruct((B, H), x.dtype),
        grid=(H // bn,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"attn_out_m{B}",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), o, m, l, x, w, *extra)


def attn_out_reference(o, m, l, x, w, layer, *, heads: int, bias=None, sinks=None):
    """`attn_out` in plain jnp."""
    dt = x.dtype
    B, KVH = o.shape[1], o.shape[2]
    G = heads // KVH
    att = merge_partials(o, m, l, G, None if sinks is None else sinks[layer].reshape(KVH, G)).astype(dt)
    out = jnp.dot(att.reshape(B, -1), w[layer], preferred_element_type=F32, precision=_precision(dt)).astype(dt)
    if bias is not None:
        out = (out + bias[layer]).astype(dt)
    return (x + out).astype(dt)
