"""Gated DeltaNet linear attention (Qwen3-Next's and Qwen3.5's `linear_attention` layers).

Per value head, a state S [DK, DV] replaces the KV cache; each token t decays it, corrects it
toward its value and is read out by its query:

    S = exp(g_t) S;   S += k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t

with q and k L2-normalised (q also scaled by DK^-1/2), beta_t = sigmoid(b_t) and
g_t = -exp(A_log) softplus(a_t + dt_bias) per head. Before it, a causal depthwise convolution
(kernel K, SiLU) mixes each q/k/v channel with its K-1 predecessors; after it, an RMSNorm of
each head's output times SiLU(z), the output gate. Prefill runs the chunked parallel form
(`chunked_delta_rule`: a triangular solve within each chunk of 64 tokens, the state carried
from chunk to chunk), decode the recurrence (`recurrent_delta_rule`); both follow
transformers' `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule` step by step.

The cache holds, per linear layer and sequence, the last K-1 convolution inputs and S
(float32): constant in size, whatever the context. A token that is not valid (left padding,
a row that has stopped) enters the convolution as zeros and leaves S untouched (beta = 0,
decay 1), so padding never pollutes a row's state.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.layers import Linear, NormWeight, as_array, rms_normalize

CHUNK = 64  # tokens per chunk of the parallel form (transformers' and fla's choice)
_HI = jax.lax.Precision.HIGHEST


def _dot(dims: str, *xs):
    return jnp.einsum(dims, *xs, precision=_HI)


def state_shapes(cfg: ModelConfig, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the (conv, recurrent) state of every linear layer for `batch` sequences."""
    L = len(cfg.linear_layers)
    return ((L, batch, cfg.linear_conv_kernel - 1, conv_channels(cfg)),
            (L, batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim))


def conv_channels(cfg: ModelConfig) -> int:
    """Channels of the convolution: q and k (key heads) and v (value heads), side by side."""
    keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    return 2 * keys + cfg.linear_num_value_heads * cfg.linear_value_head_dim


def state_nbytes(cfg: ModelConfig, batch: int, dtype) -> int:
    """Bytes of the linear layers' states for `batch` sequences (conv in `dtype`, S in float32)."""
    conv, rec = state_shapes(cfg, batch)
    return math.prod(conv) * jnp.dtype(dtype).itemsize + math.prod(rec) * 4


