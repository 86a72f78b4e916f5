"""Big-little routing (`models.big_little`): off-equivalence for every policy, consistent
statistics, dropped pairs neither computed nor transferred, static shapes, flag errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.errors import UserError
from dynaexq_jax.io import loader
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.policies import dynaexq
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import build_engine

PROMPTS = [[5, 17, 42, 9, 100, 7, 250, 33, 12], [3, 4, 5]]  # left padding in the batch
OPTS = dynaexq.DynaExqOptions(lo_bits=4, group_size=16, rebalance_every=2)
NEW = 6


def build(checkpoint, policy, big_little=None):
    ckpt = loader.load(checkpoint[0], jnp.float32)
    eng, _ = build_engine(ckpt, policy, budget=None, batch=2, longest_prompt=len(PROMPTS[0]), max_new_tokens=NEW,
                          opts=OPTS, big_little=big_little)
    return eng


@pytest.mark.parametrize("policy", ["full", "static", "dynaexq", "offload", "prefetch"])
def test_little_k_equal_k_or_no_little_token_gives_the_plain_output(moe_checkpoint, policy):
    eng = build(moe_checkpoint, policy)
    k = eng.cfg.experts_per_token
    plain = eng.generate(PROMPTS, NEW, eos_token_ids=())
    plain_logits = eng.logits(PROMPTS)
    # every token little but keeping all k experts; little_k < k but no token reaches the threshold
    for bl in (BigLittle(k, "router", 0.0), BigLittle(1, "first", math.inf)):
        eng.big_little = bl
        got = eng.generate(PROMPTS, NEW, eos_token_ids=())
        assert got.tokens == plain.tokens
        np.testing.assert_array_equal(got.expert_counts, plain.expert_counts)
        for a, b in zip(eng.logits(PROMPTS), plain_logits):
            np.testing.assert_array_equal(a, b)
        assert got.stats["big_little"]["pairs_saved"] == 0


@pytest.mark.parametrize("policy", ["full", "offload"])
def test_counts_add_up_and_hotness_counts_only_computed_pairs(moe_checkpoint, policy):
    # Threshold at the kept share's minimum (little_k/k): every token is marked little; the
    # floor sends the ones whose top expert holds under 75% of their mass back to big.
    bl = BigLittle(1, "first", 0.5, floor=0.75)
    eng = build(moe_checkpoint, policy, bl)
    cfg = eng.cfg
    k, L = cfg.experts_per_token, len(cfg.moe_layers)
    g = eng.generate(PROMPTS, NEW, eos_token_ids=())
    s = g.stats["big_little"]
    tokens = sum(map(len, PROMPTS)) + len(PROMPTS) * (NEW - 1)
    assert s["tokens"] == tokens and s["little_tokens"] + s["big_tokens"] == tokens
    assert s["little_token_layers"] + s["big_token_layers"] == tokens * L
    assert s["little_tokens"] == tokens  # "first" marks each token once, for every layer
    assert 0 < s["fallbacks"] < tokens * L
    assert s["pairs_saved"] == (s["little_tokens"] * L - s["fallbacks"]) * (k - bl.little_k)
    assert int(g.expert_counts.sum()) == tokens * L * k - s["pairs_saved"]
    assert s["bytes_saved"] > 0


def test_the_router_rule_decides_per_layer_and_never_falls_back_above_its_threshold(moe_checkpoint):
    eng = build(moe_checkpoint, "full", BigLittle(1, "router", 0.8, floor=0.7))
    s = eng.generate(PROMPTS, NEW, eos_token_ids=()).stats["big_little"]
    k, L = eng.cfg.experts_per_token, len(eng.cfg.moe_layers)
    assert s["fallbacks"] == 0 and 0 < s["little_token_layers"] < s["tokens"] * L
    assert s["pairs_saved"] == s["little_token_layers"] * (k - 1)


def test_every_token_little_equals_the_model_routed_top_little_k(hf_checkpoint):
    """A little token's weights are the family's own top-little_k routing (renormalised or not)."""
    ckpt = loader.load(hf_checkpoint[0], jnp.float32)
    cfg = ckpt.config
    eng = engine.Engine(ckpt, big_little=BigLittle(1, "router", 0.0))
    small = engine.Engine(dataclasses.replace(ckpt, config=dataclasses.replace(cfg, experts_per_token=1)))
    for a, b in zip(eng.logits(PROMPTS), small.logits(PROMPTS)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_dropped_pairs_are_not_transferred_by_offload(moe_checkpoint):
    plain = build(moe_checkpoint, "offload").generate(PROMPTS, NEW, eos_token_ids=()).stats
    little_engine = build(moe_checkpoint, "offload", BigLittle(1, "router", 0.0))
    little = little_engine.generate(PROMPTS, NEW, eos_token_ids=()).stats
    assert little["h2d_bytes"] < plain["h2d_bytes"] and little["misses"] < plain["misses"]


def test_prefetch_plans_with_the_first_layer_mode(moe_checkpoint):
    """Under "first" a token's mode at every later layer is known before that layer runs: the
    prefetcher's guess counts only the pairs the token will compute."""
    eng = build(moe_checkpoint, "prefetch", BigLittle(1, "first", 0.5))  # threshold at the minimum: all little
    B, T, H = 2, 3, eng.cfg.hidden_size
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, H)), jnp.float32)
    valid = jnp.asarray(np.array([[True, True, True], [False, True, True]]))
    seg, nj = eng.params["layers"][0], jnp.int32(1)
    first = jnp.ones((B * T,), jnp.float32)
    little = eng.functions.jitted["predict"](seg, nj, x, valid, first)
    eng.big_little = None
    plain = eng.functions.jitted["predict"](seg, nj, x, valid, first)
    assert int(little.sum()) == 5 * 1 and int(plain.sum()) == 5 * eng.cfg.experts_per_token


