"""The decoder's layers as Flax modules: norms, RoPE, attention, MLPs, the MoE block.

Inside the decoder's layer scan, each parameter reaches its module as a `LayerSlice`: the
stacked array of the whole segment and the layer's index. Flax sees the layer's own shape; a
projection reads its layer's weights straight from the stack, and decode attention reads its
layer's keys and values straight from the stacked cache, so no per-layer slice is ever copied
(XLA copies a dynamic slice before any GEMM that consumes it). Small parameters (norms) are
sliced as usual.

On a GPU (chosen per lowering platform) decode-sized projections and decode attention run as
Pallas kernels that index the stacks (`pallas_kernels.layer_matmul`, `decode_attention`);
elsewhere, and for prefill, XLA's own ops.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

import pallas_kernels
from dynaexq_jax.models.config import ModelConfig

_MASKED = -1e30  # finite, so rows with every key masked (left padding) give no NaN
PALLAS_MAX_ROWS = 64  # projections of at most this many rows (decode) use the Pallas kernel on GPU


class LayerSlice:
    """Layer `index` of a stacked parameter [n, ...], as a module sees it (not a pytree: it
    only lives inside one trace)."""

    def __init__(self, stack: jax.Array, index):
        self.stack, self.index = stack, index

    @property
    def shape(self):
        return self.stack.shape[1:]

    @property
    def dtype(self):
        return self.stack.dtype

    def value(self) -> jax.Array:
        # A gather, not a dynamic slice: XLA turns a loop-indexed dynamic slice into a separate
        # copy, while a gather fuses into the (elementwise) consumer of a small parameter.
        return jnp.take(self.stack, self.index, axis=0, mode="clip")


def as_array(p) -> jax.Array:
    return p.value() if isinstance(p, LayerSlice) else p


def _precision(dtype):
    """float32 means float32 on every backend (no TF32 on GPU); lower precisions as stored."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def mm(x, w, dims: str, out_dtype=None):
    """einsum accumulating in float32, rounded once at the end to `out_dtype` (default x's
    dtype, as PyTorch's bf16 matmuls do). XLA:CPU has no bf16 x bf16 -> f32 dot: there the
    operands are widened first (what its own bf16 dots do), on a GPU the dot accumulates."""
    out = out_dtype or x.dtype
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return jnp.einsum(dims, x, w, precision=jax.lax.Precision.HIGHEST).astype(out)
    cuda = lambda x, w: jnp.einsum(dims, x, w, preferred_element_type=jnp.float32).astype(out)
    default = lambda x, w: jnp.einsum(dims, x.astype(jnp.float32), w.astype(jnp.float32)).astype(out)
    return jax.lax.platform_dependent(x, w, cuda=cuda, default=default)


def project(x, kernel, kernels: bool = True):
    """x [..., K] @ kernel [K, N] -> [..., N] in x's dtype; `kernel` may be a `LayerSlice`.
    `kernels`: allow the Pallas kernel (off for differentiation: it has no derivative rule)."""
    if not isinstance(kernel, LayerSlice) or not kernels:
        return mm(x, as_array(kernel), "...k,kn->...n")
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    xla = lambda x2: mm(x2, kernel.value(), "mk,kn->mn")
    if x2.shape[0] > PALLAS_MAX_ROWS or not pallas_kernels.layer_matmul_supported(K, kernel.shape[-1], x2.shape[0]):
        y = xla(x2)
    else:
        cuda = lambda x2: pallas_kernels.layer_matmul(x2, kernel.stack, kernel.index, out_dtype=x2.dtype,
                                                      interpret=False)
        y = jax.lax.platform_dependent(x2, cuda=cuda, default=xla)
    return y.reshape(*lead, y.shape[-1])


class Linear(nn.Module):
    """A bias-free projection, kernel [in, out] (Flax's layout; checkpoints store [out, in])."""

    features: int
    dtype: jnp.dtype
    kernels: bool = True  # Pallas kernels allowed (off to differentiate)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
        return project(x.astype(self.dtype), kernel, self.kernels)


