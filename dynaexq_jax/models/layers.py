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

import functools
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from dynaexq_jax.experts.matmul import clamped_swiglu, swiglu
from dynaexq_jax.models import big_little as bl_lib
from dynaexq_jax.models import routing
from dynaexq_jax.models.big_little import BigLittle, LittleRouting
from dynaexq_jax.models.config import ModelConfig

_MASKED = -1e30  # finite, so rows with every key masked (left padding) give no NaN
SMALL_PARAM = 1 << 16  # elements: a norm's or a bias's layer, not a projection's
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
        v = jnp.take(self.stack, self.index, axis=0, mode="clip")
        if v.size > SMALL_PARAM:
            return v
        # A small parameter (a norm, a bias) is read by a kernel of its own, the slice and a
        # widening, behind a barrier: XLA would otherwise leave the slice alone beside a consumer
        # it fuses for Triton (the norms) and run it as an async copy outside the step's CUDA
        # graph, which costs a host launch or more per layer and keeps the layer loop out of one.
        return jax.lax.optimization_barrier(v.astype(jnp.float32)).astype(v.dtype)


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
    """A projection, kernel [in, out] (Flax's layout; checkpoints store [out, in]), bias optional."""

    features: int
    dtype: jnp.dtype
    kernels: bool = True  # Pallas kernels allowed (off to differentiate)
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
        y = project(x.astype(self.dtype), kernel, self.kernels)
        if self.use_bias:
            y = y + as_array(self.param("bias", nn.initializers.zeros, (self.features,), self.dtype))
        return y


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


def zero_centred_rms(x, w, eps: float):
    """Qwen3-Next's RMSNorm: the weight stored as an offset from 1, applied as (1 + w) in float32."""
    y = rms_normalize(x.astype(jnp.float32), eps) * (1.0 + w.astype(jnp.float32))
    return y.astype(x.dtype)


class ZeroCentredRMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        return zero_centred_rms(x, as_array(self.param("weight", nn.initializers.zeros, (x.shape[-1],), x.dtype)),
                                self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (Phi-3.5-MoE), computed in float32 like torch's kernel."""

    eps: float

    @nn.compact
    def __call__(self, x):
        H = x.shape[-1]
        w = as_array(self.param("weight", nn.initializers.ones, (H,), x.dtype)).astype(jnp.float32)
        b = as_array(self.param("bias", nn.initializers.zeros, (H,), x.dtype)).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + self.eps)
        return (y * w + b).astype(x.dtype)


NORMS = ("rms", "layer", "zero_centred_rms")