def test_one_compile_per_bucket_and_per_setting(moe_checkpoint):
    eng = build(moe_checkpoint, "dynaexq", BigLittle(1, "first", 0.7))
    eng.generate(PROMPTS, NEW, eos_token_ids=())
    compiled = len(eng._compiled)
    eng.generate([[9, 8, 7, 6], [1, 2]], NEW, eos_token_ids=())  # same buckets
    assert len(eng._compiled) == compiled
    eng.big_little = BigLittle(1, "router", 0.7)  # another setting: its own steps
    eng.generate(PROMPTS, NEW, eos_token_ids=())
    assert len(eng._compiled) > compiled
    compiled = len(eng._compiled)
    eng.big_little = BigLittle(1, "first", 0.7)  # back: nothing new
    eng.generate(PROMPTS, NEW, eos_token_ids=())
    assert len(eng._compiled) == compiled


def test_big_little_counts_stay_on_the_device_between_reads(moe_checkpoint):
    eng = build(moe_checkpoint, "full", BigLittle(1, "router", 0.7))
    eng.generate(PROMPTS, NEW, eos_token_ids=())  # compile outside the guard
    before = eng.host_reads
    with jax.transfer_guard("disallow"):  # any implicit host<->device transfer raises
        g = eng.generate(PROMPTS, 12, eos_token_ids=())
    assert eng.host_reads - before == 12 + 1  # one lagged token read per step, one final read
    assert g.stats["big_little"]["tokens"] == sum(map(len, PROMPTS)) + 2 * 11


@pytest.mark.parametrize("kw, needle", [
    (dict(little_k=0), "--little-k must be a positive integer"),
    (dict(little_k=1, rule="entropy"), "--importance"),
    (dict(little_k=1, floor=1.5), "--little-floor"),
    (dict(little_k=1, threshold=math.nan), "--little-threshold"),
])
def test_bad_settings_are_one_line_errors(kw, needle):
    with pytest.raises(UserError, match=needle) as e:
        BigLittle(**kw)
    assert "\n" not in str(e.value)


def test_little_k_above_k_names_the_range(moe_checkpoint):
    eng = engine.Engine(loader.load(moe_checkpoint[0], jnp.float32))
    with pytest.raises(UserError, match="between 1 and 2"):
        eng.big_little = BigLittle(3)
