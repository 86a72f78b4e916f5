"""Decode attention (one new token per row) over a layer of a stacked KV cache, in place.

The cache is one array for all layers' keys and values, [L, 2, B, KVH, S, D]; a program reads
its layer's rows at the layer index it is given, so no per-layer slice of the cache is ever
copied, and it reads only the filled slots (up to the current one, from the row's first real
slot or the layer's sliding window, whichever is later). Flash-decoding: the grid is (batch, KV
head, split of the slots); each program keeps its query heads' scores in registers with an
online softmax and writes a partial result. `merge_partials` combines them: `decode_attention`
merges with XLA, the fused decode layer (`pallas_kernels.decode_layer.attn_out`) in the
output projection's own kernel.

Queries arrive as the projection writes them, [B, query heads, D] (the G heads of KV head h are
h*G .. h*G+G-1); a program loads its G heads into a tile of >= 16 rows with masked loads, so
nothing pads them first.

float32 inputs use IEEE float32 dots (no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30
MAX_SPLITS = 16  # bounds the partials a fused merge re-reads per output block


def split_steps(sp, split_len: int, first, index, block_k: int):
    """(first slot, steps of `block_k` slots) that split `sp` reads: only real slots, from the
    row's `first` (the blocks before it skipped) up to the current one, `index`."""
    start = sp * split_len + ((jnp.maximum(first - sp * split_len, 0) // block_k) * block_k)
    stop = jnp.minimum(sp * split_len + split_len, index + 1)
    return start, jnp.maximum(pl.cdiv(stop - start, block_k), 0)


def online_softmax_init(rows: int, width: int):
    """The running (output [rows, width], max [rows], sum [rows]) before any slot."""
    return (jnp.zeros((rows, width), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def online_softmax_step(carry, s, v, s0, first, index, precision):
    """The running softmax `carry` over one more block of slots s0 .. s0 + block_k: scores s
    [rows, block_k] (slots outside first .. index masked), values v [block_k, width]."""
    acc, m_prev, l_prev = carry
    slot = s0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    ok = (slot >= first) & (slot <= index)
    s = jnp.where(ok, s, _NEG)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    corr = jnp.exp(m_prev - m_next)
    p = jnp.where(ok, jnp.exp(s - m_next[:, None]), 0.0)
    acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    return acc, m_next, l_prev * corr + jnp.sum(p, axis=1)


def _kernel(layer_ref, index_ref, q_ref, kv_ref, start_ref, *rest, group: int, block_h: int, block_k: int,
            split_len: int, scale: float, precision, windowed: bool):
    if windowed:
        window_ref, o_ref, m_ref, l_ref = rest
    else:
        o_ref, m_ref, l_ref = rest
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, index = layer_ref[0], index_ref[b]
    head_dim = q_ref.shape[-1]
    g = jax.lax.broadcasted_iota(jnp.int32, (block_h, head_dim), 0)
    d = jax.lax.broadcasted_iota(jnp.int32, (block_h, head_dim), 1)
    # [block_h, D]: the G query heads of KV head h, rows past G zero.
    q = plgpu.load(q_ref.at[b, h * group + jnp.where(g < group, g, 0), d], mask=g < group, other=0)
    first = start_ref[b]  # the row's first real slot
    if windowed:  # one query at slot `index`: a window makes its first slot later
        window = window_ref[layer]
        first = jnp.where(window > 0, jnp.maximum(first, index - window + 1), first)
    # Only real slots up to the current one are read: before `first` is left padding (or out of
    # the window), past `index` the cache is unfilled.
    start, steps = split_steps(sp, split_len, first, index, block_k)

    def body(i, carry):
        s0 = start + i * block_k
        k = kv_ref[layer, 0, b, h, pl.ds(s0, block_k), :]  # [block_k, D]
        v = kv_ref[layer, 1, b, h, pl.ds(s0, block_k), :]
        s = jnp.dot(q, k.T.astype(q.dtype), preferred_element_type=jnp.float32, precision=precision) * scale
        return online_softmax_step(carry, s, v, s0, first, index, precision)

    acc, m, l = jax.lax.fori_loop(0, steps, body, online_softmax_init(block_h, head_dim))
    o_ref[sp, b, h] = acc
    m_ref[sp, b, h] = m
    l_ref[sp, b, h] = l


def decode_attention_supported(head_dim: int, slots: int, block_k: int = 64) -> bool:
    """Whether the compiled kernel takes these shapes (Triton dots want power-of-two sizes >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and slots % min(block_k, slots) == 0 and slots >= 16


def num_splits(batch: int, kv_heads: int, slots: int, block_k: int = 64) -> int:
    """Splits of the slots: enough programs to fill the GPU at batch 1, each split whole blocks."""
    block_k = min(block_k, slots)
    splits = 1
    while batch * kv_heads * splits < 256 and splits < MAX_SPLITS and slots % (2 * splits * block_k) == 0:
        splits *= 2
    return splits


def block_rows(group: int) -> int:
    """Query rows per program: the G heads of a KV head, padded for tensor-core dots (>= 16)."""
    return max(16, 1 << (group - 1).bit_length())


def decode_attention_partials(q, kv, layer, start, index, *, kv_heads: int, scale: float, interpret: bool,
                              windows=None, block_k: int = 64, num_warps: int = 4, num_stages: int = 2):
    """q [B, Hq, D] (the G = Hq / KVH query heads of KV head h at h*G..); kv [L, 2, B, KVH, S, D];
    layer [] int32; index [] or [B] int32 (the current token's slot, or each row's); start [B]
    int32 (each row's first real slot); `windows` [L] int32 or None: each layer's sliding window
    (0: none). -> (o [splits, B, KVH, bh, D], m, l [splits, B, KVH, bh]) float32: per split,
    the unnormalized output, the running maximum and the sum of exponentials of query rows
    (bh = `block_rows(G)`, rows past G undefined). `merge_partials` finishes them."""
    B, Hq, D = q.shape
    S = kv.shape[4]
    G = Hq // kv_heads
    block_k = min(block_k, S)
    block_h = block_rows(G)
    splits = num_splits(B, kv_heads, S, block_k)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    f32 = jnp.float32
    windowed = windows is not None
    return pl.pallas_call(
        functools.partial(_kernel, group=G, block_h=block_h, block_k=block_k, split_len=S // splits, scale=scale,
                          precision=precision, windowed=windowed),
        out_shape=(jax.ShapeDtypeStruct((splits, B, kv_heads, block_h, D), f32),
                   jax.ShapeDtypeStruct((splits, B, kv_heads, block_h), f32),
                   jax.ShapeDtypeStruct((splits, B, kv_heads, block_h), f32)),
        grid=(B, kv_heads, splits),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.broadcast_to(index, (B,)).astype(jnp.int32), q, kv,
      start.astype(jnp.int32), *(() if windows is None else (windows.astype(jnp.int32),)))


def merge_partials(o, m, l, group: int, sinks=None):
    """The partials' softmax over every split: (o, m, l) as `decode_attention_partials` gives
    them -> [B, KVH, G, D] float32. `sinks` [KVH, G] (gpt-oss): one more logit per query head
    with no value; it only enlarges the denominator, so it joins here."""
    m_all = jnp.max(m, axis=0)  # [B, KVH, bh]
    if sinks is not None:
        pad = m.shape[-1] - group
        sink = jnp.pad(sinks.astype(jnp.float32), ((0, 0), (0, pad)), constant_values=_NEG)[None]  # [1, KVH, bh]
        m_all = jnp.maximum(m_all, sink)
    w = jnp.exp(m - m_all[None])  # [splits, B, KVH, bh]
    denom = jnp.sum(l * w, axis=0)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m_all)
    out = jnp.sum(o * w[..., None], axis=0) / jnp.maximum(denom, 1e-30)[..., None]
    return out[:, :, :group]


def decode_attention(q, kv, layer, start, index, *, scale: float, interpret: bool, sinks=None, windows=None,
                     block_k: int = 64, num_warps: int = 4, num_stages: int = 2):
    """q [B, KVH, G, D] (G query heads per KV head); kv [L, 2, B, KVH, S, D]; layer,
    index [] or [B] int32 (the slot of the current token, or each row's); start [B] int32 (each row's first real
    slot). -> [B, KVH, G, D] in q's dtype: softmax(q k^T * scale) v over slots start..index.
    `sinks` [KVH, G] (gpt-oss): one more logit per query head in the softmax, with no value.
    `windows` [L] int32 or None: each layer's sliding window (0: none)."""
    B, KVH, G, D = q.shape
    o, m, l = decode_attention_partials(q.reshape(B, KVH * G, D), kv, layer, start, index, kv_heads=KVH, scale=scale,
                                        interpret=interpret, windows=windows, block_k=block_k, num_warps=num_warps,
                                        num_stages=num_stages)
    return merge_partials(o, m, l, G, sinks).astype(q.dtype)


def decode_attention_reference(q, kv, layer, start, index, *, scale: float, sinks=None, windows=None):
    """The same in plain jnp, every slot masked rather than skipped (what the kernel must equal)."""
    B, KVH, G, D = q.shape
    S = kv.shape[4]
    k, v = kv[layer, 0].astype(jnp.float32), kv[layer, 1].astype(jnp.float32)  # [B, KVH, S, D]
    index = jnp.broadcast_to(index, (B,))
    first = start
    if windows is not None:
        window = windows[layer]
        first = jnp.where(window > 0, jnp.maximum(start, index - window + 1), start)
    slot = jnp.arange(S)
    ok = (slot[None] >= first[:, None]) & (slot[None] <= index[:, None])  # [B, S]
    s = jnp.einsum("bkgd,bksd->bkgs", q.astype(jnp.float32), k, precision=jax.lax.Precision.HIGHEST) * scale
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32)[None, :, :, None])
    p = jnp.where(ok[:, None, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0)), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(jnp.float32)[None, :, :, None] - m)
    out = jnp.einsum("bkgs,bksd->bkgd", p / jnp.maximum(denom, 1e-30), v, precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
