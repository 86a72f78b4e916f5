"""Decode attention in the latent space of multi-head latent attention (DeepSeek-V3's MLA), over
a layer of a stacked latent cache, in place.

The cache holds one entry per token and layer, [c | k_r]: the kv_lora_rank latent and the
rotary key shared by all heads, [L, 1, B, 1, S, C + R]. With the key up-projection absorbed
into the query (q = [q_lat | q_r] per head) a head's score is q . [c | k_r] and its output,
before the value up-projection, softmax . c: every head reads the same entries, which are
keys and values at once. A program reads its layer's filled slots straight from the stack
(no per-layer copy) for a block of heads of one row and one split of the slots, keeps the
scores in registers with an online softmax, and writes a partial result that
`latent_attention` merges (flash-decoding, as `decode_attention`).

float32 inputs use IEEE float32 dots (no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import online_softmax_init, online_softmax_step, split_steps

BLOCK_H = 16  # heads per program: tensor-core dots want >= 16 rows


def _kernel(layer_ref, index_ref, q_ref, cache_ref, start_ref, o_ref, m_ref, l_ref, *,
            rank: int, block_k: int, split_len: int, scale: float, precision):
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, index = layer_ref[0], index_ref[b]
    R = q_ref.shape[-1] - rank
    q_lat = q_ref[b, pl.ds(h * BLOCK_H, BLOCK_H), pl.ds(0, rank)]  # [BLOCK_H, C]
    q_rot = q_ref[b, pl.ds(h * BLOCK_H, BLOCK_H), pl.ds(rank, R)]  # [BLOCK_H, R]
    first = start_ref[b]
    start, steps = split_steps(sp, split_len, first, index, block_k)  # only real slots, as decode_attention

    def body(i, carry):
        s0 = start + i * block_k
        c = cache_ref[layer, 0, b, 0, pl.ds(s0, block_k), pl.ds(0, rank)]  # [block_k, C]: keys' latent part, values
        k_rot = cache_ref[layer, 0, b, 0, pl.ds(s0, block_k), pl.ds(rank, R)]  # [block_k, R]
        s = (jnp.dot(q_lat, c.T.astype(q_lat.dtype), preferred_element_type=jnp.float32, precision=precision)
             + jnp.dot(q_rot, k_rot.T.astype(q_rot.dtype), preferred_element_type=jnp.float32, precision=precision))
        return online_softmax_step(carry, s * scale, c, s0, first, index, precision)

    acc, m, l = jax.lax.fori_loop(0, steps, body, online_softmax_init(BLOCK_H, rank))
    o_ref[sp, b, pl.ds(h * BLOCK_H, BLOCK_H), :] = acc
    m_ref[sp, b, pl.ds(h * BLOCK_H, BLOCK_H)] = m
    l_ref[sp, b, pl.ds(h * BLOCK_H, BLOCK_H)] = l


def latent_attention_supported(rank: int, rope_dim: int, slots: int, block_k: int = 32) -> bool:
    """Whether the compiled kernel takes these shapes (Triton dots want power-of-two sizes >= 16)."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    return pow2(rank) and pow2(rope_dim) and slots >= 16 and slots % min(block_k, slots) == 0


def latent_attention(q, cache, layer, start, index, *, rank: int, scale: float, interpret: bool,
                     block_k: int = 32, num_warps: int = 4, num_stages: int = 2):
    """q [B, NH, C + R] (latent query | rotary query per head); cache [L, 1, B, 1, S, C + R];
    layer [] int32, index [] or [B] int32 (the slot of the current token, or each row's); start
    [B] int32 (each row's first real slot); `rank` = C. -> [B, NH, C] float32:
    softmax(q . cache * scale) . cache[..., :C] over slots start..index."""
    B, NH, D = q.shape
    S = cache.shape[4]
    block_k = min(block_k, S)
    heads = -(-NH // BLOCK_H) * BLOCK_H
    # More programs for a small batch, while each split keeps whole blocks and the splits' partial
    # outputs (float32 [heads, C] each) stay under a quarter of the bytes of the cache they read.
    splits = 1
    while (B * (heads // BLOCK_H) * splits < 128 and S % (2 * splits * block_k) == 0
           and 2 * splits * heads * rank * 4 <= S * D * cache.dtype.itemsize // 4):
        splits *= 2
    split_len = S // splits
    qp = jnp.pad(q, ((0, 0), (0, heads - NH), (0, 0)))
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, rank=rank, block_k=block_k, split_len=split_len, scale=scale,
                          precision=precision),
        out_shape=(jax.ShapeDtypeStruct((splits, B, heads, rank), f32),
                   jax.ShapeDtypeStruct((splits, B, heads), f32),
                   jax.ShapeDtypeStruct((splits, B, heads), f32)),
        grid=(B, heads // BLOCK_H, splits),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="latent_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.broadcast_to(index, (B,)).astype(jnp.int32), qp, cache,
      start.astype(jnp.int32))
    # Merge the splits' partial softmaxes.
    m_all = jnp.max(m, axis=0)  # [B, heads]
    w = jnp.exp(m - m_all[None])  # [splits, B, heads]
    denom = jnp.sum(l * w, axis=0)
    out = jnp.sum(o * w[..., None], axis=0) / jnp.maximum(denom, 1e-30)[..., None]
    return out[:, :NH]
