"""The DynaExq policy: warm start, mixed-precision experts, budget, asynchronous swaps."""

from __future__ import annotations

import dataclasses
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier, single_tier
from dynaexq_jax.experts.swap import Transfer, stage
from dynaexq_jax.io import loader, store
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.policies import dynaexq
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import build_engine

PROMPT = [5, 17, 42, 9, 100, 7, 250, 33, 12]
OPTS = dynaexq.DynaExqOptions(lo_bits=4, group_size=16, rebalance_every=2)


def build(path, budget_bytes=None, opts=OPTS, policy="dynaexq", batch=1, **kw):
    ckpt = loader.load(path, jnp.float32)
    return build_engine(ckpt, policy, budget=budget_bytes, batch=batch, longest_prompt=len(PROMPT), max_new_tokens=24,
                        opts=opts, **kw)


def write_profile(path, scores):
    scores = np.asarray(scores, float)
    path.write_text(json.dumps({"layers": scores.shape[0], "experts": scores.shape[1], "half_life_steps": 256.0,
                                "scores": scores.tolist()}))
    return str(path)


def slots_for(path, n):
    """A budget with room for exactly `n` slots."""
    cfg = loader.load(path, jnp.float32).config
    probe = budget.policy_plan(cfg, "dynaexq", budget=None, batch=1, prompt=16, context=128, dtype_itemsize=4,
                               lo_bits=4, hi_dtype="bfloat16", group_size=16)
    return probe.budget_for(n) + 7


# ------------------------------------------------------------------ warm from the first token


def test_default_run_has_every_expert_resident_and_equals_full(hf_checkpoint):
    path, _ = hf_checkpoint
    full = engine.Engine(loader.load(path, jnp.float32))
    eng, plan = build(path)  # no budget, no profile
    L, E = len(eng.cfg.moe_layers), eng.cfg.num_experts
    assert plan.slots == L * E
    ours = eng.generate([PROMPT], 24, eos_token_ids=())
    assert ours.tokens == full.generate([PROMPT], 24, eos_token_ids=()).tokens
    assert ours.stats["hi_hit_rate"] == 1.0 and np.all(eng.policy.swapper.resident())
    batch = [PROMPT, PROMPT[:4], PROMPT[::-1]]
    assert eng.generate(batch, 12, eos_token_ids=()).tokens == full.generate(batch, 12, eos_token_ids=()).tokens
    np.testing.assert_array_equal(eng.logits([PROMPT])[0], full.logits([PROMPT])[0])
    session, ref = eng.new_session(128, 16), full.new_session(128, 16)
    for turn in (PROMPT, PROMPT + [3, 4, 5]):
        assert eng.chat_turn(session, turn, 8).tokens == full.chat_turn(ref, turn, 8).tokens


def test_a_fresh_engine_with_a_budget_fills_every_slot_before_the_first_token(moe_checkpoint):
    path, _ = moe_checkpoint
    eng, plan = build(path, slots_for(path, 5))
    policy = eng.policy
    assert plan.slots == 5 and not policy.swapper.resident().any()
    calls = []
    real = policy.swapper.fill
    policy.swapper.fill = lambda keys: (calls.append(list(keys)), real(keys))[1]
    g = eng.generate([PROMPT], 4, eos_token_ids=())
    # No profile: the prompt was routed once on the fallbacks, then the hottest landed, all five.
    assert len(calls) == 1 and len(calls[0]) == 5 and policy.swapper.resident().sum() == 5
    assert g.stats["fill_s"] > 0 and g.stats["promotions"] >= 5
    assert g.stats["hi_hit_rate"] > 0


def test_a_one_token_request_compiles_no_decode_step(moe_checkpoint):
    eng, _ = build(moe_checkpoint[0], slots_for(moe_checkpoint[0], 5))
    compiled = []
    real = eng._compile
    eng._compile = lambda name, *a, **kw: (compiled.append(name), real(name, *a, **kw))[1]
    first = eng.generate([PROMPT], 1, eos_token_ids=())
    assert compiled == ["prefill"] and len(first.tokens[0]) == 1  # the prefill gives the one token
    assert eng.generate([PROMPT], 3, eos_token_ids=()).tokens[0][:1] == first.tokens[0]
    assert compiled == ["prefill", "prefill", "decode"]  # compiled once each: the second prefill is a lookup


def test_the_profile_of_a_run_is_saved_and_warms_the_next_engine(moe_checkpoint, tmp_path, monkeypatch):
    path, _ = moe_checkpoint
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(tmp_path / "cache"))
    eng, _ = build(path, slots_for(path, 5))
    eng.generate([PROMPT], 6, eos_token_ids=())
    saved = store.profile_path(path)
    assert saved is not None and saved.is_file()
    scores = np.asarray(json.loads(saved.read_text())["scores"])
    np.testing.assert_allclose(scores, eng.policy.tracker.scores)
    again, _ = build(path, slots_for(path, 5))
    assert again.policy.informed  # no routing pass needed: the saved profile is the warm start
    np.testing.assert_allclose(again.policy.tracker.scores, scores)


