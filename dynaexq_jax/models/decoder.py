"""Qwen3-MoE decoder as Flax modules, with an explicit KV cache and explicit expert weights.

`Qwen3Moe.apply({"params": params}, tokens, positions, cache, experts)` is a pure function:
the non-expert parameters, the expert pytree (see `expert_state`) and the KV cache all come in
as arguments and the updated cache goes out, so jitted steps never retrace when expert
residency changes.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dynaexq_jax.models.config import Qwen3MoeConfig

_MASKED = -1e30  # finite, so rows with every key masked (left padding) give no NaN


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer: [B, S, KVH, D]
    v: tuple[jax.Array, ...]  # per layer: [B, S, KVH, D]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: next slot to write (all rows aligned by left padding)

    @classmethod
    def empty(cls, cfg: Qwen3MoeConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @staticmethod
    def nbytes_for(cfg: Qwen3MoeConfig, batch: int, length: int, dtype) -> int:
        per_layer = 2 * batch * length * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
        return cfg.num_layers * per_layer + batch * length  # + the validity mask


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), x.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return w * xf.astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, rotate-half convention. x: [B, T, heads, D], positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def _linear(features: int, name: str, dtype):
    return nn.Dense(features, use_bias=False, name=name, dtype=dtype, param_dtype=dtype)


class Attention(nn.Module):
    cfg: Qwen3MoeConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, k_cache, v_cache, valid, index):
        cfg = self.cfg
        B, T, _ = x.shape
        D, H, KVH = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = _linear(H * D, "q_proj", self.dtype)(x).reshape(B, T, H, D)
        k = _linear(KVH * D, "k_proj", self.dtype)(x).reshape(B, T, KVH, D)
        v = _linear(KVH * D, "v_proj", self.dtype)(x).reshape(B, T, KVH, D)
        q = rope(RMSNorm(cfg.rms_norm_eps, name="q_norm")(q), positions, cfg.rope_theta)
        k = rope(RMSNorm(cfg.rms_norm_eps, name="k_norm")(k), positions, cfg.rope_theta)

        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        S = k_cache.shape[1]
        q_slot = index + jnp.arange(T)  # [T]
        mask = valid[:, None, :] & (jnp.arange(S)[None, None, :] <= q_slot[None, :, None])  # [B, T, S]

        qg = q.reshape(B, T, KVH, H // KVH, D)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
        scores = scores * (D**-0.5)
        scores = jnp.where(mask[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache).reshape(B, T, H * D)
        return _linear(cfg.hidden_size, "o_proj", self.dtype)(out), k_cache, v_cache


class DenseMLP(nn.Module):
    intermediate: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        g = _linear(self.intermediate, "gate_proj", self.dtype)(x)
        u = _linear(self.intermediate, "up_proj", self.dtype)(x)
        return _linear(x.shape[-1], "down_proj", self.dtype)(jax.nn.silu(g) * u)


def route(cfg: Qwen3MoeConfig, logits):
    """Router logits [BT, E] -> probs [BT, E] (float32), top_p, top_i [BT, k].

    Shared with runtimes that run the router apart from the experts (`offload`).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.experts_per_token)  # [BT, k]
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return probs, top_p, top_i


class MoEBlock(nn.Module):
    """Softmax router, top-k, optional renormalisation; experts come from the `experts` pytree."""

    cfg: Qwen3MoeConfig
    moe_layer: int  # index among the MoE layers, into the expert pytree
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, token_valid, experts):
        cfg = self.cfg
        B, T, Hd = x.shape
        xt = x.reshape(B * T, Hd)
        logits = _linear(cfg.num_experts, "gate", self.dtype)(xt)  # [BT, E]
        probs, top_p, top_i = route(cfg, logits)
        y = experts.ffn(self.moe_layer, xt, top_i, top_p.astype(self.dtype))
        # Routing trace of real tokens only: pair counts feed hotness; router probabilities
        # feed the load-balancing loss in training.
        tv = token_valid.reshape(B * T, 1).astype(jnp.float32)
        trace = {
            "counts": jnp.zeros((cfg.num_experts,), jnp.float32).at[top_i].add(tv),
            "probs": jnp.sum(probs * tv, axis=0),
        }
        return y.reshape(B, T, Hd), trace


class DecoderLayer(nn.Module):
    cfg: Qwen3MoeConfig
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, token_valid, k_cache, v_cache, valid, index, experts):
        cfg = self.cfg
        h, k_cache, v_cache = Attention(cfg, self.dtype, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), positions, k_cache, v_cache, valid, index
        )
        x = x + h
        hn = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        trace = None
        if cfg.is_moe_layer(self.layer):
            moe_layer = cfg.moe_layers.index(self.layer)
            h, trace = MoEBlock(cfg, moe_layer, self.dtype, name="mlp")(hn, token_valid, experts)
        else:
            h = DenseMLP(cfg.intermediate_size, self.dtype, name="mlp")(hn)
        return x + h, k_cache, v_cache, trace


class Qwen3Moe(nn.Module):
    cfg: Qwen3MoeConfig
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, tokens, positions, token_valid, cache: KVCache, experts, last_only: bool = False):
        """tokens, positions, token_valid: [B, T]. Writes T cache slots from `cache.index`.

        Returns logits [B, T, V] (float32; [B, 1, V] of the last position if `last_only`), the updated cache and the routing trace of this
        call's real tokens: {"counts": routed pair counts, "probs": summed router
        probabilities}, each [moe_layers, experts].
        """
        cfg = self.cfg
        chex.assert_equal_shape((tokens, positions, token_valid))
        chex.assert_rank(tokens, 2)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", dtype=self.dtype, param_dtype=self.dtype)
        x = embed(tokens)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
        ks, vs, traces = [], [], []
        for i in range(cfg.num_layers):
            x, k, v, t = DecoderLayer(cfg, i, self.dtype, name=f"layers_{i}")(
                x, positions, token_valid, cache.k[i], cache.v[i], valid, cache.index, experts
            )
            ks.append(k)
            vs.append(v)
            if t is not None:
                traces.append(t)
        if last_only:  # prefill needs only the next token: skip the [B, T, V] projection
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = _linear(cfg.vocab_size, "lm_head", self.dtype)(x)
        T = tokens.shape[1]
        new_cache = KVCache(k=tuple(ks), v=tuple(vs), valid=valid, index=cache.index + T)
        empty = jnp.zeros((0, cfg.num_experts), jnp.float32)
        trace = {k: jnp.stack([t[k] for t in traces]) if traces else empty for k in ("counts", "probs")}
        return logits.astype(jnp.float32), new_cache, trace
