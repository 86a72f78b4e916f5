"""Decode attention (one new token per row) over a layer of a stacked KV cache, in place.

The cache is one array for all layers' keys and values, [L, 2, B, KVH, S, D]; a program reads
its layer's rows at the layer index it is given, so no per-layer slice of the cache is ever
copied, and it reads only the filled slots (up to the current one). Flash-decoding: the grid
is (batch, KV head, split of the slots); each program keeps its query heads' scores in
registers with an online softmax and writes a partial result that `decode_attention` merges.

float32 inputs use IEEE float32 dots (no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30


def _kernel(layer_ref, index_ref, q_ref, kv_ref, start_ref, o_ref, m_ref, l_ref, *,
            block_h: int, block_k: int, split_len: int, scale: float, precision):
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, index = layer_ref[0], index_ref[b]
    head_dim = q_ref.shape[-1]
    q = q_ref[b, h, :, :]  # [block_h, D]: G query heads, zero-padded
    first = start_ref[b]  # the row's first real slot
    # Only real slots up to the current one are read: before `first` is left padding, past
    # `index` the cache is unfilled.
    start = sp * split_len + ((jnp.maximum(first - sp * split_len, 0) // block_k) * block_k)
    stop = jnp.minimum(sp * split_len + split_len, index + 1)
    steps = jnp.maximum(pl.cdiv(stop - start, block_k), 0)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        s0 = start + i * block_k
        k = kv_ref[layer, 0, b, h, pl.ds(s0, block_k), :]  # [block_k, D]
        v = kv_ref[layer, 1, b, h, pl.ds(s0, block_k), :]
        s = jnp.dot(q, k.T.astype(q.dtype), preferred_element_type=jnp.float32, precision=precision) * scale
        slot = s0 + jax.lax.broadcasted_iota(jnp.int32, (block_h, block_k), 1)
        ok = (slot >= first) & (slot <= index)
        s = jnp.where(ok, s, _NEG)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_next)
        p = jnp.where(ok, jnp.exp(s - m_next[:, None]), 0.0)
        acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                                            precision=precision)
        return acc, m_next, l_prev * corr + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_h, head_dim), jnp.float32), jnp.full((block_h,), _NEG, jnp.float32),
            jnp.zeros((block_h,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, steps, body, init)
    o_ref[sp, b, h] = acc
    m_ref[sp, b, h] = m
    l_ref[sp, b, h] = l


def decode_attention_supported(head_dim: int, slots: int, block_k: int = 64) -> bool:
    """Whether the compiled kernel takes these shapes (Triton dots want power-of-two sizes >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and slots % min(block_k, slots) == 0 and slots >= 16


def decode_attention(q, kv, layer, start, index, *, scale: float, interpret: bool, sinks=None,
                     block_k: int = 64, num_warps: int = 4, num_stages: int = 2):
    """q [B, KVH, G, D] (G query heads per KV head); kv [L, 2, B, KVH, S, D]; layer,
    index [] or [B] int32 (the slot of the current token, or each row's); start [B] int32 (each row's first real
    slot). -> [B, KVH, G, D] in q's dtype: softmax(q k^T * scale) v over slots start..index.
    `sinks` [KVH, G] (gpt-oss): one more logit per query head in the softmax, with no value;
    it only enlarges the denominator, so it joins where the splits are merged."""
    B, KVH, G, D = q.shape
    S = kv.shape[4]
    block_k = min(block_k, S)
    block_h = max(16, 1 << (G - 1).bit_length())  # tensor-core dots want >= 16 rows
    # Enough programs to fill the GPU at batch 1, while each split keeps whole blocks.
    splits = 1
    while B * KVH * splits < 256 and S % (2 * splits * block_k) == 0:
        splits *= 2
    split_len = S // splits
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, block_h - G), (0, 0)))
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, block_h=block_h, block_k=block_k, split_len=split_len, scale=scale,
                          precision=precision),
        out_shape=(jax.ShapeDtypeStruct((splits, B, KVH, block_h, D), f32),
                   jax.ShapeDtypeStruct((splits, B, KVH, block_h), f32),
                   jax.ShapeDtypeStruct((splits, B, KVH, block_h), f32)),
        grid=(B, KVH, splits),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.broadcast_to(index, (B,)).astype(jnp.int32), qp, kv,
      start.astype(jnp.int32))
    # Merge the splits' partial softmaxes.
    m_all = jnp.max(m, axis=0)  # [B, KVH, block_h]
    if sinks is not None:
        sink = jnp.pad(sinks.astype(f32), ((0, 0), (0, block_h - G)), constant_values=_NEG)[None]  # [1, KVH, block_h]
        m_all = jnp.maximum(m_all, sink)
    w = jnp.exp(m - m_all[None])  # [splits, B, KVH, block_h]
    denom = jnp.sum(l * w, axis=0)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m_all)
    out = jnp.sum(o * w[..., None], axis=0) / jnp.maximum(denom, 1e-30)[..., None]
    return out[:, :, :G].astype(q.dtype)


def decode_attention_reference(q, kv, layer, start, index, *, scale: float, sinks=None):
    """`decode_attention`'s result the plain way (pure jnp, float32): each row's softmax(q k^T *
    scale) v over its slots start[b]..index, `sinks` [KVH, G] adding one logit per query head to
    the denominator only; zeros for a row with no slot. Shapes as `decode_attention`'s."""
    f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
    S = kv.shape[4]
    slot = jnp.arange(S)
    index = jnp.broadcast_to(index, start.shape)
    seen = (slot[None, :] >= start[:, None]) & (slot[None, :] <= index[:, None])  # [B, S]
    k, v = kv[layer, 0].astype(f32), kv[layer, 1].astype(f32)  # [B, KVH, S, D]
    s = jnp.einsum("bhgd,bhsd->bhgs", q.astype(f32), k, precision=hi) * scale
    s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(f32)[None, :, :, None])
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row with no slot: every weight 0
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(f32)[None, :, :, None] - m)
    out = jnp.einsum("bhgs,bhsd->bhgd", p / jnp.maximum(denom, 1e-30), v, precision=hi)
    return out.astype(q.dtype)
