"""Qwen3-Next (hybrid gated-DeltaNet / softmax-attention MoE) against transformers' own model
on tiny checkpoints written by `save_pretrained` (float32), and the delta rule's two forms
against a float64 numpy recurrence.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dynaexq_jax.models import deltanet
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.io import loader
from dynaexq_jax.runtime import engine

from conftest import VOCAB, write_tokenizer

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              shared_expert_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, initializer_range=0.15, eos_token_id=0, linear_key_head_dim=8,
              linear_value_head_dim=8, linear_conv_kernel_dim=4)
# Layer patterns: linear layers around a full one (two value heads per key head); the interval
# rule without layer_types (full attention every 2nd layer), a dense layer and tied embeddings,
# one value head per key head.
CONFIGS = {
    "hybrid": dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, linear_num_key_heads=2,
                   linear_num_value_heads=4, tie_word_embeddings=False,
                   layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"]),
    "interval-dense-tied": dict(num_hidden_layers=3, num_experts=6, num_experts_per_tok=3, linear_num_key_heads=2,
                                linear_num_value_heads=2, tie_word_embeddings=True, mlp_only_layers=[2],
                                norm_topk_prob=False, full_attention_interval=2),
}
# One prompt longer than a prefill chunk (64 tokens), short ones beside it (left padding).
_rng = np.random.RandomState(1)
LONG = [int(t) for t in _rng.randint(1, VOCAB, 100)]
PROMPTS = [LONG, [64, 3], [8, 8, 19, 200, 45]]


def make_checkpoint(path, name: str, seed: int = 0):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    kw = {**COMMON, **CONFIGS[name]}
    interval = kw.pop("full_attention_interval", None)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**kw, **({"full_attention_interval": interval} if interval else {})))
    with torch.no_grad():  # transformers inits the zero-centred norms at 0 and dt_bias at 1: make them count
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("dt_bias"):
                p.normal_(0.0, 0.3)
    model.eval().save_pretrained(path)
    if interval:  # the interval rule, as the published config.json states it
        d = json.loads((path / "config.json").read_text())
        del d["layer_types"]
        d["full_attention_interval"] = interval
        (path / "config.json").write_text(json.dumps(d))
    write_tokenizer(path)
    return model


_MADE: dict[str, tuple] = {}


def checkpoint(tmp_path_factory, name: str):
    """(name, directory, transformers model, float32 Engine), made once per session."""
    if name not in _MADE:
        path = tmp_path_factory.mktemp(f"hf-qwen3-next-{name}")
        hf = make_checkpoint(path, name)
        _MADE[name] = name, path, hf, engine.Engine(loader.load(path, jnp.float32))
    return _MADE[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def next_checkpoint(request, tmp_path_factory):
    return checkpoint(tmp_path_factory, request.param)[:3]


@pytest.fixture(scope="module")
def next_engine(next_checkpoint, tmp_path_factory):
    _, _, hf, eng = checkpoint(tmp_path_factory, next_checkpoint[0])
    return eng, hf


def hf_generate(hf, prompts, n):
    """transformers' greedy generate on left-padded prompts -> the new tokens of each."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[:, P:].tolist()


def test_config_reads_the_layer_pattern(next_checkpoint):
    name, path, hf = next_checkpoint
    cfg = loader.load(path, jnp.float32).config
    types = hf.config.layer_types
    assert cfg.linear_layers == tuple(i for i, t in enumerate(types) if t == "linear_attention")
    assert cfg.rotary_dim == 4 and cfg.norm == "zero_centred_rms" and cfg.attn_output_gate
    assert [(s.attention, s.count) for s in cfg.segments] == {
        "hybrid": [("linear", 1), ("full", 1), ("linear", 2)],
        "interval-dense-tied": [("linear", 1), ("full", 1), ("linear", 1)]}[name]


def test_logits_match_transformers_at_every_position(next_engine):
    eng, hf = next_engine
    for ids, lg in zip(PROMPTS, eng.logits(PROMPTS)):  # one left-padded batch, 128 slots: two chunks
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_batched(next_engine):
    eng, hf = next_engine
    ours = eng.generate(PROMPTS, max_new_tokens=12, eos_token_ids=()).tokens
    # Left padding must not reach the short rows' recurrent states.
    assert ours == hf_generate(hf, PROMPTS, 12)
    assert len(set(ours[0])) > 2, "degenerate reference: the test would not tell much"


@pytest.fixture(scope="module")
def hybrid_engine(tmp_path_factory):
    _, _, hf, eng = checkpoint(tmp_path_factory, "hybrid")
    return eng, hf


def test_greedy_tokens_match_transformers_single(hybrid_engine):
    eng, hf = hybrid_engine
    assert eng.generate([LONG], max_new_tokens=12, eos_token_ids=()).tokens == hf_generate(hf, [LONG], 12)