def rms_normalize(x, eps: float):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class NormWeight(nn.Module):
    """An RMSNorm's weight on its own, for norms applied together (q and k)."""

    size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        return as_array(self.param("weight", nn.initializers.ones, (self.size,), self.dtype))


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        w = as_array(self.param("weight", nn.initializers.ones, (x.shape[-1],), x.dtype))
        return w * rms_normalize(x, self.eps)


def rotary(positions, head_dim: int, theta: float, dtype):
    """(cos, sin) [B, T, 1, D] of the rotary embedding at `positions` [B, T]: computed once per
    step, shared by every layer."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def rope(x, cos, sin):
    """Rotary embedding, rotate-half convention. x: [B, T, heads, D]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: bool = True

    @nn.compact
    def __call__(self, x, rot, kv, layer, start, index, fresh: bool = False):
        """x [B, T, H]; kv: the whole stacked cache [L, 2, B, KVH, S, D]; writes T slots of
        `layer` from `index`. `fresh`: the cache held nothing before (a new prompt), so the
        queries attend to this chunk's own keys, not to the whole allocation. -> (out, kv)."""
        cfg = self.cfg
        B, T, _ = x.shape
        D, H, KVH = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qkv = Linear((H + 2 * KVH) * D, self.dtype, self.kernels, name="qkv_proj")(x)  # q, k, v: one read of x and the weights
        # q and k heads are adjacent: normed (q_norm, k_norm weights side by side) and rotated
        # as one array, one kernel.
        qk = qkv[..., : (H + KVH) * D].reshape(B, T, H + KVH, D)
        v = qkv[..., (H + KVH) * D :].reshape(B, T, KVH, D)
        w = NormWeight(2 * D, self.dtype, name="qk_norm")().reshape(2, D)
        w = jnp.where((jnp.arange(H + KVH) < H)[:, None], w[0], w[1])  # [H + KVH, D]
        qk = rope(w * rms_normalize(qk, cfg.rms_norm_eps), *rot)
        q, k = qk[:, :, :H], qk[:, :, H:]

        new = jnp.stack([k, v]).transpose(0, 1, 3, 2, 4)[None].astype(kv.dtype)  # [1, 2, B, KVH, T, D]
        kv = jax.lax.dynamic_update_slice(kv, new, (layer, 0, 0, 0, index, 0))
        qg = q.reshape(B, T, KVH, H // KVH, D)
        if fresh:
            chunk = lambda a: a.astype(kv.dtype).transpose(0, 2, 1, 3)  # [B, KVH, T, D], slots 0..T-1
            out = _attention(qg, chunk(k), chunk(v), start, 0, dtype=self.dtype)
        elif T == 1 and self.kernels and pallas_kernels.decode_attention_supported(D, kv.shape[4]):
            args = (qg, kv, layer, start, index)
            cuda = lambda *a: _pallas_decode_attention(*a, dtype=self.dtype)
            xla = lambda qg, kv, layer, start, index: _attention(qg, kv[layer, 0], kv[layer, 1], start, index,
                                                                 dtype=self.dtype)
            out = jax.lax.platform_dependent(*args, cuda=cuda, default=xla)
        else:
            out = _attention(qg, kv[layer, 0], kv[layer, 1], start, index, dtype=self.dtype)
        out = out.reshape(B, T, H * D)
        return Linear(cfg.hidden_size, self.dtype, self.kernels, name="o_proj")(out), kv


def _attention(qg, k_cache, v_cache, start, index, *, dtype):
    """qg [B, T, KVH, G, D], the queries of slots `index`.. over keys and values [B, KVH, S, D]
    of slots 0.., each row's real slots from `start` [B] -> [B, T, KVH, G, D]."""
    B, T, KVH, G, D = qg.shape
    S = k_cache.shape[2]
    q_slot = index + jnp.arange(T)  # [T]
    slot = jnp.arange(S)[None, None, :]
    mask = (slot >= start[:, None, None]) & (slot <= q_slot[None, :, None])  # [B, T, S]
    scores = mm(qg, k_cache, "btkgd,bksd->bkgts", out_dtype=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (D**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return mm(probs, v_cache, "bkgts,bksd->btkgd")


def _pallas_decode_attention(qg, kv, layer, start, index, *, dtype):
    B, _, KVH, G, D = qg.shape
    out = pallas_kernels.decode_attention(qg[:, 0], kv, layer, start, index, scale=D**-0.5,
                                          interpret=False)
    return out[:, None].astype(dtype)


class DenseMLP(nn.Module):
    intermediate: int
    dtype: jnp.dtype
    kernels: bool = True

    @nn.compact
    def __call__(self, x):
        linear = lambda n, name: Linear(n, self.dtype, self.kernels, name=name)
        g, u = linear(self.intermediate, "gate_proj")(x), linear(self.intermediate, "up_proj")(x)
        return linear(x.shape[-1], "down_proj")(jax.nn.silu(g) * u)


def route(cfg: ModelConfig, logits):
    """Router logits [BT, E] -> probs [BT, E] (float32), top_p, top_i [BT, k]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.experts_per_token)  # [BT, k]
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return probs, top_p, top_i


# ffn(experts, moe_layer, x [T, H], expert_ids [T, k], weights [T, k], token_valid [T],
#     residual [T, H]) -> residual + the experts' output (added in place, one kernel less).
ExpertFFN = Callable[..., jax.Array]


@flax.struct.dataclass
class Routing:
    """What a MoE layer's router chose, kept per layer for the statistics computed after the
    layer loop (one pass over all layers instead of scatters in every layer)."""

    # [..., T, E] float32: the router probability of each chosen expert, -1 for the others
    # (one array a layer records, from which counts and routed mass both follow).
    chosen: jax.Array
    router_probs: jax.Array | None  # [..., E] every expert's probability summed (training only)


class MoEBlock(nn.Module):
    """Softmax router, top-k, optional renormalisation; experts from the `experts` pytree."""

    cfg: ModelConfig
    dtype: jnp.dtype
    ffn: ExpertFFN
    router_probs: bool = False  # also return the router's probabilities summed (load-balancing loss)
    kernels: bool = True

    @nn.compact
    def __call__(self, x, token_valid, experts, moe_layer, residual):
        """-> (residual + the experts' output [B, T, H], Routing)."""
        cfg = self.cfg
        B, T, Hd = x.shape
        xt = x.reshape(B * T, Hd)
        tv = token_valid.reshape(B * T)
        logits = Linear(cfg.num_experts, self.dtype, self.kernels, name="gate")(xt)  # [BT, E]
        probs, top_p, top_i = route(cfg, logits)
        y = self.ffn(experts, moe_layer, xt, top_i, top_p.astype(self.dtype), tv, residual.reshape(B * T, Hd))
        picked = jnp.any(top_i[:, :, None] == jnp.arange(cfg.num_experts), axis=1)  # [BT, E], no scatter
        chosen = jnp.where(picked & tv[:, None], probs, -1.0)
        summed = jnp.sum(probs * tv[:, None], axis=0) if self.router_probs else None
        return y.reshape(B, T, Hd), Routing(chosen, summed)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    kind: str  # "moe" | "dense"
    dtype: jnp.dtype
    ffn: ExpertFFN
    router_probs: bool = False
    kernels: bool = True  # Pallas decode kernels allowed when lowering for a GPU (off to differentiate)

    @nn.compact
    def __call__(self, x, rot, token_valid, kv, layer, start, index, experts, moe_layer, fresh: bool = False):
        cfg = self.cfg
        h, kv = Attention(cfg, self.dtype, self.kernels, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), rot, kv, layer, start, index, fresh
        )
        x = x + h
        hn = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        if self.kind == "moe":
            moe = MoEBlock(cfg, self.dtype, self.ffn, self.router_probs, self.kernels, name="mlp")
            x, route = moe(hn, token_valid, experts, moe_layer, residual=x)
        else:
            x, route = x + DenseMLP(cfg.intermediate_size, self.dtype, self.kernels, name="mlp")(hn), None
        return x, kv, route