def test_a_given_profile_lands_its_hot_set_per_layer(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    cfg = loader.load(path, jnp.float32).config
    L, E = len(cfg.moe_layers), cfg.num_experts
    scores = np.zeros((L, E))
    scores[:, [1, 6]] = 1.0
    eng, plan = build(path, slots_for(path, 2 * L), hotness_profile=write_profile(tmp_path / "p.json", scores))
    eng.generate([PROMPT], 2, eos_token_ids=())
    resident = eng.policy.swapper.resident()
    assert plan.slots == 2 * L and resident[:, [1, 6]].all() and resident.sum() == 2 * L


# ------------------------------------------------------------------ exactness against references


def reference_state(state: ExpertState, gate_up, down) -> ExpertState:
    """One dense float32 tier for the map in force: the dequantized fallback of every expert,
    the exact weights of the experts whose handle points at a slot."""
    lo = state.tiers[0]
    wgu = np.asarray(lo.gate_up.dequantize(jnp.float32)).copy()  # [L*E, H, 2I] (any stored format)
    wd = np.asarray(lo.down.dequantize(jnp.float32)).copy()
    L, E = state.tier_of.shape
    tier_of = np.asarray(state.tier_of)
    for l, e in zip(*np.nonzero(tier_of > 0)):
        wgu[l * E + e], wd[l * E + e] = gate_up[l][e], down[l][e]
    ref = single_tier(ExpertTier(jnp.asarray(wgu), jnp.asarray(wd)), L, E)
    # biases: never quantized
    return dataclasses.replace(ref, gate_up_bias=state.gate_up_bias, down_bias=state.down_bias)


def forward_fn(cfg):
    dec = Decoder(cfg, jnp.float32)

    @jax.jit
    def fwd(params, experts, tokens):
        B, T = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        return dec(params, experts, KVCache.empty(cfg, B, T, jnp.float32), tokens, pos, jnp.ones((B, T), bool))[0]

    return fwd


@pytest.fixture(scope="module")
def ckpt(moe_checkpoint):
    return loader.load(moe_checkpoint[0], jnp.float32)


def swapper_for(ckpt, slots=5, transfer=None, **kw):
    plan = budget.policy_plan(ckpt.config, "dynaexq", budget=None, batch=1, prompt=16, context=128, dtype_itemsize=4,
                              lo_bits=4, hi_dtype="bfloat16", group_size=16)
    plan = budget.MemoryPlan(**{**plan.__dict__, "slots": slots})
    policy = dynaexq.build(ckpt, plan, OPTS, transfer=transfer)
    for k, v in kw.items():
        setattr(policy.swapper, k, v)
    return policy.swapper


def test_any_fixed_handle_map_equals_the_dequantized_reference(ckpt):
    sw = swapper_for(ckpt)
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    rng = np.random.default_rng(0)
    L, E = sw.slot_of.shape
    for _ in range(3):
        for le in list(zip(*np.nonzero(sw.resident()))):
            sw.demote(*le)
        for c in rng.choice(L * E, size=sw.num_slots, replace=False):
            sw.promote(int(c) // E, int(c) % E)
        while sw.pending or sw.inflight:
            sw.poll()
        sw.check_invariants()
        ref = reference_state(sw.experts, ckpt.experts.gate_up, ckpt.experts.down)
        np.testing.assert_allclose(fwd(ckpt.params, sw.experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4,
                                   rtol=0)


def test_static_policy_equals_the_dequantized_reference(moe_checkpoint, ckpt):
    opts = dynaexq.DynaExqOptions(lo_bits=3, group_size=16)
    eng, plan = build(moe_checkpoint[0], policy="static", opts=opts, batch=2)
    experts = eng.policy.experts
    assert plan.slots == 0 and plan.lo_bits == 3 and len(experts.tiers) == 1
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    ref = reference_state(experts, ckpt.experts.gate_up, ckpt.experts.down)
    np.testing.assert_allclose(fwd(ckpt.params, experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ asynchronous swaps


class HeldTransfer(Transfer):
    """A copy whose completion the test controls: held back, released, or failed."""

    def __init__(self, tree, state):
        super().__init__(tree)
        self.state = state  # "held" | "ready" | "fail"

    def ready(self):
        return self.state in ("ready", "fail") and super().ready()

    def result(self):
        if self.state == "fail":
            raise RuntimeError("simulated DMA failure")
        return super().result()


def test_randomized_swaps_keep_invariants_outputs_and_compile_once(ckpt):
    transfers = []

    def transfer(host_tree):
        t = HeldTransfer(stage(host_tree), random.choice(["held", "held", "ready"]))
        transfers.append(t)
        return t

    sw = swapper_for(ckpt, transfer=transfer)
    fwd, fwd_ref = forward_fn(ckpt.config), forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT])
    random.seed(1)
    L, E = sw.slot_of.shape
    fwd(ckpt.params, sw.experts, tokens)  # warm-up compile
    compiled = fwd._cache_size()
    for step in range(150):
        for _ in range(random.randint(0, 3)):
            le = (random.randrange(L), random.randrange(E))
            (sw.promote if random.random() < 0.6 else sw.demote)(*le)
        for t in transfers:  # release some held copies; a few never complete
            if t.state == "held" and random.random() < 0.3:
                t.state = "ready"
        sw.poll()
        sw.check_invariants()
        if step % 10 == 0:
            ref = reference_state(sw.experts, ckpt.experts.gate_up, ckpt.experts.down)
            np.testing.assert_allclose(fwd(ckpt.params, sw.experts, tokens), fwd_ref(ckpt.params, ref, tokens),
                                       atol=1e-4, rtol=0)
        else:
            fwd(ckpt.params, sw.experts, tokens)
    assert fwd._cache_size() == compiled
    assert sw.stats.promotions > 10 and sw.stats.demotions > 5


def test_the_fill_and_promotions_never_stage_more_copies_on_the_device_than_the_plan_holds(ckpt):
    """A plan with slots holds `STAGING_EXPERTS` copies on their way into slots. The warm start's
    fill once started every slot's copy at once: on the H200 the allocator's peak was 57.3 GB
    under a 40 GB plan (1,689 slots of 9.4 MB). Each copy starts only while fewer are on the
    device, copied or being written, at the fill as between steps."""
    staged_at_start = []

    def transfer(host_tree):
        staged_at_start.append(sw.staged())
        return Transfer(stage(host_tree))

    sw = swapper_for(ckpt, slots=6, transfer=transfer)
    L, E = sw.slot_of.shape
    keys = [(layer, e) for e in range(E) for layer in range(L)]
    sw.fill(keys[:6])
    assert sw.resident().sum() == 6 and len(staged_at_start) == 6 and sw.staged() == 0
    for le in keys[:6]:
        sw.demote(*le)
    for le in keys[6:12]:
        sw.promote(*le)
    sw.settle()
    assert sw.resident().sum() == 6 and len(staged_at_start) == 12
    assert max(staged_at_start) < budget.STAGING_EXPERTS, staged_at_start
    sw.check_invariants()


def test_settle_lands_what_the_slots_can_take_and_returns_with_the_rest_queued(ckpt):
    sw = swapper_for(ckpt, slots=2)
    for e in range(3):
        sw.promote(0, e)
    sw.settle()  # two land; the third waits for a free slot instead of the call spinning forever
    assert sw.resident()[0, :2].all() and not sw.resident()[0, 2] and sw.pending == [(0, 2)] and not sw.inflight


def test_a_step_dispatched_before_a_swap_computes_with_the_map_it_was_given(ckpt):
    sw = swapper_for(ckpt)
    for e in range(5):
        sw.promote(0, e)
    while sw.pending or sw.inflight:
        sw.poll()
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT])
    before_state = sw.experts
    before = fwd(ckpt.params, before_state, tokens)  # dispatched, not read
    published = np.asarray(before_state.tier_of).copy()
    for e in range(5):
        sw.demote(0, e)  # mutates the swapper's bookkeeping
    sw.promote(1, 0)
    while sw.pending or sw.inflight:
        sw.poll()
    # The published handles are copies: the bookkeeping moved on, they did not.
    np.testing.assert_array_equal(np.asarray(before_state.tier_of), published)
    ref = reference_state(before_state, ckpt.experts.gate_up, ckpt.experts.down)
    np.testing.assert_allclose(before, fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0)
    assert not np.array_equal(np.asarray(sw.experts.tier_of), published)


def test_a_transfer_that_never_lands_never_changes_outputs_and_times_out(ckpt):
    sw = swapper_for(ckpt, transfer=lambda t: HeldTransfer(stage(t), "held"), stall_s=0.0)
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT])
    before = fwd(ckpt.params, sw.experts, tokens)
    sw.stall_s = 3600.0
    sw.promote(0, 1)
    for _ in range(5):
        sw.poll()
    assert (0, 1) in sw.inflight and not sw.resident().any()
    np.testing.assert_array_equal(fwd(ckpt.params, sw.experts, tokens), before)
    sw.stall_s = 0.0  # past its deadline: given up, its slot freed
    with pytest.warns(UserWarning, match="stays on its fallback"):
        sw.poll()
    assert not sw.inflight and sw.stats.failed == 1 and len(sw.free_slots()) == sw.num_slots
    sw.check_invariants()


