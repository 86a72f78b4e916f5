"""The GPU's decode path (`models.fused_decode`: six Pallas kernels a layer) gives the logits,
cache and routing record of the decoder's own layers (the path pinned against transformers
elsewhere), its kernels interpreted on the CPU; and lowering the decoder for CUDA picks it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.experts import quant
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier
from dynaexq_jax.models import fused_decode, registry
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.decoder import Decoder, KVCache

TINY = "checkpoints/tiny-qwen3-moe/config.json"
# gpt-oss's quirks at CPU size: sinks, a sliding window on alternate layers, biases on
# attention, router and experts, YaRN, the clamped SwiGLU and top-k-then-softmax routing.
GPT_OSS = dict(model_type="gpt_oss", vocab_size=256, hidden_size=64, intermediate_size=32, head_dim=32,
               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, num_local_experts=8,
               num_experts_per_tok=2, attention_bias=True, sliding_window=3, swiglu_limit=7.0, rms_norm_eps=1e-5,
               rope_theta=150000, tie_word_embeddings=False, max_position_embeddings=4096,
               layer_types=["sliding_attention", "full_attention"],
               rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                 original_max_position_embeddings=4096))


def _assert_close(out, ref, rel):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=0, atol=rel * np.abs(ref).max())


def _experts(cfg: ModelConfig, rng, lo):
    """Every expert in a `lo` tier (int4 or MXFP4), three in float32 slots, one without a row."""
    L, E, H, I = len(cfg.moe_layers), cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gu = jnp.asarray(rng.standard_normal((L * E, H, 2 * I)) * 0.2, jnp.float32)
    dn = jnp.asarray(rng.standard_normal((L * E, I, H)) * 0.2, jnp.float32)
    pack = quant.quantize_mxfp4 if lo == "mxfp4" else (lambda w: quant.quantize(w, 4, 32))
    tier_of = np.zeros((L, E), np.int32)
    row_of = np.arange(L * E, dtype=np.int32).reshape(L, E)
    tier_of[-1, [1, 3, 4]], row_of[-1, [1, 3, 4]] = 1, [2, 0, 1]
    row_of[0, 2] = -1
    biases = {}
    if cfg.expert_bias:
        biases = dict(gate_up_bias=jnp.asarray(rng.standard_normal((L, E, 2 * I)), jnp.float32),
                      down_bias=jnp.asarray(rng.standard_normal((L, E, H)), jnp.float32))
    return ExpertState((ExpertTier(pack(gu), pack(dn), high_precision=False), ExpertTier(gu[:3] * 1.5, dn[:3])),
                       jnp.asarray(tier_of), jnp.asarray(row_of), **biases)


@pytest.mark.parametrize("family, lo, index", [("qwen3_moe", 4, "aligned"), ("gpt_oss", "mxfp4", "per_row")])
def test_fused_decode_gives_the_decoders_own_logits_cache_and_routing(family, lo, index):
    cfg = registry.read_config(TINY) if family == "qwen3_moe" else registry.adapter_for(GPT_OSS).config_from_hf(GPT_OSS)
    rng = np.random.default_rng(0)
    own, fused = Decoder(cfg, jnp.float32), Decoder(cfg, jnp.float32, interpret=True)
    params = own.init(jax.random.key(1))
    experts = _experts(cfg, rng, lo)
    B, T, S = 3, 6, 32
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.ones((B, T), bool).at[1, :2].set(False)  # row 1 left-padded
    cache = KVCache.empty(cfg, B, S, jnp.float32)
    _, cache, _ = jax.jit(lambda c: own(params, experts, c, tokens, positions, valid, fresh=True))(cache)
    if index == "per_row":  # the scheduler's rows: each its own next slot
        cache = cache.replace(index=jnp.asarray([T, T, T - 1], jnp.int32))
    step = (tokens[:, -1:], positions[:, -1:] + 1, jnp.ones((B, 1), bool).at[2].set(False))  # row 2 stopped
    a = jax.jit(lambda c: own(params, experts, c, *step))(cache)
    b = jax.jit(lambda c: fused(params, experts, c, *step))(cache)
    _assert_close(b[0], a[0], 1e-5)
    _assert_close(b[1].kv, a[1].kv, 1e-5)
    np.testing.assert_allclose(np.asarray(b[2].chosen), np.asarray(a[2].chosen), atol=1e-6, rtol=0)


def test_lowering_the_decoder_for_cuda_runs_the_fused_layer_kernels_only_when_opted_in(monkeypatch):
    """The decode step lowered for a GPU (from this CPU, as the engine's would be on one) is the
    fused layer's kernels when DYNAEXQ_FUSED_DECODE=1 (`fused_decode.ENABLED`), XLA's own step
    (the tiled expert kernel) by default; prefill keeps the per-module path either way."""
    cfg = registry.read_config(TINY)
    dec = Decoder(cfg, jnp.bfloat16)
    params = dec.param_shapes()
    experts = _experts(cfg, np.random.default_rng(0), 4)
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, 2, 64, jnp.bfloat16))

    def lowered(T):
        ids = jax.ShapeDtypeStruct((2, T), jnp.int32)
        fn = jax.jit(lambda p, e, c, t, ps, v: dec(p, e, c, t, ps, v, fresh=T > 1)[0])
        return fn.trace(params, experts, cache, ids, ids, jax.ShapeDtypeStruct((2, T), bool)).lower(
            lowering_platforms=("cuda",)).as_text()

    assert "tiled_matmul" in lowered(1) and "moe_route" not in lowered(1)  # the default: XLA's step
    monkeypatch.setattr(fused_decode, "ENABLED", True)
    decode, prefill = lowered(1), lowered(8)
    for kernel in ("attn_in", "decode_attention", "attn_out", "moe_route", "moe_gate_up", "moe_down"):
        assert kernel in decode, kernel
    assert "tiled_matmul" not in decode and "tiled_matmul" in prefill and "moe_route" not in prefill
