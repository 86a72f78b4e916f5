"""Benchmarks and presets: CPU smoke runs, early refusal of bad input, routing skew, the cost
model's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget, policies
from dynaexq_jax.cli import bench
from dynaexq_jax.eval import kernel_bench
from dynaexq_jax.experts import quant
from dynaexq_jax.io import preset
from dynaexq_jax.runtime import costmodel
from dynaexq_jax.runtime.build import build_engine, plan_for

from conftest import script

ROOT = Path(__file__).resolve().parent.parent
bench_kernels, bench_quant, bench_runtime = script("bench_kernels"), script("bench_quant"), script("bench_runtime")

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
    cfg = preset.preset_config(config_path)
    kw = dict(budget=None, batch=batch, longest_prompt=prompt, max_new_tokens=gen, dtype_itemsize=itemsize)
    plans = [plan_for(cfg, p, **kw) for p in ("dynaexq", "offload")]
    return max(p.budget_for(cfg.experts_per_token * batch + slots) for p in plans)


KEYS = {
    "policy", "batch_size", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "tpot_s", "predicted_tpot_s",
    "min_decode_bytes", "min_bytes_gbs", "h2d_bytes_per_token", "transfer_wait_s", "peak_device_bytes",
    "accounted_device_bytes", "hi_hit_rate", "kl_vs_full", "top1_agreement",
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
        assert r["min_decode_bytes"] > 0
        assert r["min_bytes_gbs"] == pytest.approx(r["min_decode_bytes"] / r["tpot_s"] / 1e9)
        assert 0 <= r["top1_agreement"] <= 1 and r["kl_vs_full"] >= -1e-9
        if r["policy"] in ("offload", "prefetch"):  # they only move bytes
            assert r["kl_vs_full"] < 1e-9 and r["top1_agreement"] == 1, r
    least = {(r["policy"], r["batch_size"]): r["min_decode_bytes"] for r in doc["results"]}
    for b in (1, 2):  # low-bit experts are fewer bytes to read than the float ones offload serves
        assert least[("static", b)] < least[("offload", b)] == least[("prefetch", b)]
    assert least[("static", 1)] < least[("static", 2)]  # two tokens route to more experts


def _no_weights(*_args, **_kwargs):
    raise AssertionError("bad input must be refused before any weight is made")


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "20gb"], "bad memory size '20gb'"),
    (["--batch-sizes", "1,x"], "--batch-sizes '1,x'"),
    (["--batch-sizes", "0"], "--batch-sizes '0'"),
    (["--policies", "static,nope"], "unknown policy 'nope'"),
    (["--budget", "1MB"], "fits none of --policies"),
])
def test_bench_refuses_bad_input_in_one_line_before_making_weights(argv, needle, tiny_preset, monkeypatch, capsys):
    monkeypatch.setattr(preset, "random_checkpoint", _no_weights)
    assert bench.main(["--preset", tiny_preset, *argv]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and needle in last


def test_runtime_bench_refuses_a_budget_without_slots_before_making_weights(tiny_preset, monkeypatch, capsys):
    monkeypatch.setattr(preset, "random_checkpoint", _no_weights)
    plan = plan_for(preset.preset_config(tiny_preset), "dynaexq", budget=None, batch=1, longest_prompt=8,
                    max_new_tokens=12, dtype_itemsize=2)
    bare = plan.minimum + plan.slot_bytes // 2  # holds the fallbacks, not one slot
    assert bench_runtime.main(["--preset", tiny_preset, "--budget", str(bare), "--prompt-len", "8",
                               "--gen-len", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no high-precision slot" in err


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
        eng, _ = build_engine(ckpt, "full", budget=None, batch=4, longest_prompt=32, max_new_tokens=4)
        c = np.sort(eng.generate(prompts, 4).expert_counts, axis=1)[:, ::-1]
        return (c[:, : cfg.num_experts // 4].sum(1) / c.sum(1)).mean()

    assert top_quarter_share(1.0) > top_quarter_share(0.0) + 0.1


def test_router_shift_changes_only_the_routers(tiny_preset):
    cfg = preset.preset_config(tiny_preset)
    ckpt = preset.random_checkpoint(cfg, jnp.float32, routing_skew=1.0)
    shifted = preset.RouterShift(ckpt, 1.0).params(ckpt.params, 3)
    assert shifted["embed_tokens"] is ckpt.params["embed_tokens"]
    for seg, old, new in zip(cfg.segments, ckpt.params["layers"], shifted["layers"]):
        assert seg.kind == "moe"
        assert old["self_attn"] is new["self_attn"]
        assert not np.array_equal(old["mlp"]["gate"]["kernel"], new["mlp"]["gate"]["kernel"])


def test_random_preset_has_the_published_qwen3_30b_sizes():
    cfg = preset.preset_config("qwen3-30b-a3b")
    plan = budget.plan_memory(
        cfg, budget=None, batch=1, prompt=128, context=4096, dtype_itemsize=2, lo_bits=4,
        hi_dtype="bfloat16", group_size=128,
    )
    assert plan.fallback == pytest.approx(15.4e9, rel=0.01)  # NOTES: all experts at int4 ~ 15.4 GB
    assert plan.slots * plan.slot_bytes == pytest.approx(58e9, rel=0.01)  # experts in bf16 ~ 58 GB


def test_cost_model_adds_blocking_copies_and_overlaps_async_ones():
    bw = costmodel.Bandwidth(hbm=1e12, h2d=1e10)
    assert costmodel.step_seconds("offload", 1e9, 1e8, bw) == pytest.approx(1e-3 + 1e-2)
    assert costmodel.step_seconds("dynaexq", 1e9, 1e8, bw) == pytest.approx(1e-2)
    assert costmodel.distinct_experts(128, 8, 1) == pytest.approx(8)
    assert costmodel.distinct_experts(128, 8, 10**6) == pytest.approx(128)


def test_kernel_bench_smoke_marks_interpreted_kernel_times(tmp_path, capsys):
    md = tmp_path / "perf.md"
    argv = ["--smoke", "--bits", "4", "--tokens", "2", "--reps", "1", "--inner", "1", "--markdown", str(md)]
    assert bench_kernels.main(argv) == 0
    assert "interpret mode" in capsys.readouterr().out
    lines = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    head, rows = lines[0], [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    col = {name.strip(): i for i, name in enumerate(head.strip("|").split("|"))}
    # Per expert matrix: the ragged_dot baseline, then the kernel and the XLA loop on int4.
    assert [r[col["path"]] for r in rows] == ["ragged_dot", "pallas (interpreted)", "xla"] * 2
    for r in rows:
        assert float(r[col["rel err"]]) < 1e-2 and float(r[col["time (us)"]]) > 0
        interpreted = r[col["path"]].startswith("pallas")
        for figure in ("GB/s", "% copy BW", "vs ragged_dot"):  # no kernel speed from an interpreter
            assert (r[col[figure]] == "-") == interpreted, (r, figure)


def test_kernel_bench_gpu_sweep_lowers_to_triton_for_cuda():
    """The sweep only runs on a GPU: check here that every variant it times lowers for one."""
    e, k, n, rows = 128, 2048, 1536, 8
    sds = jax.ShapeDtypeStruct
    w = quant.QuantizedTensor(sds((e, k // 2, n), jnp.uint8), sds((e, k // 128, n), jnp.bfloat16),
                              sds((e, k // 128, n), jnp.bfloat16), 4, 128, (e, k, n))
    paths = kernel_bench.sweep(w, e, k, n, rows)
    assert len(paths) == 5  # block_n 64, 128, 256 x 2 warp counts, less the default (64, 4)
    for fn in [*paths.values(), kernel_bench.pallas_path(e, n, interpret=False)]:
        lowered = fn.trace(sds((rows, k), jnp.bfloat16), w, sds((e,), jnp.int32)).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()


def test_quant_bench_table_has_every_width_and_mse_and_hqq_never_worse(capsys):
    assert bench_quant.main(["--k", "128", "--n", "16", "--group-size", "64"]) == 0
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(w.strip(), b.strip()) for w, b, *_ in rows] == [
        (w, f"int{b}") for w in ("gaussian", "student-t3") for b in quant.SUPPORTED_BITS]
    for _, _, rtn, mse, _, hqq, _ in rows:
        assert 0 < float(mse) <= float(rtn) and 0 < float(hqq) <= float(rtn)


def test_quant_bench_refuses_a_group_size_in_one_line(capsys):
    assert bench_quant.main(["--k", "128", "--group-size", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: group_size=100") and err.count("\n") == 1


def test_bench_big_little_rows_sit_beside_the_plain_ones_at_each_share(tmp_path, tiny_preset):
    out = tmp_path / "bench.json"
    code = bench.main([
        "--preset", tiny_preset, "--batch-sizes", "2", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1",
        "--routing-skew", "1", "--policies", "offload,full", "--dtype", "float32", "--json", str(out),
        "--big-little", "--little-k", "1", "--little-shares", "0,0.5",
    ])
    assert code == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["offload", "offload little 50%", "full", "full little 50%"]
    for name in ("offload", "full"):
        plain, little = rows[name], rows[f"{name} little 50%"]
        assert plain["little_share"] is None and 0 < little["little_share"] < 1
        assert little["pairs_saved_per_token"] > 0 and little["kl_vs_full"] > 0
    assert rows["offload little 50%"]["kl_vs_full"] == pytest.approx(rows["full little 50%"]["kl_vs_full"], abs=1e-6)


def test_bench_big_little_knobs_need_the_flag(tiny_preset, monkeypatch, capsys):
    monkeypatch.setattr(preset, "random_checkpoint", _no_weights)
    assert bench.main(["--preset", tiny_preset, "--little-k", "1"]) == 2
    assert "add --big-little" in capsys.readouterr().err.splitlines()[-1]


def test_decode_layer_bench_smoke_checks_every_kernel_against_its_reference(capsys):
    bench = script("bench_decode_layer")
    assert bench.main(["--smoke", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "interpret mode" in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[3:] if line.startswith("| ")]
    kernels = ["attn_in", "decode_attention", "attn_out", "route"]
    assert [(r[0], r[1]) for r in rows] == [(b, k) for b in ("1", "4") for k in kernels]
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0 and r[5] == r[6] == "-", r  # no rate from an interpreter
        assert float(r[7]) < 1e-2, r  # decode attention's bf16 reference against its float32 merge