def _numpy_delta_rule(q, k, v, g, beta, S):
    """The gated delta rule token by token in float64 (the definition)."""
    q, k, v, g, beta, S = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, S))
    out = np.zeros(v.shape)
    for t in range(q.shape[1]):
        S = S * np.exp(g[:, t])[..., None, None]
        delta = (v[:, t] - np.einsum("bhkv,bhk->bhv", S, k[:, t])) * beta[:, t][..., None]
        S = S + k[:, t][..., None] * delta[..., None, :]
        out[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t])
    return out, S


def test_chunked_and_recurrent_delta_rules_equal_the_float64_recurrence():
    B, T, H, DK, DV = 2, 70, 3, 8, 4  # 70 tokens: a full chunk of 64 and a padded one
    rng = np.random.RandomState(0)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    q, k = unit(rng.randn(B, T, H, DK)) * DK**-0.5, unit(rng.randn(B, T, H, DK))
    v = rng.randn(B, T, H, DV)
    g = -rng.uniform(0.0, 2.0, (B, T, H))
    beta = rng.uniform(0.0, 1.0, (B, T, H))
    S0 = rng.randn(B, H, DK, DV)
    ref_out, ref_S = _numpy_delta_rule(q, k, v, g, beta, S0)
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta, S0)]
    for rule in (deltanet.chunked_delta_rule, deltanet.recurrent_delta_rule):
        out, S = jax.jit(rule)(*args)
        np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
        np.testing.assert_allclose(S, ref_S, atol=2e-5, rtol=0)


def test_decode_after_a_chunked_prefill_equals_a_token_by_token_run(hybrid_engine):
    eng, _ = hybrid_engine
    cfg, dec = eng.cfg, Decoder(eng.cfg, jnp.float32)
    experts = eng.policy.experts
    step = jax.jit(lambda cache, t, pos, fresh: dec(eng.params, experts, cache, t, pos, jnp.ones_like(t, bool),
                                                   fresh=fresh)[:2], static_argnums=3)
    n, extra = 70, 3  # a chunk of 64 and a padded one
    ids = jnp.asarray([LONG[:n] + [7, 11, 13]], jnp.int32)
    positions = jnp.arange(n + extra, dtype=jnp.int32)[None]
    # chunked prefill, then decode steps
    logits, cache = step(KVCache.empty(cfg, 1, 128, jnp.float32), ids[:, :n], positions[:, :n], True)
    chunked = [logits[0, -1]]
    for t in range(n, n + extra):
        logits, cache = step(cache, ids[:, t : t + 1], positions[:, t : t + 1], False)
        chunked.append(logits[0, -1])
    # the recurrence from the first token
    rec = KVCache.empty(cfg, 1, 128, jnp.float32)
    stepwise = []
    for t in range(n + extra):
        logits, rec = step(rec, ids[:, t : t + 1], positions[:, t : t + 1], False)
        stepwise.append(logits[0, -1])
    np.testing.assert_allclose(np.stack(chunked), np.stack(stepwise[n - 1 :]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cache.recurrent, rec.recurrent, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.conv, rec.conv, atol=1e-5, rtol=0)


def test_chat_turns_continue_and_rewind_the_recurrent_state_exactly(hybrid_engine):
    """Each turn's greedy reply equals a fresh `generate` of the whole conversation: a turn that
    extends the last continues the states; one that rewrites the last reply restarts from the
    prompt's snapshot; one that rewrites the first turn recomputes from the start."""
    eng, _ = hybrid_engine
    session = eng.new_session(context=64, max_chunk=1)  # token by token: the recurrent form throughout
    n = 4
    first = LONG[:6]
    turns = [first]
    reply = eng.chat_turn(session, first, n, eos_token_ids=()).tokens[0]
    turns.append(first + reply + [5, 6])  # continues: nothing recomputed
    reply = eng.chat_turn(session, turns[-1], n, eos_token_ids=()).tokens[0]
    assert eng.generate([turns[-1]], n, eos_token_ids=()).tokens[0] == reply
    assert session.snapshot[0] == len(turns[-1])
    turns.append(turns[-1] + [(reply[0] + 1) % VOCAB, 9])  # another reply: restarts at the snapshot
    gen = eng.chat_turn(session, turns[-1], n, eos_token_ids=())
    assert gen.stats["reused_tokens"] == len(turns[-2])
    assert gen.tokens[0] == eng.generate([turns[-1]], n, eos_token_ids=()).tokens[0]
    turns.append([3] + turns[-1][1:])  # the first token rewritten: recomputed from the start
    gen = eng.chat_turn(session, turns[-1], n, eos_token_ids=())
    assert gen.stats["reused_tokens"] == 0
    assert gen.tokens[0] == eng.generate([turns[-1]], n, eos_token_ids=()).tokens[0]
