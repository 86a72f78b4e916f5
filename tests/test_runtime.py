"""The DynaExq runtime: mixed-precision experts, budget, asynchronous swaps, invariants."""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget, policies
from dynaexq_jax.runtime import engine
from dynaexq_jax.io import loader
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.expert_state import DenseExperts, MixedExperts
from dynaexq_jax.experts.swap import Transfer, stage

PROMPT = [5, 17, 42, 9, 100, 7, 250, 33, 12]
OPTS = policies.DynaExqOptions(lo_bits=4, group_size=16, rebalance_every=2)


def host_checkpoint(path):
    return loader.load(path, jnp.float32, experts_on_device=False)


def build(path, budget_bytes=None, opts=OPTS, **kw):
    ckpt = host_checkpoint(path)
    return policies.build_engine(
        ckpt, "dynaexq", budget=budget_bytes, batch=1, longest_prompt=len(PROMPT), max_new_tokens=24, opts=opts, **kw
    )


def write_profile(path, layers, experts, scores):
    path.write_text(json.dumps({"layers": layers, "experts": experts, "half_life_tokens": 256.0, "scores": scores}))
    return str(path)


def test_every_expert_in_a_slot_matches_the_full_model_token_for_token(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint
    full = engine.Engine(loader.load(path, jnp.float32))
    cfg = full.cfg
    L, E = len(cfg.moe_layers), cfg.num_experts
    profile = write_profile(tmp_path / "hot.json", L, E, np.ones((L, E)).tolist())
    eng, plan = build(path, hotness_profile=profile)
    assert plan.slots == L * E
    assert np.all(eng.runtime.swapper.resident())
    ours = eng.generate([PROMPT], 24, eos_token_ids=())
    assert ours.tokens == full.generate([PROMPT], 24, eos_token_ids=()).tokens
    assert ours.stats["hi_hit_rate"] == 1.0


def reference_experts(mixed: MixedExperts, hi_gate_up, hi_down) -> DenseExperts:
    """Dense float32 experts for the map in force: dequantized fallback, exact slot weights."""
    slot_of = np.asarray(mixed.slot_of)
    gu, dn = [], []
    for l in range(slot_of.shape[0]):
        wgu = np.asarray(quant.dequantize(mixed.lo_gate_up[l], jnp.float32)).copy()
        wd = np.asarray(quant.dequantize(mixed.lo_down[l], jnp.float32)).copy()
        for e in np.flatnonzero(slot_of[l] >= 0):
            wgu[e], wd[e] = hi_gate_up[l][e], hi_down[l][e]
        gu.append(jnp.asarray(wgu))
        dn.append(jnp.asarray(wd))
    return DenseExperts(tuple(gu), tuple(dn))


@pytest.fixture(scope="module")
def small_runtime(moe_checkpoint):
    """A runtime with fewer slots than experts, its host weights, and a jitted forward."""
    path, _ = moe_checkpoint
    ckpt = host_checkpoint(path)
    cfg = ckpt.config
    plan = budget.plan_memory(
        cfg, budget=None, batch=1, prompt=16, context=128, dtype_itemsize=4, lo_bits=4,
        hi_dtype="bfloat16", group_size=16, xla_dequant=True,
    )
    plan = budget.MemoryPlan(**{**plan.__dict__, "slots": 5})
    return ckpt, plan


class HeldTransfer(Transfer):
    """A copy whose completion the test controls: held back, released, or failed."""

    def __init__(self, tree, state):
        super().__init__(tree)
        self.state = state  # "held" | "ready" | "fail"

    def ready(self):
        if self.state == "fail":
            raise RuntimeError("simulated DMA failure")
        return self.state == "ready" and super().ready()


def forward_fn(ckpt):
    model = engine.Qwen3Moe(ckpt.config, jnp.float32)

    @jax.jit
    def fwd(params, experts, tokens):
        B, T = tokens.shape
        cache = engine.KVCache.empty(ckpt.config, B, T, jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        logits, _, _ = model.apply({"params": params}, tokens, pos, jnp.ones((B, T), bool), cache, experts)
        return logits

    return fwd


def test_any_fixed_handle_map_equals_the_dequantized_reference(small_runtime):
    ckpt, plan = small_runtime
    rt = policies.dynaexq_runtime(ckpt.experts, plan, OPTS)
    sw = rt.swapper
    fwd = forward_fn(ckpt)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    rng = np.random.default_rng(0)
    for trial in range(3):
        for le in list(zip(*np.nonzero(sw.resident()))):
            sw.demote(*le)
        L, E = sw.slot_of.shape
        chosen = rng.choice(L * E, size=plan.slots, replace=False)
        for c in chosen:
            sw.promote(int(c) // E, int(c) % E)
        while sw.pending or sw.inflight:
            sw.poll()
        sw.check_invariants()
        ref = reference_experts(sw.experts, ckpt.experts.gate_up, ckpt.experts.down)
        np.testing.assert_allclose(
            fwd(ckpt.params, sw.experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0
        )


def test_randomized_swaps_keep_invariants_outputs_and_compile_once(small_runtime):
    ckpt, plan = small_runtime
    transfers = []

    def transfer(host_tree):
        t = HeldTransfer(stage(host_tree), random.choice(["held", "held", "ready"]))
        transfers.append(t)
        return t

    rt = policies.dynaexq_runtime(ckpt.experts, plan, OPTS, transfer=transfer)
    sw = rt.swapper
    fwd, fwd_ref = forward_fn(ckpt), forward_fn(ckpt)
    tokens = jnp.asarray([PROMPT])
    random.seed(1)
    L, E = sw.slot_of.shape
    fwd(ckpt.params, sw.experts, tokens)  # warm-up compile
    compiled = fwd._cache_size()
    budget_bytes = plan.total
    for step in range(200):
        for _ in range(random.randint(0, 3)):
            le = (random.randrange(L), random.randrange(E))
            (sw.promote if random.random() < 0.6 else sw.demote)(*le)
        for t in transfers:  # release some held copies; a few never complete
            if t.state == "held" and random.random() < 0.3:
                t.state = "ready"
        sw.poll()
        sw.check_invariants()
        experts = sw.experts
        assert experts.nbytes + sum(a.nbytes for a in jax.tree.leaves(ckpt.params)) <= budget_bytes
        if step % 10 == 0:
            ref = reference_experts(experts, ckpt.experts.gate_up, ckpt.experts.down)
            np.testing.assert_allclose(
                fwd(ckpt.params, experts, tokens), fwd_ref(ckpt.params, ref, tokens), atol=1e-4, rtol=0
            )
        else:
            fwd(ckpt.params, experts, tokens)
    assert fwd._cache_size() == compiled
    assert sw.stats.promotions > 10 and sw.stats.demotions > 5


def test_a_transfer_that_never_lands_never_changes_outputs(small_runtime):
    ckpt, plan = small_runtime
    rt = policies.dynaexq_runtime(ckpt.experts, plan, OPTS, transfer=lambda t: HeldTransfer(stage(t), "held"))
    sw = rt.swapper
    fwd = forward_fn(ckpt)
    tokens = jnp.asarray([PROMPT])
    before = fwd(ckpt.params, sw.experts, tokens)
    sw.promote(0, 1)
    for _ in range(5):
        sw.poll()
    assert (0, 1) in sw.inflight and not sw.resident().any()
    np.testing.assert_array_equal(fwd(ckpt.params, sw.experts, tokens), before)


def test_a_failed_transfer_warns_and_leaves_the_expert_on_its_fallback(small_runtime):
    ckpt, plan = small_runtime
    rt = policies.dynaexq_runtime(ckpt.experts, plan, OPTS, transfer=lambda t: HeldTransfer(stage(t), "fail"))
    sw = rt.swapper
    sw.promote(1, 3)
    with pytest.warns(UserWarning, match="stays on its fallback"):
        sw.poll()
        sw.poll()
    assert not sw.resident().any() and not sw.inflight and sw.stats.failed == 1
    sw.check_invariants()


def test_decoding_under_a_tight_budget_promotes_hot_experts_without_recompiling(moe_checkpoint):
    path, _ = moe_checkpoint
    cfg = host_checkpoint(path).config
    probe = budget.plan_memory(
        cfg, budget=None, batch=1, prompt=16, context=128, dtype_itemsize=4, lo_bits=4,
        hi_dtype="bfloat16", group_size=16, xla_dequant=True,
    )
    tight = probe.minimum + 3 * (probe.slot_bytes + probe.slot_workspace) + 7  # room for exactly three slots
    eng, plan = build(path, tight)
    assert plan.slots == 3 and plan.total <= tight
    g = eng.generate([PROMPT], 24, eos_token_ids=())
    assert 0 < g.stats["promotions"] <= 3 + g.stats["demotions"]
    assert 0 < g.stats["hi_hit_rate"] < 1
    assert g.stats["h2d_bytes"] == (g.stats["promotions"] + eng.runtime.swapper.stats.cancelled + len(eng.runtime.swapper.inflight)) * eng.runtime.swapper.bank.expert_nbytes
    assert len(eng._compiled) == 2
    assert 0 < g.stats["workspace_measured_bytes"] <= plan.workspace_total  # XLA's temporaries fit the margin
    again = eng.generate([PROMPT[::-1]], 24, eos_token_ids=())  # counters are per request
    total = eng.runtime.swapper.stats
    assert g.stats["h2d_bytes"] + again.stats["h2d_bytes"] == total.h2d_bytes
    assert g.stats["promotions"] + again.stats["promotions"] == total.promotions


def test_a_budget_below_the_fallback_is_a_one_line_error_with_the_minimum(moe_checkpoint):
    with pytest.raises(budget.BudgetError, match=r"the minimum is [\d.]+ MB \(\d+ bytes\)") as e:
        build(moe_checkpoint[0], 1000)
    assert "\n" not in str(e.value)


def test_int8_slots_and_two_bit_fallback_run(moe_checkpoint):
    opts = policies.DynaExqOptions(lo_bits=2, hi_dtype="int8", group_size=16, rebalance_every=1)
    eng, plan = build(moe_checkpoint[0], opts=opts)
    g = eng.generate([PROMPT], 8, eos_token_ids=())
    assert len(g.tokens[0]) == 8 and g.stats["promotions"] > 0
    assert plan.slot_bytes == budget.slot_nbytes(eng.cfg, "int8", 16)


def test_planned_fallback_bytes_equal_the_quantized_tensors(moe_checkpoint):
    eng, plan = build(moe_checkpoint[0])
    experts = eng.runtime.experts
    assert plan.fallback == experts.fallback_nbytes
    assert plan.slots * plan.slot_bytes == experts.slots_nbytes


@pytest.mark.parametrize("policy", ["full", "static", "dynaexq", "offload", "prefetch"])
def test_planned_workspace_covers_xla_temporaries_of_every_step(moe_checkpoint, policy):
    ckpt = loader.load(moe_checkpoint[0], jnp.bfloat16, experts_on_device=False)
    eng, plan = policies.build_engine(ckpt, policy, budget=None, batch=2, longest_prompt=len(PROMPT), max_new_tokens=8)
    eng.generate([PROMPT, PROMPT[:3]], 8)
    eng.logits([PROMPT])
    assert 0 < eng.workspace_bytes <= plan.workspace_total


def test_static_policy_equals_the_dequantized_reference(moe_checkpoint):
    ckpt = host_checkpoint(moe_checkpoint[0])
    opts = policies.DynaExqOptions(lo_bits=3, group_size=16)
    eng, plan = policies.build_engine(ckpt, "static", budget=None, batch=2, longest_prompt=len(PROMPT), max_new_tokens=4, opts=opts)
    experts = eng.runtime.experts
    assert plan.slots == 0 and plan.lo_bits == 3 and experts.num_slots == 0
    fwd = forward_fn(ckpt)
    tokens = jnp.asarray([PROMPT, PROMPT[::-1]])
    ref = reference_experts(experts, ckpt.experts.gate_up, ckpt.experts.down)
    np.testing.assert_allclose(fwd(ckpt.params, experts, tokens), fwd(ckpt.params, ref, tokens), atol=1e-4, rtol=0)
