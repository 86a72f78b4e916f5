"""Offloading baselines: LRU bookkeeping on scripted traces, exactness against `full`, no
per-token recompiles, and the budget."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget
from dynaexq_jax.io import loader
from dynaexq_jax.policies.offload import LRUSlots, OffloadPolicy
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import build_engine
from dynaexq_jax.runtime.layerwise import LayerwiseEngine

PROMPTS = [[5, 17, 42, 9, 100, 7, 250, 33, 12], [3, 4, 5]]  # two lengths: left padding in the batch
NB = 1000  # expert bytes in the scripted traces


def host_checkpoint(path):
    return loader.load(path, jnp.float32)


def offload_engine(ckpt, slots: int, *, prefetch: bool = False, staging: int | None = None) -> LayerwiseEngine:
    policy = OffloadPolicy(ckpt.experts, slots, prefetch=prefetch, staging=staging or slots)
    return LayerwiseEngine(ckpt, policy)


def test_lru_counts_a_scripted_trace_exactly():
    c = LRUSlots(2, NB)
    trace = [(0, 1), (0, 2), (0, 1), (1, 3), (0, 2), (0, 1), (0, 1)]
    got = [c.request(key) for key in trace]
    # (1, 3) evicts (0, 2), the least recently used; (0, 2) then evicts (0, 1); (0, 1) evicts (1, 3).
    assert [hit for _, hit in got] == [False, False, True, False, False, False, True]
    assert [slot for slot, _ in got] == [0, 1, 0, 1, 0, 1, 1]
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.h2d_bytes) == (2, 5, 3, 5 * NB)
    assert len(c) == 2 and (0, 1) in c and (0, 2) in c


def test_pinned_keys_are_never_evicted():
    c = LRUSlots(2, NB)
    c.request((0, 0))
    c.request((0, 1))
    slot, hit = c.request((0, 2), pinned={(0, 0), (0, 2)})  # (0, 0) is older but pinned
    assert (slot, hit) == (1, False) and (0, 0) in c and (0, 1) not in c
    with pytest.raises(RuntimeError, match="pinned"):
        c.request((0, 3), pinned={(0, 0), (0, 2), (0, 3)})


def test_prefetch_counts_hits_waste_and_evicted_guesses_exactly():
    c = LRUSlots(3, NB)
    c.request((0, 0))
    guess = {(1, 4), (1, 5)}
    assert [c.prefetch(k, pinned=guess) for k in [(1, 4), (1, 5)]] == [1, 2]
    assert c.prefetch((0, 0)) is None  # cached already: no copy
    assert c.request((1, 4)) == (1, True)
    c.end_layer(1)  # (1, 5) was not used by layer 1
    s = c.stats
    assert (s.hits, s.misses, s.prefetches, s.prefetch_bytes, s.wasted_prefetch_bytes) == (1, 1, 2, 2 * NB, NB)
    assert s.h2d_bytes == 3 * NB
    c.end_layer(1)  # counted once
    assert c.stats.wasted_prefetch_bytes == NB
    # A guess evicted before its layer runs is wasted too: (0, 2) is evicted by the next guess.
    c = LRUSlots(1, NB)
    c.prefetch((0, 2))
    c.prefetch((0, 3))
    assert (c.stats.evictions, c.stats.wasted_prefetch_bytes) == (1, NB)


def check_counters(eng, g, free_before):
    s = g.stats
    nbytes = eng.policy.bank.expert_nbytes
    assert s["h2d_bytes"] == s["misses"] * nbytes + s["prefetch_bytes"]
    assert s["promotions"] == s["misses"] + s["prefetch_bytes"] // nbytes
    assert s["wasted_prefetch_bytes"] <= s["prefetch_bytes"]
    assert s["demotions"] == max(0, s["promotions"] - free_before)  # free slots fill first, then every load evicts


def test_offload_and_prefetch_equal_full_token_for_token_with_evictions(hf_checkpoint):
    path, _ = hf_checkpoint
    full = engine.Engine(loader.load(path, jnp.float32))
    ref = full.generate(PROMPTS, 24, eos_token_ids=())
    full_logits = full.logits(PROMPTS)
    k = full.cfg.experts_per_token
    # Fewest slots: evicting all the time. Staging 1: one copy in flight, one guess per layer.
    for prefetch, staging in ((False, None), (True, 1)):
        eng = offload_engine(host_checkpoint(path), k, prefetch=prefetch, staging=staging)
        g = eng.generate(PROMPTS, 24, eos_token_ids=())
        assert g.tokens == ref.tokens
        np.testing.assert_array_equal(g.expert_counts, ref.expert_counts)
        assert set(ref.stats) <= set(g.stats)
        check_counters(eng, g, free_before=k)
        assert g.stats["demotions"] > 0 and g.stats["hi_hit_rate"] < 1
        assert (g.stats["prefetch_bytes"] > 0) == prefetch
        for ours, theirs in zip(eng.logits(PROMPTS), full_logits):
            np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_a_cache_of_every_expert_loads_each_used_expert_once(moe_checkpoint):
    path, _ = moe_checkpoint
    ckpt = host_checkpoint(path)
    eng = offload_engine(ckpt, 10**6)
    assert eng.policy.num_slots == len(ckpt.config.moe_layers) * ckpt.config.num_experts
    g = eng.generate(PROMPTS, 24, eos_token_ids=())
    s = g.stats
    assert s["misses"] == np.count_nonzero(g.expert_counts) and s["demotions"] == 0
    assert s["h2d_bytes"] == s["misses"] * eng.policy.bank.expert_nbytes
    again = eng.generate(PROMPTS, 24, eos_token_ids=())  # the cache carries over: nothing moves
    assert again.tokens == g.tokens
    assert (again.stats["misses"], again.stats["h2d_bytes"], again.stats["hi_hit_rate"]) == (0, 0, 1.0)


def test_prefetch_decodes_without_recompiling_per_token(moe_checkpoint):
    path, _ = moe_checkpoint
    ckpt = host_checkpoint(path)
    eng = offload_engine(ckpt, ckpt.config.experts_per_token, prefetch=True)
    eng.generate(PROMPTS, 4, eos_token_ids=())  # compiles the prefill and decode buckets
    compiled, compile_s = len(eng._executables), eng.compile_s
    free_before = eng.policy.num_slots - len(eng.policy.cache)
    g = eng.generate([PROMPTS[1], PROMPTS[0][::-1]], 40, eos_token_ids=())  # same buckets, 10x the tokens
    assert len(eng._executables) == compiled and eng.compile_s == compile_s
    assert len(g.tokens[0]) == 40
    check_counters(eng, g, free_before)


def test_build_engine_sizes_the_cache_from_the_budget(moe_checkpoint):
    path, _ = moe_checkpoint
    ckpt = host_checkpoint(path)
    kw = dict(batch=1, longest_prompt=len(PROMPTS[0]), max_new_tokens=8)
    eng, plan = build_engine(ckpt, "offload", budget=None, **kw)
    assert plan.fallback == 0 and plan.slots == eng.policy.num_slots == plan.num_experts_total
    assert plan.slot_bytes == eng.policy.bank.expert_nbytes
    per_slot = plan.slot_bytes
    budget_bytes = plan.minimum + 3 * per_slot + 7  # room for exactly three slots
    eng, plan = build_engine(ckpt, "prefetch", budget=budget_bytes, **kw)
    assert plan.slots == eng.policy.num_slots == 3 and eng.policy.prefetch_enabled and plan.total <= budget_bytes
    k = ckpt.config.experts_per_token
    minimum = plan.minimum + k * per_slot
    with pytest.raises(budget.BudgetError, match=rf"the minimum is [\d.]+ MB \({minimum} bytes\)") as e:
        build_engine(ckpt, "offload", budget=plan.minimum + k * per_slot - 1, **kw)
    assert "\n" not in str(e.value)