def make_norm(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """The family's layer and final norm: RMSNorm, LayerNorm with bias, or RMSNorm with a
    zero-centred weight (Qwen3-Next; its q/k norms are zero-centred too)."""
    if cfg.norm == "layer":
        return LayerNorm(cfg.rms_norm_eps, name=name)
    if cfg.norm == "zero_centred_rms":
        return ZeroCentredRMSNorm(cfg.rms_norm_eps, name=name)
    return RMSNorm(cfg.rms_norm_eps, name=name)


def qk_normalize(qk, num_q: int, mode: str, eps: float):
    """RMS-normalize q and k heads side by side, qk [..., q heads + k heads, D]: each head on
    its own ("per_head"), or q's and k's whole projections ("full": the mean square over all
    of q's heads, and over all of k's)."""
    if mode == "per_head":
        return rms_normalize(qk, eps)
    xf = qk.astype(jnp.float32)
    ms = jnp.mean(xf * xf, axis=-1)  # [..., heads]: equal-sized heads, so a mean of means
    is_q = jnp.arange(qk.shape[-2]) < num_q
    ms = jnp.where(is_q, jnp.mean(ms[..., :num_q], -1, keepdims=True), jnp.mean(ms[..., num_q:], -1, keepdims=True))
    return (xf * jax.lax.rsqrt(ms + eps)[..., None]).astype(qk.dtype)


def rotary(positions, head_dim: int, theta: float, dtype):
    """(cos, sin) [B, T, 1, D] of the rotary embedding at `positions` [B, T]: computed once per
    step, shared by every layer."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


ROPE_SCALINGS = (None, "longrope", "yarn")


def yarn_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """YaRN's inverse frequencies [D/2] float32, step for step as transformers computes them:
    each dim's frequency blended from the original (extrapolated) and the interpolated
    (divided by rope_factor) ones by a linear ramp between the dims that rotate beta_fast and
    beta_slow times within rope_original_max positions."""
    D, base = cfg.head_dim, cfg.rope_theta
    f32 = np.float32

    def dim_of(rotations):  # the dim that completes `rotations` turns in the original context
        return D * np.log(cfg.rope_original_max / (rotations * 2 * np.pi)) / (2 * np.log(base))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = f32(base) ** (np.arange(0, D, 2, dtype=f32) / f32(D))
    ramp = np.clip((np.arange(D // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolation = (1 - ramp).astype(f32)
    inv = (1 / (f32(cfg.rope_factor) * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv.astype(f32)


def rotary_for(cfg: ModelConfig, positions, dtype):
    """`rotary` with the config's RoPE scaling. "longrope": inv_freq divided per frequency by
    the short factors and cos/sin times the short mscale while the call's sequence (its largest
    position + 1) is within `rope_original_max`, the long ones past it (Phi-3.5-MoE's rule).
    "yarn": `yarn_inv_freq`, cos/sin times `rope_attention_factor`."""
    if cfg.rope_scaling is None:
        return rotary(positions, cfg.rotary_dim, cfg.rope_theta, dtype)
    if cfg.rope_scaling == "yarn":
        ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(yarn_inv_freq(cfg))  # [B, T, D/2]
        ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
        scale = cfg.rope_attention_factor
        return (jnp.cos(ang) * scale).astype(dtype), (jnp.sin(ang) * scale).astype(dtype)
    D = cfg.head_dim
    base = cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # [D/2]
    long = jnp.max(positions) + 1 > cfg.rope_original_max
    factor = jnp.where(long, jnp.asarray(cfg.rope_long_factor, jnp.float32),
                       jnp.asarray(cfg.rope_short_factor, jnp.float32))
    mscale = jnp.where(long, cfg.rope_long_mscale, cfg.rope_short_mscale).astype(jnp.float32)
    inv_freq = 1.0 / (factor * base)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    return (jnp.cos(ang) * mscale).astype(dtype), (jnp.sin(ang) * mscale).astype(dtype)


def rope(x, cos, sin):
    """Rotary embedding, rotate-half convention. x: [B, T, heads, D]; cos, sin [..., R]: the
    first R dims rotate, the rest pass (partial rotary, R < D)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return jnp.concatenate([rope(x[..., :R], cos, sin), x[..., R:]], -1)
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
        # q, k, v: one read of x and the weights
        Q = 2 * H * D if cfg.attn_output_gate else H * D  # gated: each q head followed by its gate head
        qkv = Linear(Q + 2 * KVH * D, self.dtype, self.kernels, cfg.qkv_bias, name="qkv_proj")(x)
        # q and k heads are adjacent: normed (q_norm, k_norm weights side by side) and rotated
        # as one array, one kernel.
        if cfg.attn_output_gate:
            qgate = qkv[..., :Q].reshape(B, T, H, 2 * D)
            gate = qgate[..., D:].reshape(B, T, H * D)
            qk = jnp.concatenate([qgate[..., :D], qkv[..., Q : Q + KVH * D].reshape(B, T, KVH, D)], axis=2)
        else:
            qk = qkv[..., : (H + KVH) * D].reshape(B, T, H + KVH, D)
        v = qkv[..., Q + KVH * D :].reshape(B, T, KVH, D)
        if cfg.qk_norm == "per_head":
            w = NormWeight(2 * D, self.dtype, name="qk_norm")().reshape(2, D)
            w = jnp.where((jnp.arange(H + KVH) < H)[:, None], w[0], w[1])  # [H + KVH, D]
            if cfg.norm == "zero_centred_rms":
                qk = zero_centred_rms(qk, w, cfg.rms_norm_eps)
            else:
                qk = w * qk_normalize(qk, H, cfg.qk_norm, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":  # weights over the whole projections: [H * D] then [KVH * D]
            w = NormWeight((H + KVH) * D, self.dtype, name="qk_norm")().reshape(H + KVH, D)
            qk = w * qk_normalize(qk, H, cfg.qk_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            qk, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (qk, v))
        qk = rope(qk, *rot)
        q, k = qk[:, :, :H], qk[:, :, H:]

        new = jnp.stack([k, v]).transpose(0, 1, 3, 2, 4)[None].astype(kv.dtype)  # [1, 2, B, KVH, T, D]
        if jnp.ndim(index) == 0:  # rows aligned by left padding: one slice of slots
            kv = jax.lax.dynamic_update_slice(kv, new, (layer, 0, 0, 0, index, 0))
        else:  # [B]: each row its own sequence (the scheduler's slots), written at its own slot
            slots = index[:, None] + jnp.arange(T)  # [B, T]
            kv = kv.at[layer, :, jnp.arange(B)[:, None], :, slots].set(new[0].transpose(1, 3, 0, 2, 4))
        qg = q.reshape(B, T, KVH, H // KVH, D)
        # gpt-oss: a learned logit per query head beside the keys', and a window on some layers
        # (the layer index is traced inside the scan, so the window is read from a table).
        sinks = None
        if cfg.attention_sinks:
            sinks = as_array(self.param("sinks", nn.initializers.zeros, (H,), self.dtype)).reshape(KVH, H // KVH)
        windows = jnp.asarray(cfg.layer_windows, jnp.int32) if cfg.sliding_layers else None
        window = None if windows is None else windows[layer]
        attend = lambda qg, k, v, start, index: _attention(qg, k, v, start, index, dtype=self.dtype, sinks=sinks,
                                                          window=window)
        if fresh:
            chunk = lambda a: a.astype(kv.dtype).transpose(0, 2, 1, 3)  # [B, KVH, T, D], slots 0..T-1
            out = attend(qg, chunk(k), chunk(v), start, 0)
        elif T == 1 and self.kernels and pallas_kernels.decode_attention_supported(D, kv.shape[4]):
            args = (qg, kv, layer, start, index)
            cuda = lambda *a: _pallas_decode_attention(*a, dtype=self.dtype, sinks=sinks, windows=windows)
            xla = lambda qg, kv, layer, start, index: attend(qg, kv[layer, 0], kv[layer, 1], start, index)
            out = jax.lax.platform_dependent(*args, cuda=cuda, default=xla)
        else:
            out = attend(qg, kv[layer, 0], kv[layer, 1], start, index)
        out = out.reshape(B, T, H * D)
        if cfg.attn_output_gate:
            out = out * jax.nn.sigmoid(gate)
        return Linear(cfg.hidden_size, self.dtype, self.kernels, cfg.o_bias, name="o_proj")(out), kv


def _attention(qg, k_cache, v_cache, start, index, *, dtype, sinks=None, window=None, scale=None):
    """qg [B, T, KVH, G, D], the queries of slots `index`.. ([] or per row [B]) over keys [B, KVH,
    S, D] and values [B, KVH, S, DV] of slots 0.., each row's real slots from `start` [B] -> [B, T,
    KVH, G, DV]. `sinks` [KVH, G]: one more logit per query head in the softmax, attending to
    nothing; `window` ([] int32, 0: none): each query sees only the `window` slots up to its own;
    `scale`: of the scores (default D^-1/2)."""
    B, T, KVH, G, D = qg.shape
    S = k_cache.shape[2]
    q_slot = jnp.reshape(index, (-1, 1)) + jnp.arange(T)  # [1 or B, T]
    slot = jnp.arange(S)[None, None, :]
    mask = (slot >= start[:, None, None]) & (slot <= q_slot[:, :, None])  # [B, T, S]
    if window is not None:
        mask &= (window == 0) | (slot > q_slot[:, :, None] - window)
    scores = mm(qg, k_cache, "btkgd,bksd->bkgts", out_dtype=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (D**-0.5 if scale is None else scale), _MASKED)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    else:  # the sink's column joins the softmax, then is dropped
        sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, :, None, None], (B, KVH, G, T, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :S].astype(dtype)
    return mm(probs, v_cache, "bkgts,bksd->btkgd")


def _pallas_decode_attention(qg, kv, layer, start, index, *, dtype, sinks=None, windows=None,
                             interpret: bool = False):
    """`windows` [L] int32: each layer's sliding window (0: none), read by the kernel at `layer`."""
    D = qg.shape[-1]
    out = pallas_kernels.decode_attention(qg[:, 0], kv, layer, start, index, scale=D**-0.5, sinks=sinks,
                                          windows=windows, interpret=interpret)
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


def shared_expert(cfg: ModelConfig, dtype, kernels: bool, x):
    """The shared expert's output for x [..., H] (a dense MLP, times sigmoid(x @ gate) if the
    family gates it). Call it inside a compact method: its modules ("shared_expert",
    "shared_expert_gate") are the caller's children, so their params sit in the MoE block's."""
    y = DenseMLP(cfg.shared_expert_size, dtype, kernels, name="shared_expert")(x)
    if cfg.shared_expert_gate:
        y = y * jax.nn.sigmoid(Linear(1, dtype, kernels, name="shared_expert_gate")(x))
    return y


class SharedExpert(nn.Module):
    """The shared expert alone, applied to a MoE block's params (the layer-by-layer runtime)."""

    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: bool = True

    @nn.compact
    def __call__(self, x):
        return shared_expert(self.cfg, self.dtype, self.kernels, x)


ROUTERS = ("softmax_topk", "sparsemixer", "topk_softmax", "sigmoid_topk")


def _sparsemixer(logits, eps: float):
    """Phi-3.5-MoE's top-2 rule at inference: the best expert, weighted by its softmax over
    the experts whose logit is within a relative 2*eps of it; then the same for the best of
    the rest. logits [BT, E] float32 -> weights, ids [BT, 2]."""
    E = logits.shape[-1]

    def pick(scores, masked):
        top = jnp.max(masked, axis=-1, keepdims=True)
        idx = jnp.argmax(masked, axis=-1)
        factor = jnp.maximum(jnp.abs(scores), top)
        gates = jax.nn.softmax(jnp.where((top - scores) / factor > 2 * eps, -jnp.inf, masked), axis=-1)
        return jnp.take_along_axis(gates, idx[:, None], axis=-1)[:, 0], idx

    w1, i1 = pick(logits, logits)
    w2, i2 = pick(logits, jnp.where(jnp.arange(E) == i1[:, None], -jnp.inf, logits))
    return jnp.stack([w1, w2], -1), jnp.stack([i1, i2], -1).astype(jnp.int32)


def route(cfg: ModelConfig, logits, correction=None):
    """Router logits [BT, E] -> probs [BT, E] (float32: the softmax, what routing statistics
    record), top_p, top_i [BT, k] (the chosen experts and their combine weights).

    "softmax_topk": softmax over all experts, the k largest, renormalised to sum to 1 if
    `norm_topk_prob` (Qwen3-MoE, Qwen2-MoE, OLMoE; Mixtral always renormalises).
    "sparsemixer": Phi-3.5-MoE's top-2 rule (`_sparsemixer`).
    "topk_softmax": the k largest logits, their softmax the weights (gpt-oss).
    "sigmoid_topk": `routing.sigmoid_topk` with the score-correction bias `correction` [E]
    (DeepSeek-V3, GLM-4.5, MiniMax-M2); probs are the sigmoid scores."""
    if cfg.router not in ROUTERS:
        raise ValueError(f"router {cfg.router!r} is not one of {ROUTERS}")
    if cfg.router == "sigmoid_topk":
        return routing.sigmoid_topk(cfg, logits, correction)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if cfg.router == "sparsemixer":
        top_p, top_i = _sparsemixer(logits.astype(jnp.float32), cfg.router_jitter)
        return probs, top_p, top_i
    if cfg.router == "topk_softmax":
        top_logits, top_i = jax.lax.top_k(logits.astype(jnp.float32), cfg.experts_per_token)
        return probs, jax.nn.softmax(top_logits, axis=-1), top_i
    top_p, top_i = jax.lax.top_k(probs, cfg.experts_per_token)  # [BT, k]
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return probs, top_p, top_i


# ffn(experts, moe_layer, x [T, H], expert_ids [T, k], weights [T, k], token_valid [T],
#     residual [T, H], activation=...) -> residual + the experts' output (added in place, one
#     kernel less); `activation` maps [rows, 2I] gate|up to [rows, I].
ExpertFFN = Callable[..., jax.Array]
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")


def expert_activation(cfg: ModelConfig):
    """The experts' activation the config names (`EXPERT_ACTIVATIONS`)."""
    if cfg.expert_activation == "clamped_swiglu":
        return functools.partial(clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    return swiglu


def router_logits(module: nn.Module, cfg: ModelConfig, dtype, kernels: bool, xt):
    """A MoE block's router logits for xt [BT, H] -> (logits [BT, E], the score-correction bias
    [E] or None). Call it inside `module`'s compact method: the router ("gate") and the bias
    (`e_score_correction_bias`, float32) are its params. Sigmoid routers run in float32, as
    their releases keep them (their choice adds a small bias to close scores)."""
    sigmoid = cfg.router == "sigmoid_topk"
    gate = Linear(cfg.num_experts, jnp.float32 if sigmoid else dtype, kernels, cfg.router_bias, name="gate")
    if not sigmoid:
        return gate(xt), None
    correction = module.param("e_score_correction_bias", nn.initializers.zeros, (cfg.num_experts,), jnp.float32)
    return gate(xt), as_array(correction)


class Router(nn.Module):
    """The router alone, applied to a MoE block's params (the layer-by-layer runtime)."""

    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: bool = True

    @nn.compact
    def __call__(self, xt):
        return router_logits(self, self.cfg, self.dtype, self.kernels, xt)


@flax.struct.dataclass
class Routing:
    """What a MoE layer's router chose, kept per layer for the statistics computed after the
    layer loop (one pass over all layers instead of scatters in every layer)."""

    # [..., T, E] float32: the router probability of each chosen expert, -1 for the others
    # (one array a layer records, from which counts and routed mass both follow).
    chosen: jax.Array
    router_probs: jax.Array | None  # [..., E] every expert's probability summed (training only)
    little: LittleRouting | None = None  # big-little decisions (`models.big_little`), when on


class MoEBlock(nn.Module):
    """Router (`route`), top-k experts from the `experts` pytree, and the shared expert if the
    family has one (its params in this block's, beside the router's)."""

    cfg: ModelConfig
    dtype: jnp.dtype
    ffn: ExpertFFN
    router_probs: bool = False  # also return the router's probabilities summed (load-balancing loss)
    kernels: bool = True

    @nn.compact
    def __call__(self, x, token_valid, experts, moe_layer, residual, big_little: BigLittle | None = None,
                 first=None):
        """-> (residual + the experts' output [B, T, H], Routing, first). `big_little` (static):
        big-little routing, with `first` [B*T] the tokens' kept share at the first MoE layer
        (set here when `moe_layer` is 0, passed through otherwise)."""
        cfg = self.cfg
        B, T, Hd = x.shape
        xt = x.reshape(B * T, Hd)
        tv = token_valid.reshape(B * T)
        logits, correction = router_logits(self, cfg, self.dtype, self.kernels, xt)
        probs, top_p, top_i = route(cfg, logits, correction)
        residual = residual.reshape(B * T, Hd)
        if cfg.shared_expert_size:
            residual = residual + shared_expert(cfg, self.dtype, self.kernels, xt)
        little = None
        valid = tv  # [BT]: every pair of a real token
        if big_little is not None:
            valid, top_p, first, little = bl_lib.choose(cfg, big_little, probs, top_p, top_i, tv, first,
                                                        moe_layer == 0)
        y = self.ffn(experts, moe_layer, xt, top_i, top_p.astype(self.dtype), valid, residual,
                     activation=expert_activation(cfg))
        # What was computed: a masked pair is neither read nor counted (hotness follows it).
        pair = valid if valid.ndim == 2 else valid[:, None]
        picked = jnp.any((top_i[:, :, None] == jnp.arange(cfg.num_experts)) & pair[:, :, None], axis=1)  # [BT, E]
        chosen = jnp.where(picked & tv[:, None], probs, -1.0)
        summed = jnp.sum(probs * tv[:, None], axis=0) if self.router_probs else None
        return y.reshape(B, T, Hd), Routing(chosen, summed, little), first
