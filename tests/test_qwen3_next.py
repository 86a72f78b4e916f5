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

from dynaexq_jax import budget
from dynaexq_jax.io import loader, preset
from dynaexq_jax.models import deltanet
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.policies import dynaexq
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import build_engine

from conftest import VOCAB, write_tokenizer
from test_families import hf_generate

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              shared_expert_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, initializer_range=0.15, eos_token_id=0, linear_key_head_dim=8,
              linear_value_head_dim=8, linear_conv_kernel_dim=4)
# Layer patterns: linear layers around a full one (the last two one scanned segment), two value
# heads per key head; the interval rule without layer_types (full attention every 2nd layer), a
# dense layer and tied embeddings, one value head per key head.
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
            if n.endswith(("norm.weight", "dt_bias")):
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


@pytest.fixture(scope="module")
def hybrid_engine(tmp_path_factory):
    _, _, hf, eng = checkpoint(tmp_path_factory, "hybrid")
    return eng, hf


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


def test_greedy_tokens_match_transformers_batched(hybrid_engine):
    eng, hf = hybrid_engine
    ours = eng.generate(PROMPTS, max_new_tokens=12, eos_token_ids=()).tokens
    # Left padding must not reach the short rows' recurrent states.
    assert ours == hf_generate(hf, PROMPTS, 12)
    assert len(set(ours[0])) > 2, "degenerate reference: the test would not tell much"


def test_greedy_tokens_match_transformers_single(hybrid_engine):
    eng, hf = hybrid_engine
    prompt = LONG[:14]  # the chat test's bucket: its steps compile once
    assert eng.generate([prompt], max_new_tokens=4, eos_token_ids=()).tokens == hf_generate(hf, [prompt], 4)


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
    first = LONG[:6]  # every conversation below stays within one prompt bucket (16)
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


# ----------------------------------------------------------------- policies and tiers


def test_int4_slots_over_int2_fallbacks_serve_every_slotted_expert_as_static_int4(hybrid_engine):
    """DynaExq's 80B tiers through the same kernels: with every expert in an int4 slot (no
    budget), dynaexq over int2 fallbacks computes what static int4 computes."""
    eng, _ = hybrid_engine
    build = lambda policy, **o: build_engine(eng.checkpoint, policy, budget=None, batch=1, longest_prompt=len(LONG),
                                             max_new_tokens=4, opts=dynaexq.DynaExqOptions(group_size=16, **o))[0]
    tiered = build("dynaexq", lo_bits=2, hi_dtype="int4")
    assert [t.high_precision for t in tiered.policy.experts.tiers] == [False, True]
    static = build("static", lo_bits=4)
    np.testing.assert_allclose(tiered.logits([LONG])[0], static.logits([LONG])[0], atol=1e-6, rtol=0)


def test_prefetch_runs_the_linear_layers_like_the_decoder(hybrid_engine):
    from dynaexq_jax.policies.offload import OffloadPolicy
    from dynaexq_jax.runtime.layerwise import LayerwiseEngine

    full, _ = hybrid_engine
    ckpt = full.checkpoint
    k = ckpt.config.experts_per_token
    eng = LayerwiseEngine(ckpt, OffloadPolicy(ckpt.experts, k, prefetch=True, staging=k))
    for ours, theirs in zip(eng.logits(PROMPTS), full.logits(PROMPTS)):  # left padding, two chunks
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # experts summed in rounds


# ----------------------------------------------------------------- the published model's plan


def test_80b_preset_has_transformers_qwen3_next_shapes_and_80b_parameters():
    from transformers import Qwen3NextConfig

    ref = Qwen3NextConfig()  # transformers' defaults are the 80B model's
    d = preset.QWEN3_NEXT_80B
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads",
              "linear_num_value_heads", "linear_value_head_dim", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "shared_expert_intermediate_size", "rms_norm_eps"):
        assert d[f] == getattr(ref, f), f
    cfg = preset.preset_config("qwen3-next-80b-a3b")
    assert cfg.linear_layers == tuple(i for i, t in enumerate(ref.layer_types) if t == "linear_attention")
    assert cfg.rotary_dim == 64 and len(cfg.moe_layers) == 48
    assert round(budget.parameter_count(cfg) / 1e9) == 80


