"""FloE: the sparse expert computation against float64 numpy, exactness against `full` with every
channel kept, bytes moved per decode step, the memory plan, and calibration (reuse, rebuild, and
one-line errors for calibrations that do not fit)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax import budget
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import weights_nbytes
from dynaexq_jax.io import floe_calibration, loader
from dynaexq_jax.policies import floe
from dynaexq_jax.policies.floe import FloeOptions
from dynaexq_jax.runtime import engine
from dynaexq_jax.runtime.build import build_engine

from conftest import script

calibrate = script("calibrate")

PROMPTS = [[5, 17, 42, 9, 100, 7, 250, 33, 12], [3, 4, 5]]  # two lengths: left padding in the batch
CAL_TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    def g(self, y):\n        return [y] * 3\n" * 12


CFG = type("Cfg", (), {"expert_activation": "swiglu"})  # the one field `expert_activation` reads


def _silu64(x):
    return x / (1 + np.exp(-x))


def test_select_and_partial_ffn_match_float64_reference_with_capacity_overflow():
    rng = np.random.default_rng(0)
    B, T, H, I, E, k, C = 2, 3, 16, 24, 5, 2, 6
    hn = rng.standard_normal((B, T, H)).astype(np.float32)
    top_i = rng.integers(0, E, (B * T, k)).astype(np.int32)
    top_i[:, 1] = (top_i[:, 0] + 1) % E  # distinct experts per token
    top_p = rng.uniform(0.1, 1, (B * T, k)).astype(np.float32)
    valid = np.ones((B * T, k), bool)
    valid[0] = False  # a padding token
    up = rng.standard_normal((E, H, I)).astype(np.float32)
    gate = rng.standard_normal((E, H, I)).astype(np.float32)
    down = rng.standard_normal((E, I, H)).astype(np.float32)
    thr = rng.uniform(1.0, 3.0, E).astype(np.float32)
    u, score = jax.jit(floe.up_activations)(jnp.asarray(up), jnp.asarray(thr), jnp.asarray(hn), jnp.asarray(top_i),
                                   jnp.asarray(valid), None)
    x = hn.reshape(B * T, H).astype(np.float64)
    u64 = np.einsum("ph,phi->pi", np.repeat(x, k, axis=0), up[top_i.reshape(-1)].astype(np.float64))
    ok = valid.reshape(-1)
    np.testing.assert_allclose(np.asarray(u)[ok], u64[ok], rtol=1e-5, atol=1e-4)
    experts = np.array([top_i[1, 0], top_i[2, 1], -1], np.int32)  # two used places, one unused
    idx, n, dropped = (np.asarray(a) for a in floe.select_channels(score, jnp.asarray(experts), C))
    acc = np.zeros((B, T, H), np.float32)
    out = jax.jit(floe.partial_ffn_for(CFG))(jnp.asarray(gate.transpose(0, 2, 1)[np.maximum(experts, 0)[:, None], idx]),
                           jnp.asarray(down[np.maximum(experts, 0)[:, None], idx]), jnp.asarray(idx), jnp.asarray(n),
                           jnp.asarray(experts), u, jnp.asarray(thr), jnp.asarray(hn), jnp.asarray(top_i),
                           jnp.asarray(top_p), jnp.asarray(valid), jnp.asarray(acc), None, None)
    ref = np.zeros((B * T, H))
    for r, e in enumerate(experts):
        if e < 0:
            assert n[r] == 0
            continue
        pairs = np.flatnonzero(valid.reshape(-1) & (top_i.reshape(-1) == e))
        a = np.abs(u64[pairs])
        union = np.flatnonzero((a >= thr[e]).any(0))
        best = union[np.argsort(-a[:, union].max(0), kind="stable")[:C]]  # largest |u| first, at most C
        assert n[r] == len(best) and dropped[r] == len(union) - len(best)
        assert sorted(idx[r, : n[r]]) == sorted(best)
        for p in pairs:
            t = p // k
            ch = [c for c in best if abs(u64[p, c]) >= thr[e]]  # the token's own active channels
            g = x[t] @ gate[e][:, ch].astype(np.float64)
            ref[t] += top_p.reshape(-1)[p] * (_silu64(g) * u64[p, ch]) @ down[e][ch].astype(np.float64)
    assert dropped.sum() > 0  # the capacity cut something in this draw
    np.testing.assert_allclose(np.asarray(out).reshape(B * T, H), ref, rtol=1e-4, atol=1e-3)


def test_staging_gather_is_exact_and_staged_copies_never_alias_the_reused_buffers():
    layer = np.arange(3 * 5 * 4, dtype=np.float32).reshape(3, 5, 4).astype(jnp.bfloat16)
    experts, idx = np.array([2, -1]), np.array([[4, 0], [1, 3]])
    buf = np.empty((2, 2, 4), layer.dtype)
    got = floe.gather_channels(layer, experts, idx, buf)
    np.testing.assert_array_equal(got, layer[[[2], [0]], idx])
    big = np.ones((256, 1024), np.float32)  # CPU zero-copy: this size and alignment aliases (jax 0.10)
    on_device = floe.to_device((got, big), jax.devices()[0])
    buf[:] = 0  # the policy refills the buffers for the next round
    big[:] = 0
    np.testing.assert_array_equal(np.asarray(on_device[0]), layer[[[2], [0]], idx])
    assert np.asarray(on_device[1]).min() == 1


@pytest.fixture(scope="module")
def ckpt(moe_checkpoint):
    return loader.load(moe_checkpoint[0], jnp.float32)


def test_floe_with_every_channel_and_no_compression_equals_full_token_for_token(ckpt):
    full = engine.Engine(ckpt)
    ref = full.generate(PROMPTS, 12, eos_token_ids=())
    eng, plan = build_engine(ckpt, "floe", budget=None, batch=2, longest_prompt=9, max_new_tokens=12,
                             floe=FloeOptions(up_bits=None, sparsity=0.0))
    g = eng.generate(PROMPTS, 12, eos_token_ids=())
    assert g.tokens == ref.tokens
    np.testing.assert_array_equal(g.expert_counts, ref.expert_counts)
    for ours, theirs in zip(eng.logits(PROMPTS), full.logits(PROMPTS)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert g.stats["dropped_channels"] == 0 and g.stats["channels"] > 0
    # Every device byte of the up projections is in the plan.
    assert plan.fallback == sum(weights_nbytes(u) for u in eng.policy.up)


@pytest.fixture(scope="module")
def calibration(ckpt, moe_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("floe-cal")
    text = d / "calib.txt"
    text.write_text(CAL_TEXT)
    argv = ["--model", str(moe_checkpoint[0]), "--text", str(text), "--dtype", "float32", "--sparsity", "0.5",
            "--predictor-steps", "20", "--window", "64", "--out", str(d / "cal")]
    return d, argv


def _calibrate(argv, capsys) -> dict:
    assert calibrate.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_calibration_is_saved_reused_rebuilt_and_drives_int2_floe(ckpt, calibration, capsys):
    d, argv = calibration
    first = _calibrate(argv, capsys)
    assert not first["reused"] and first["unseen_experts"] >= 0
    assert abs(first["achieved_sparsity"] - 0.5) < 0.05
    assert 0 <= first["predictor"]["layer0"]["mlp_recall"] <= 1
    assert _calibrate(argv, capsys)["reused"]
    (d / "calib.txt").write_text(CAL_TEXT + "x = 1\n")  # the text changed: rebuilt
    assert not _calibrate(argv, capsys)["reused"]
    cal = floe_calibration.load(d / "cal", ckpt, floe_calibration.settings(0.5, 2, 64))
    assert cal.thresholds.shape == (2, 8) and "layer0" in cal.predictor

    opts = FloeOptions(sparsity=0.5, calibration=str(d / "cal"))
    eng, plan = build_engine(ckpt, "floe", budget=None, batch=1, longest_prompt=9, max_new_tokens=10, floe=opts)
    assert plan.fallback == sum(u.nbytes for u in eng.policy.up) and eng.policy.up[0].bits == 2
    short = eng.generate(PROMPTS[:1], 4, eos_token_ids=())
    long = eng.generate(PROMPTS[:1], 10, eos_token_ids=())
    cfg = ckpt.config
    cap = floe.capacity(cfg.moe_intermediate_size, 0.5, 1, opts.capacity_margin)
    assert cap < cfg.moe_intermediate_size
    # Six more decode steps, each one round of k experts x `cap` channels per MoE layer, gate and down.
    per_step = len(cfg.moe_layers) * 2 * cfg.experts_per_token * cap * cfg.hidden_size * 4
    assert long.stats["h2d_bytes"] - short.stats["h2d_bytes"] == 6 * per_step
    assert long.stats["active_bytes"] <= long.stats["h2d_bytes"]


def test_a_checkpoint_without_eos_is_calibrated_document_by_document(moe_checkpoint, edit_config, tmp_path, capsys):
    from dynaexq_jax.eval.evaluate import calibration_sequences

    tok = loader.load_tokenizer(moe_checkpoint[0])
    docs = [CAL_TEXT[:200], "the quick brown fox " * 9]
    ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    stitch = lambda ws: ws[0] + [t for w in ws[1:] for t in w[1:]]  # windows overlap by one token
    windows = calibration_sequences(tok, docs, (), 16)
    k = next(k for k in range(1, len(windows)) if stitch(windows[:k]) == ids[0])  # the first document's windows
    assert stitch(windows[k:]) == ids[1]  # then the second's: none crosses from one into the other
    assert stitch(calibration_sequences(tok, docs, (0,), 16)) == ids[0] + [0] + ids[1] + [0]  # with EOS: joined

    model = tmp_path / "no-eos"
    shutil.copytree(moe_checkpoint[0], model)
    edit_config(model, eos_token_id=None)
    (model / "generation_config.json").unlink(missing_ok=True)
    assert loader.read_eos(model) == ()
    (tmp_path / "calib.txt").write_text(CAL_TEXT)
    out = _calibrate(["--model", str(model), "--text", str(tmp_path / "calib.txt"), "--dtype", "float32",
                      "--sparsity", "0.5", "--predictor-steps", "5", "--window", "64", "--out", str(tmp_path / "c")],
                     capsys)
    assert out["documents"] == 1 and out["tokens"] == sum(map(len, calibration_sequences(tok, [CAL_TEXT], (), 64)))


def test_bad_calibrations_are_one_line_errors(ckpt, moe_checkpoint, calibration, capsys, tmp_path, edit_config):
    d, argv = calibration
    if not (d / "cal").is_dir():
        _calibrate(argv, capsys)
    other = tmp_path / "other"  # the same shapes, other settings: another checkpoint's fingerprint
    shutil.copytree(moe_checkpoint[0], other)
    edit_config(other, rope_theta=5000.0)
    good = floe_calibration.settings(0.5, 2, 64)
    floe_calibration.save(tmp_path / "shape", ckpt, good, np.zeros((3, 8), np.float32), {}, "x")
    cases = [
        (tmp_path / "missing", ckpt, good, "no FloE calibration at"),
        (d / "cal", ckpt, floe_calibration.settings(0.9, 2, 64), "was made for"),
        (d / "cal", loader.load(other, jnp.float32), good, "another checkpoint"),
        (tmp_path / "shape", ckpt, good, r"shape \[3, 8\], not \[2, 8\]"),
    ]
    for path, c, s, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            floe_calibration.load(path, c, s)
        assert "\n" not in str(e.value) and "scripts/calibrate.py" in str(e.value)
    with pytest.raises(UserError, match="needs calibrated thresholds and the cache is off"):
        build_engine(ckpt, "floe", budget=None, batch=1, longest_prompt=9, max_new_tokens=4, floe=FloeOptions())
    # The scripts print them as one line and exit 2.
    from dynaexq_jax.cli import generate

    model = ["--model", str(moe_checkpoint[0]), "--dtype", "float32"]
    for main, argv, needle in (
        (generate.main, model + ["--policy", "floe", "--floe-calibration", str(d / "cal")], "was made for"),
        (calibrate.main, model + ["--text", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "c")],
         "does not exist"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err


def test_floe_plan_refuses_a_budget_below_its_minimum(ckpt):
    kw = dict(batch=1, prompt=16, context=32, dtype_itemsize=4)
    plan = budget.floe_plan(ckpt.config, budget=None, up_bits=2, **kw)
    assert plan.slots == 0 and plan.fallback == 2 * budget.quantized_nbytes((8, 64, 32), 2, 64)
    with pytest.raises(budget.BudgetError, match=rf"the minimum is .*\({plan.minimum} bytes\)"):
        budget.floe_plan(ckpt.config, budget=plan.minimum - 1, up_bits=2, **kw)
