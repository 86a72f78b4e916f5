"""Benchmarks and presets: CPU smoke runs, routing skew, the cost model's arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget, policies
from dynaexq_jax.runtime import costmodel
from dynaexq_jax.io import preset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402
import bench_runtime  # noqa: E402

TINY = dict(
    model_type="qwen3_moe", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32,
    intermediate_size=64, max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def budget_for(config_path, *, prompt, gen, batch, itemsize, slots) -> int:
    """Room for `slots` slots above what dynaexq and offload need at least, for this shape."""
    import jax

    from dynaexq_jax.runtime.engine import cache_bucket, prompt_bucket

    cfg = preset.preset_config(config_path)
    P = prompt_bucket(prompt)
    xla = jax.default_backend() != "gpu"
    kw = dict(budget=None, batch=batch, prompt=P, context=cache_bucket(P + gen), dtype_itemsize=itemsize,
              lo_bits=4, hi_dtype="bfloat16", group_size=budget.expert_group_size(cfg), xla_dequant=xla)
    need = max(budget.policy_plan(cfg, p, **kw).minimum for p in ("dynaexq", "offload"))
    per_slot = budget.slot_nbytes(cfg, "bfloat16", 128, itemsize) + budget.slot_workspace_nbytes(cfg, xla)
    return need + cfg.experts_per_token * batch * per_slot + slots * per_slot


KEYS = {
    "policy", "batch_size", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "tpot_s",
    "h2d_bytes_per_token", "transfer_wait_s", "peak_device_bytes", "accounted_device_bytes",
    "hi_hit_rate", "kl_vs_full", "top1_agreement",
}


def test_bench_smoke_writes_every_figure_for_every_policy(tmp_path, tiny_preset):
    out = tmp_path / "bench.json"
    names = [p for p in ("static", "offload", "prefetch", "dynaexq") if p in policies.POLICIES]
    limit = budget_for(tiny_preset, prompt=12, gen=4, batch=2, itemsize=4, slots=6)  # bench plans prompt + gen
    code = bench.main([
        "--preset", tiny_preset, "--budget", str(limit), "--batch-sizes", "1,2", "--prompt-len", "8",
        "--gen-len", "4", "--repeats", "1", "--routing-skew", "1", "--policies", ",".join(names + ["full"]),
        "--dtype", "float32", "--json", str(out),
    ])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["device"] and doc["reference"] == "full"
    # `full` does not fit the budget: it is skipped as a policy but still the reference.
    assert [(r["policy"], r["batch_size"]) for r in doc["results"]] == [(p, b) for p in names for b in (1, 2)]
    for r in doc["results"]:
        assert KEYS <= set(r)
        assert r["decode_tokens_per_s"] > 0 and r["accounted_device_bytes"] <= limit
        assert 0 <= r["top1_agreement"] <= 1 and r["kl_vs_full"] >= -1e-9
        if r["policy"] in ("offload", "prefetch"):  # they only move bytes
            assert r["kl_vs_full"] < 1e-9 and r["top1_agreement"] == 1, r


def test_runtime_bench_reports_budget_and_step_split(tmp_path, tiny_preset):
    out = tmp_path / "rt.json"
    limit = budget_for(tiny_preset, prompt=8, gen=12, batch=1, itemsize=2, slots=6)
    code = bench_runtime.main([
        "--preset", tiny_preset, "--budget", str(limit), "--prompt-len", "8", "--gen-len", "12",
        "--routing-shift-every", "4", "--rebalance-every", "2", "--json", str(out),
    ])
    assert code == 0
    doc = json.loads(out.read_text())
    for variant in ("async", "blocking"):
        row = doc[variant]
        assert row["accounted_device_bytes"] <= limit
        assert row["steps_with_copies_in_flight"] + row["steps_without"] == 11
    assert doc["blocking"]["steps_with_copies_in_flight"] == 0  # blocking lands every copy first


def test_routing_skew_concentrates_traffic_on_a_few_experts(tiny_preset):
    cfg = preset.preset_config(tiny_preset)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32)).tolist()

    def top_quarter_share(skew):
        ckpt = preset.random_checkpoint(cfg, jnp.float32, routing_skew=skew)
        eng, _ = policies.build_engine(ckpt, "full", budget=None, batch=4, longest_prompt=32, max_new_tokens=4)
        c = np.sort(eng.generate(prompts, 4).expert_counts, axis=1)[:, ::-1]
        return (c[:, : cfg.num_experts // 4].sum(1) / c.sum(1)).mean()

    assert top_quarter_share(1.0) > top_quarter_share(0.0) + 0.1


def test_router_shift_changes_only_the_routers(tiny_preset):
    cfg = preset.preset_config(tiny_preset)
    ckpt = preset.random_checkpoint(cfg, jnp.float32, routing_skew=1.0)
    shifted = preset.RouterShift(ckpt, 1.0).params(ckpt.params, 3)
    for i in range(cfg.num_layers):
        old, new = ckpt.params[f"layers_{i}"], shifted[f"layers_{i}"]
        assert old["self_attn"] is new["self_attn"]
        assert not np.array_equal(old["mlp"]["gate"]["kernel"], new["mlp"]["gate"]["kernel"])


def test_random_preset_has_the_published_qwen3_30b_sizes():
    cfg = preset.preset_config("qwen3-30b-a3b")
    plan = budget.plan_memory(
        cfg, budget=None, batch=1, prompt=128, context=4096, dtype_itemsize=2, lo_bits=4,
        hi_dtype="bfloat16", group_size=128, xla_dequant=False,
    )
    assert plan.fallback == pytest.approx(15.4e9, rel=0.01)  # NOTES: all experts at int4 ~ 15.4 GB
    assert plan.slots * plan.slot_bytes == pytest.approx(58e9, rel=0.01)  # experts in bf16 ~ 58 GB


def test_cost_model_adds_blocking_copies_and_overlaps_async_ones():
    bw = costmodel.Bandwidth(hbm=1e12, h2d=1e10)
    assert costmodel.step_seconds("offload", 1e9, 1e8, bw) == pytest.approx(1e-3 + 1e-2)
    assert costmodel.step_seconds("dynaexq", 1e9, 1e8, bw) == pytest.approx(1e-2)
    assert costmodel.distinct_experts(128, 8, 1) == pytest.approx(8)
    assert costmodel.distinct_experts(128, 8, 10**6) == pytest.approx(128)