def test_cache_plan_counts_the_linear_states_like_the_kv_cache(hybrid_engine):
    cfg = hybrid_engine[0].cfg
    cache = KVCache.empty(cfg, 3, 128, jnp.float32)
    held = sum(a.nbytes for a in jax.tree.leaves(cache)) - cache.index.nbytes
    assert KVCache.nbytes_for(cfg, 3, 128, jnp.float32) == held
    assert cache.recurrent.shape == (len(cfg.linear_layers), 3, 4, 8, 8) and cache.kv.shape[0] == 1
    assert budget.kv_cache_nbytes(cfg, 3, 128, 4) == held - cache.start.nbytes + 3 * 128  # + the validity mask


def test_dry_run_fits_the_80b_int2_fallbacks_and_int4_slots_in_48gb(tmp_path, capsys):
    from test_families import _generate_script

    generate = _generate_script()
    (tmp_path / "config.json").write_text(json.dumps(preset.QWEN3_NEXT_80B))
    args = ["--model", str(tmp_path), "--dry-run", "--policy", "dynaexq", "--hi-dtype", "int4", "--lo-bits", "2",
            "--group-size", "64"]
    assert generate.main(args + ["--budget", "48GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    cfg = preset.preset_config("qwen3-next-80b-a3b")
    gu, dn = budget.expert_shapes(cfg)
    assert plan["fallback"] == 48 * (budget.quantized_nbytes((512,) + gu, 2, 64)
                                     + budget.quantized_nbytes((512,) + dn, 2, 64))
    assert plan["slot_bytes"] == budget.quantized_nbytes(gu, 4, 64) + budget.quantized_nbytes(dn, 4, 64)
    assert plan["total"] <= 48e9 and 48e9 - plan["total"] < plan["slot_bytes"]
    assert 100 * 48 < plan["slots"] < 512 * 48
    assert generate.main(args + ["--budget", "48GB"]) == 0
    assert "per MoE layer: 210 to 211 of 512 experts hold a high-precision slot" in capsys.readouterr().out
    assert generate.main(args + ["--budget", "20GB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: budget 20.00 GB cannot hold the int2 fallback")
    assert f"({plan['minimum']} bytes)" in err


def test_int4_slots_over_a_wider_fallback_are_refused(tmp_path, capsys):
    from test_families import _generate_script

    (tmp_path / "config.json").write_text(json.dumps(preset.QWEN3_NEXT_80B))
    assert _generate_script().main(["--model", str(tmp_path), "--dry-run", "--policy", "dynaexq", "--hi-dtype",
                                    "int4", "--lo-bits", "8"]) == 2
    assert "int4 slots over an int8 fallback would lose precision" in capsys.readouterr().err


def test_bench_runs_the_qwen3_next_smoke_preset_with_int4_slots(tmp_path):
    from dynaexq_jax.cli import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "qwen3-next-smoke", "--policies", "dynaexq/int4", "--lo-bits", "2",
                       "--batch-sizes", "2", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1",
                       "--quality-seqs", "1", "--dtype", "float32", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["policy"] == "dynaexq/int4" and row["decode_tokens_per_s"] > 0
    assert 0 <= row["top1_agreement"] <= 1


def test_continuous_batching_gives_each_sequence_its_own_recurrent_state(hybrid_engine):
    """Sequences joining and leaving the scheduler's rows (a reused row, a prompt over several
    chunks) generate what each generates alone: a row's linear-attention state starts from zero
    and never mixes with its neighbours'."""
    from dynaexq_jax.runtime.scheduler import Scheduler, Sequence

    eng, _ = hybrid_engine
    requests = [(LONG[:40], 6), ([64, 3], 9), ([8, 8, 19, 200, 45], 4), (LONG[50:57], 7)]
    sch = Scheduler(eng, max_batch=2, context=64, max_chunk=16, eos_token_ids=()).start()
    try:
        seqs = [sch.submit(Sequence(ids, n)) for ids, n in requests]
        assert all(s.done.wait(120) for s in seqs)
    finally:
        sch.close(30)
    for (ids, n), seq in zip(requests, seqs):
        assert seq.tokens == eng.generate([ids], max_new_tokens=n, eos_token_ids=()).tokens[0]
