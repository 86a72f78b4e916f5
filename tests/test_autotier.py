"""Budget-optimal tiers: the plan picks the fallback width and slot dtype within a budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.eval import evaluate
from dynaexq_jax.io import loader
from dynaexq_jax.policies import autotier, tiers
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.build import auto_start, auto_tiers, build_engine, plan_for

MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-qwen3-moe"
PROFILE = MODEL / "tasks" / "hotness_train.json"
SHAPE = dict(batch=4, longest_prompt=32, max_new_tokens=1)
AUTO = DynaExqOptions(lo_bits="auto", hi_dtype="auto", save_profile=False)
DOCS = [
    "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def norm(self):\n"
    "        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for i in range(10):\n    print(i)\n",
]


@pytest.fixture(scope="module")
def ckpt():
    return loader.load(MODEL, jnp.float32)


def minimum(ckpt, bits, hi="bfloat16"):
    opts = dataclasses.replace(AUTO, lo_bits=bits, hi_dtype=hi)
    return plan_for(ckpt.config, "dynaexq", budget=None, dtype_itemsize=4, opts=opts, **SHAPE).minimum


def sweep_budgets(ckpt):
    """Each width's minimum, points between them, and room for every expert in a slot."""
    anchors = [minimum(ckpt, b) for b in (2, 3, 4, 8)]
    anchors.append(anchors[-1] + ckpt.config.num_experts * len(ckpt.config.moe_layers) * 3 * 2 * 128 * 64 * 4)
    return sorted({a + (b - a) * i // 4 for a, b in zip(anchors, anchors[1:]) for i in range(4)} | {anchors[-1]})


def test_quant_errors_fall_with_width_and_are_read_back_from_the_cache(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(tmp_path))
    errs = tiers.quant_errors(ckpt.experts, (2, 3, 4, 8), 64, "rtn", source=ckpt.path)
    assert all(e.shape == (4, 32) for e in errs.values())
    assert np.all(errs[2] > errs[3]) and np.all(errs[3] > errs[4]) and np.all(errs[4] > errs[8]) and np.all(errs[8] > 0)
    assert len(list(tmp_path.rglob("qerr-*"))) == 1
    again = tiers.quant_errors(ckpt.experts, (8, 4, 3, 2), 64, "rtn", source=ckpt.path)
    assert all(np.array_equal(errs[b], again[b]) for b in errs)
    assert len(list(tmp_path.rglob("qerr-*"))) == 1  # the same entry: widths are a set


def test_auto_tiers_never_expect_worse_than_the_widest_fitting_static_and_stay_within_budget(ckpt):
    seen = set()
    for b in sweep_budgets(ckpt):
        opts, choice = auto_tiers(ckpt, AUTO, budget=b, hotness_profile=str(PROFILE), **SHAPE)
        static = plan_for(ckpt.config, "static", budget=b, dtype_itemsize=4, opts=dataclasses.replace(opts), **SHAPE)
        assert choice.static_bits == static.lo_bits
        assert choice.expected_error <= choice.static_error
        plan = plan_for(ckpt.config, "dynaexq", budget=b, dtype_itemsize=4, opts=opts, **SHAPE)
        assert plan.total <= b and plan.slots == choice.slots  # every byte of every tier in the plan
        assert plan.mid_experts == len(choice.mid_experts)
        seen.add((choice.lo_bits, choice.mid_bits))
    # Between widths the plan really chooses: every fallback width, each also mixed with the next.
    assert {(2, None), (2, 3), (3, None), (3, 4), (4, None), (4, 8), (8, None)} <= seen


def test_slots_go_to_the_hottest_experts_of_each_layer():
    scores = np.array([[0.1, 0.5, 0.2, 0.0], [0.3, 0.3, 0.9, 0.1]])
    assert autotier.resident_set(scores, 4, "per_layer").tolist() == [[False, True, True, False],
                                                                      [True, False, True, False]]
    share = autotier.traffic_share(scores)
    assert share.sum() == pytest.approx(1.0) and share[0, 1] == pytest.approx(0.5 / 0.8 / 2)


def test_explicit_tiers_are_kept_as_given(ckpt):
    fixed = DynaExqOptions(lo_bits=3, hi_dtype="int8", save_profile=False)
    b = minimum(ckpt, 8)
    assert auto_tiers(ckpt, fixed, budget=b, hotness_profile=str(PROFILE), **SHAPE) == (fixed, None)
    # One flag fixed, the other auto: the choice is made around the fixed one.
    opts, choice = auto_tiers(ckpt, dataclasses.replace(AUTO, lo_bits=3), budget=b, hotness_profile=str(PROFILE),
                              **SHAPE)
    assert opts.lo_bits == choice.lo_bits == 3 and opts.hi_dtype in autotier.HI_DTYPES


def test_dry_run_start_is_the_widest_fitting_fallback(ckpt):
    b = (minimum(ckpt, 4) + minimum(ckpt, 8)) // 2
    assert auto_start(ckpt.config, AUTO, budget=b, dtype_itemsize=4, **SHAPE).lo_bits == 4
    with pytest.raises(budget_lib.BudgetError, match="int2 fallback"):
        auto_start(ckpt.config, AUTO, budget=minimum(ckpt, 2) - 1, dtype_itemsize=4, **SHAPE)


def test_auto_tiers_score_no_worse_than_the_widest_fitting_static_on_the_tiny_checkpoint(ckpt):
    # Held-out text, and enough of it: on a few short snippets which experts happen to round well
    # moves perplexity more than the tiers do (there, static int2 even beats int3).
    task = evaluate.load_task("ppl", MODEL / "tasks" / "heldout.jsonl")
    task = dataclasses.replace(task, items=task.items[:2])
    b = (minimum(ckpt, 2) + minimum(ckpt, 3)) // 2  # int2 fits, int3 does not
    kw = dict(hotness_profile=str(PROFILE), batch_size=4, window=32, max_length=32, max_new_tokens=1)
    res = evaluate.evaluate_runs(ckpt, [evaluate.RunSpec("static", str(b), 4),
                                        evaluate.RunSpec("dynaexq", str(b), 4, "auto")], [task], opts=AUTO, **kw)
    static, auto = (r.value for r in res if r.metric == "ppl")
    assert res[0].run.startswith("static int2") and res[-1].run.startswith("dynaexq auto int2/")
    assert auto <= static + 1e-3


def test_evaluation_refuses_to_start_cold_and_names_the_fix(ckpt):
    with pytest.raises(UserError, match="--hotness PROFILE or --calibration TEXT"):
        evaluate.evaluate_runs(ckpt, [evaluate.RunSpec("dynaexq", "+25%", 4)], [evaluate.Task("ppl", "d", DOCS)],
                               window=32, batch_size=4)


def test_calibration_profile_is_computed_once_and_saved_for_the_checkpoint(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", "1")
    monkeypatch.setenv("DYNAEXQ_CACHE_DIR", str(tmp_path))
    first = evaluate.warm_profile(ckpt, AUTO, calibration=DOCS, window=32, batch_size=4)
    assert first.scores.shape == (4, 32) and np.all(first.scores >= 0) and first.scores.sum() > 0
    again = evaluate.warm_profile(ckpt, AUTO, window=32, batch_size=4)  # no text now: the saved one
    assert np.allclose(again.scores, first.scores)


def test_build_engine_resolves_auto_within_the_budget(ckpt):
    b = (minimum(ckpt, 4) + minimum(ckpt, 8)) // 2
    _, plan = build_engine(ckpt, "dynaexq", budget=b, opts=AUTO, hotness_profile=str(PROFILE), **SHAPE)
    assert plan.lo_bits == 4 and plan.mid_bits == 8 and 0 < plan.mid_experts and plan.total <= b


def test_mixed_fallback_computes_each_expert_at_its_own_tier_and_every_byte_is_planned(ckpt):
    from dynaexq_jax.experts.expert_state import ExpertTier, single_tier
    from dynaexq_jax.experts.quant import dequantize
    from dynaexq_jax.policies.full import FixedPolicy
    from dynaexq_jax.policies.hotness import HotnessTracker
    from dynaexq_jax.runtime.engine import Engine

    probe = plan_for(ckpt.config, "dynaexq", budget=None, dtype_itemsize=4,
                     opts=dataclasses.replace(AUTO, lo_bits=3, hi_dtype="bfloat16"), **SHAPE)
    b = probe.minimum + probe.staging  # room for the mid experts and a few slots, with their copies in flight
    hot = np.argsort(-HotnessTracker.load(PROFILE).scores, axis=1, kind="stable")[:, :8]
    mid = tuple(sorted((l, int(e)) for l in range(4) for e in hot[l]))  # the slots' experts among them
    opts = DynaExqOptions(lo_bits=2, hi_dtype="bfloat16", mid_bits=3, mid_experts=mid, save_profile=False)
    eng, plan = build_engine(ckpt, "dynaexq", budget=b, opts=opts, hotness_profile=str(PROFILE), **SHAPE)
    seqs = evaluate.ppl_sequences(ckpt.tokenizer, DOCS, ckpt.eos_token_ids[0], 32)[:4]
    got = np.concatenate(eng.score(seqs, 32)[0])  # the first request fills the slots
    state = eng.policy.experts
    lo_tier, mid_tier, pool = state.tiers
    assert plan.slots > 0 and plan.mid_experts == len(mid) and plan.total <= b
    assert lo_tier.nbytes + mid_tier.nbytes == plan.fallback and pool.nbytes == plan.slots_total_bytes
    # The reference: one dense tier holding, per expert, the weights its handle should serve.
    slotted = np.asarray(state.tier_of) == 2
    is_mid = np.zeros((4, 32), bool)
    is_mid[tuple(np.array(mid).T)] = True
    q = {bits: tiers.quantized_layers(ckpt.experts, bits, 64, "rtn") for bits in (2, 3)}
    ref_w = []
    for j, host in enumerate((ckpt.experts.gate_up, ckpt.experts.down)):
        per_layer = []
        for l in range(4):
            pick = lambda bits, l=l, j=j: dequantize(q[bits][l][j], jnp.float32)
            w = jnp.where(is_mid[l][:, None, None], pick(3), pick(2))
            per_layer.append(jnp.where(slotted[l][:, None, None], jnp.asarray(host[l], jnp.float32), w))
        ref_w.append(jnp.concatenate(per_layer))
    ref = Engine(ckpt, FixedPolicy("ref", single_tier(ExpertTier(*ref_w), 4, 32)))
    want = np.concatenate(ref.score(seqs, 32)[0])
    np.testing.assert_allclose(got, want, atol=2e-5)
    # A demoted expert goes back to its own fallback: the mid tier for a mid expert.
    layer, expert = next(le for le in zip(*np.nonzero(slotted)) if is_mid[le])
    sw = eng.policy.swapper
    sw.demote(int(layer), int(expert))
    sw.check_invariants()
    assert int(sw.experts.tier_of[layer, expert]) == 1
    assert int(sw.experts.row_of[layer, expert]) == int(is_mid[:layer].sum() + is_mid[layer, :expert].sum())