def recurrent_delta_rule(q, k, v, g, beta, state):
    """Token by token. q, k [B, T, H, DK] (normalised, q scaled), v [B, T, H, DV], g, beta
    [B, T, H], state [B, H, DK, DV], all float32 -> (out [B, T, H, DV], state)."""

    def step(S, t):
        q, k, v, g, b = t
        S = S * jnp.exp(g)[..., None, None]
        delta = (v - _dot("bhkv,bhk->bhv", S, k)) * b[..., None]
        S = S + k[..., None] * delta[..., None, :]
        return S, _dot("bhkv,bhk->bhv", S, q)

    state, out = jax.lax.scan(step, state, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta)))
    return jnp.moveaxis(out, 0, 1), state


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same result in chunks of `chunk` tokens: within a chunk, the delta rule's corrections
    are one unit-lower-triangular solve; across chunks, the state carries. Same arguments and
    result as `recurrent_delta_rule`."""
    B, T, H, _ = q.shape
    C = min(chunk, T)
    pad = -T % C  # tail padding: no decay (g = 0), no update (beta = 0, k = 0)
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        g, beta = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (g, beta))
    N = (T + pad) // C
    # [B, H, N, C, ...]: heads before chunks, tokens of a chunk together
    split = lambda a: jnp.moveaxis(a.reshape(B, N, C, H, *a.shape[3:]), 3, 1)
    q, k, v, g, beta = (split(a) for a in (q, k, v, g, beta))
    cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C] log decay from the chunk's start
    lower = jnp.tril(jnp.ones((C, C), bool))
    diff = jnp.where(lower, cum[..., :, None] - cum[..., None, :], 0.0)
    decay = jnp.where(lower, jnp.exp(diff), 0.0)  # [B, H, N, C, C] decay from token j to token i >= j
    kb = k * beta[..., None]
    strict = jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), _dot("...ik,...jk->...ij", kb, k) * decay, 0.0)
    system = strict + jnp.eye(C, dtype=q.dtype)
    solve = lambda b: jax.lax.linalg.triangular_solve(system, b, left_side=True, lower=True, unit_diagonal=True)
    new_v = solve(v * beta[..., None])  # [B, H, N, C, DV]
    k_cum = solve(kb * jnp.exp(cum)[..., None])  # [B, H, N, C, DK]
    intra = _dot("...ik,...jk->...ij", q, k) * decay
    q_dec = q * jnp.exp(cum)[..., None]
    last = cum[..., -1:]
    k_dec = k * jnp.exp(last - cum)[..., None]
    chunk_decay = jnp.exp(last)[..., None]  # [B, H, N, 1, 1]

    def step(S, n):  # S [B, H, DK, DV]
        v_new = new_v[:, :, n] - _dot("bhck,bhkv->bhcv", k_cum[:, :, n], S)
        out = _dot("bhck,bhkv->bhcv", q_dec[:, :, n], S) + _dot("bhcj,bhjv->bhcv", intra[:, :, n], v_new)
        S = S * chunk_decay[:, :, n] + _dot("bhck,bhcv->bhkv", k_dec[:, :, n], v_new)
        return S, out

    state, out = jax.lax.scan(step, state, jnp.arange(N))  # out [N, B, H, C, DV]
    out = jnp.moveaxis(out, 0, 2).reshape(B, H, N * C, -1)[:, :, :T]
    return jnp.moveaxis(out, 1, 2), state


def l2_normalize(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nn.Module):
    """A `linear_attention` layer. Params (Hugging Face names): `in_proj` [H, qkvz | ba] (the
    checkpoint's in_proj_qkvz and in_proj_ba side by side, read once; Qwen3.5's in_proj_qkv,
    _z, _b and _a side by side when `linear_projection` is "split"), `conv_weight` [C, 1, K],
    `A_log`, `dt_bias` [HV], `norm/weight` [DV], `out_proj` [HV * DV, H]."""

    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: bool = True

    @nn.compact
    def __call__(self, x, token_valid, state, layer, fresh: bool = False):
        """x [B, T, H]; state: (conv [L, B, K-1, C], recurrent [L, B, HV, DK, DV]) of every linear
        layer, this one's row `layer` read and rewritten. `fresh`: start from empty states.
        -> (out [B, T, H], state)."""
        cfg = self.cfg
        B, T, _ = x.shape
        NK, NV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        DK, DV, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel
        r = NV // NK
        conv_all, rec_all = state
        x = jnp.where(token_valid[..., None], x, 0).astype(x.dtype)
        qkvz_width = NK * (2 * DK + 2 * r * DV)
        proj = Linear(qkvz_width + 2 * NV, self.dtype, self.kernels, name="in_proj")(x)
        if cfg.linear_projection == "split":  # Qwen3.5: q, k (all key heads), v, then z, b, a (value heads)
            C = 2 * NK * DK + NV * DV
            mixed, z = proj[..., :C], proj[..., C : C + NV * DV]  # [B, T, C]: the convolution's channels
            b, a = proj[..., C + NV * DV : C + NV * DV + NV], proj[..., C + NV * DV + NV :]
        else:  # Qwen3-Next: per key head, its q, k, then its r value heads' v and z; then b, a
            qkvz = proj[..., :qkvz_width].reshape(B, T, NK, 2 * DK + 2 * r * DV)
            ba = proj[..., qkvz_width:].reshape(B, T, NK, 2 * r)
            q, k = qkvz[..., :DK], qkvz[..., DK : 2 * DK]
            v, z = qkvz[..., 2 * DK : 2 * DK + r * DV], qkvz[..., 2 * DK + r * DV :]
            b, a = ba[..., :r].reshape(B, T, NV), ba[..., r:].reshape(B, T, NV)
            mixed = jnp.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1)  # [B, T, C]

        C = mixed.shape[-1]
        w = as_array(self.param("conv_weight", nn.initializers.lecun_normal(), (C, 1, K), self.dtype))
        w = w.reshape(C, K).T.astype(jnp.float32)  # [K, C]
        prev = (jnp.zeros((B, K - 1, C), conv_all.dtype) if fresh
                else jnp.take(conv_all, layer, axis=0, mode="clip"))
        seq = jnp.concatenate([prev, mixed.astype(conv_all.dtype)], axis=1)  # [B, K-1+T, C]
        conv = sum(seq[:, j : j + T].astype(jnp.float32) * w[j] for j in range(K))
        mixed = jax.nn.silu(conv).astype(self.dtype)
        conv_all = jax.lax.dynamic_update_slice(conv_all, seq[None, :, T:], (layer, 0, 0, 0))

        kd = NK * DK
        heads = lambda a, n, d: a.reshape(B, T, n, d).astype(jnp.float32)
        q, k = heads(mixed[..., :kd], NK, DK), heads(mixed[..., kd : 2 * kd], NK, DK)
        v = heads(mixed[..., 2 * kd :], NV, DV)
        q, k = (jnp.repeat(l2_normalize(a), r, axis=2) for a in (q, k))  # value head j reads key head j // r
        q = q * DK**-0.5
        A_log = as_array(self.param("A_log", nn.initializers.zeros, (NV,), self.dtype)).astype(jnp.float32)
        dt_bias = as_array(self.param("dt_bias", nn.initializers.ones, (NV,), self.dtype)).astype(jnp.float32)
        g = -jnp.exp(A_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)
        beta = jax.nn.sigmoid(b).astype(jnp.float32)
        g, beta = (jnp.where(token_valid[..., None], t, 0.0) for t in (g, beta))

        S = (jnp.zeros(rec_all.shape[1:], jnp.float32) if fresh
             else jnp.take(rec_all, layer, axis=0, mode="clip"))
        rule = recurrent_delta_rule if T == 1 else chunked_delta_rule
        out, S = rule(q, k, v, g, beta, S)
        rec_all = jax.lax.dynamic_update_slice(rec_all, S[None], (layer, 0, 0, 0, 0))

        # gated RMSNorm per head, as transformers' Qwen3NextRMSNormGated rounds it
        norm_w = NormWeight(DV, self.dtype, name="norm")()
        y = norm_w * rms_normalize(out.astype(self.dtype), cfg.rms_norm_eps)
        y = (y.astype(jnp.float32) * jax.nn.silu(z.reshape(B, T, NV, DV).astype(jnp.float32))).astype(self.dtype)
        out = Linear(cfg.hidden_size, self.dtype, self.kernels, name="out_proj")(y.reshape(B, T, NV * DV))
        return out, (conv_all, rec_all)