def test_a_failed_copy_leaves_the_pool_and_every_other_expert_intact(ckpt):
    outcomes = iter(["ready", "fail", "ready"])
    sw = swapper_for(ckpt, transfer=lambda t: HeldTransfer(stage(t), next(outcomes)))
    fwd = forward_fn(ckpt.config)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    for le in ((0, 1), (0, 2), (1, 3)):
        sw.promote(*le)
    with pytest.warns(UserWarning, match="expert 2 in MoE layer 0 failed"):
        while sw.pending or sw.inflight:
            sw.poll()
    assert sw.resident()[0, 1] and sw.resident()[1, 3] and not sw.resident()[0, 2]
    assert sw.stats.failed == 1 and sw.stats.promotions == 2
    sw.check_invariants()
    ref = reference_state(sw.experts, ckpt.experts.gate_up, ckpt.experts.down)
    np.testing.assert_allclose(fwd(ckpt.params, sw.experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ the decode loop


def test_decode_loop_reads_the_device_once_per_step_and_nothing_implicitly(moe_checkpoint):
    eng, _ = build(moe_checkpoint[0], slots_for(moe_checkpoint[0], 5), opts=OPTS)
    eng.generate([PROMPT], 4, eos_token_ids=())  # compile and warm up outside the guard
    steps, every = 24, OPTS.rebalance_every
    before = eng.host_reads
    with jax.transfer_guard("disallow"):  # any implicit host<->device transfer raises
        g = eng.generate([PROMPT], steps, eos_token_ids=())
    reads = eng.host_reads - before
    # One lagged token read per step, statistics every `rebalance_every` steps, one final read.
    assert len(g.tokens[0]) == steps
    assert reads == steps + len(range(0, steps, every)) + 1


def test_decoding_under_a_tight_budget_swaps_without_recompiling(moe_checkpoint):
    path = moe_checkpoint[0]
    tight = slots_for(path, 3)
    eng, plan = build(path, tight)
    assert plan.slots == 3 and plan.total <= tight
    g = eng.generate([PROMPT], 24, eos_token_ids=())
    sw = eng.policy.swapper
    assert sw.resident().sum() <= 3 and g.stats["promotions"] >= 3
    assert 0 < g.stats["hi_hit_rate"] < 1
    assert sw.stats.h2d_bytes == (sw.stats.promotions + sw.stats.cancelled + sw.stats.failed
                                  + len(sw.inflight)) * sw.bank.expert_nbytes
    assert len(eng._compiled) == 2
    assert 0 < g.stats["workspace_measured_bytes"] <= plan.workspace  # XLA's temporaries fit the margin
    again = eng.generate([PROMPT[::-1]], 24, eos_token_ids=())  # counters are per request
    assert g.stats["h2d_bytes"] + again.stats["h2d_bytes"] == sw.stats.h2d_bytes
    assert g.stats["promotions"] + again.stats["promotions"] == sw.stats.promotions
    assert len(eng._compiled) == 2


def test_a_budget_below_the_fallback_is_a_one_line_error_with_the_minimum(moe_checkpoint):
    with pytest.raises(budget.BudgetError, match=r"the minimum is [\d.]+ MB \(\d+ bytes\)") as e:
        build(moe_checkpoint[0], 1000)
    assert "\n" not in str(e.value)


def test_int8_slots_and_two_bit_fallback_run(moe_checkpoint):
    path = moe_checkpoint[0]
    opts = dynaexq.DynaExqOptions(lo_bits=2, hi_dtype="int8", group_size=16, rebalance_every=1)
    eng, plan = build(path, slots_for(path, 4) * 2, opts=opts)
    g = eng.generate([PROMPT], 8, eos_token_ids=())
    assert len(g.tokens[0]) == 8 and g.stats["promotions"] > 0
    assert plan.slot_bytes == budget.slot_nbytes(eng.cfg, "int8", 16)


def test_planned_fallback_and_slot_bytes_equal_the_device_arrays(moe_checkpoint):
    eng, plan = build(moe_checkpoint[0], slots_for(moe_checkpoint[0], 5))
    lo, pool = eng.policy.experts.tiers
    assert plan.fallback == lo.nbytes
    assert plan.slots * plan.slot_bytes == pool.nbytes


@pytest.mark.parametrize("policy", ["full", "static", "dynaexq", "offload", "prefetch"])
def test_planned_workspace_covers_xla_temporaries_of_every_step(moe_checkpoint, policy):
    ckpt = loader.load(moe_checkpoint[0], jnp.bfloat16)
    eng, plan = build_engine(ckpt, policy, budget=None, batch=2, longest_prompt=len(PROMPT), max_new_tokens=8)
    eng.generate([PROMPT, PROMPT[:3]], 8)
    eng.logits([PROMPT])
    assert 0 < eng.workspace_bytes <= plan.workspace
