"""scripts/generate.py: JSON output, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from dynaexq_jax import budget, launch
from dynaexq_jax.cli import generate
from dynaexq_jax.io import loader
from dynaexq_jax.runtime import engine

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_has_generated_ids_text_and_stats(capsys, moe_checkpoint):
    path, _ = moe_checkpoint
    code, out, _ = run_cli(
        capsys, "--model", str(path), "--prompt", "def f", "--prompt", "the fox",
        "--max-new-tokens", "6", "--dtype", "float32", "--budget", "512MiB", "--policy", "full", "--json",
    )
    assert code == 0
    doc = json.loads(out)
    ckpt = loader.load(path, jnp.float32)
    ids = [ckpt.tokenizer.encode(p).ids for p in ("def f", "the fox")]
    expected = engine.Engine(ckpt).generate(ids, 6).tokens
    assert [o["token_ids"] for o in doc["outputs"]] == expected
    assert [o["prompt"] for o in doc["outputs"]] == ["def f", "the fox"]
    assert doc["outputs"][0]["text"] == ckpt.tokenizer.decode(expected[0], skip_special_tokens=True)
    assert doc["stats"]["budget_bytes"] == 512 * 2**20
    assert doc["stats"]["prefill_s"] > 0 and doc["stats"]["decode_tokens_per_s"] > 0


def test_streamed_run_prints_text_and_a_one_line_summary(capsys, moe_checkpoint):
    code, out, err = run_cli(capsys, "--model", str(moe_checkpoint[0]), "--prompt", "the", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("the")
    assert err.count("\n") == 1 and "tok/s" in err


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def bad_model_type(path, edit):
    edit(path, model_type="llama")


def bad_rope(path, edit):
    edit(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})


def missing_shard(path, edit):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "breakage, extra, needle",
    [
        (None, ["--model", "/nonexistent/model"], "does not exist"),
        (missing_shard, [], "model-00002-of-00002.safetensors"),
        (bad_model_type, [], "model_type='llama'"),
        (bad_rope, [], "rope scaling 'yarn'"),
        (None, ["--budget", "20GX"], "20GX"),
        (None, ["--prompt", "x " * 600], "context is 512"),
        (None, ["--top-p", "0"], "top_p"),
    ],
    ids=["missing-dir", "missing-shard", "wrong-model-type", "unsupported-rope", "bad-budget", "prompt-too-long",
         "bad-top-p"],
)
def test_bad_input_gives_one_line_error_and_nonzero_exit(capsys, tmp_path, moe_checkpoint, edit_config, breakage, extra,
                                                         needle):
    path = copy_checkpoint(moe_checkpoint[0], tmp_path / "ckpt")
    if breakage is not None:
        breakage(path, edit_config)
    code, out, err = run_cli(capsys, "--model", str(path), "--max-new-tokens", "2", *extra)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err


def test_script_runs_as_a_subprocess(moe_checkpoint):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(moe_checkpoint[0]),
         "--prompt", "def", "--max-new-tokens", "3", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["outputs"][0]["token_ids"]) == 3


# Qwen/Qwen3-30B-A3B's config.json (the fields the plan reads); no weights are written.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "norm_topk_prob": True, "tie_word_embeddings": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "attention_bias": False, "use_sliding_window": False, "torch_dtype": "bfloat16",
}


@pytest.fixture
def qwen3_30b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    # 30.53 B parameters in bf16, as the published index states (61,064,245,248 bytes).
    index = {"metadata": {"total_size": 61064245248},
             "weight_map": {"lm_head.weight": "model-00016-of-00016.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def plan_rows(text: str) -> dict[str, str]:
    return {line[:38].strip(): line[38:].strip() for line in text.splitlines()}


def test_dry_run_of_qwen3_30b_fits_20gb_without_weights(capsys, qwen3_30b):
    code, out, err = run_cli(capsys, "--model", str(qwen3_30b), "--budget", "20GB", "--dry-run")
    assert code == 0 and err == "", err
    for part in ("non-expert weights", "fallback experts", "high-precision slots", "KV cache", "workspace margin",
                 "total", "budget"):
        assert part in out
    assert "per MoE layer: 1 to 2 of 128 experts hold a high-precision slot" in out
    assert "30.53 B parameters as bfloat16, as config.json implies" in out
    code, out, _ = run_cli(capsys, "--model", str(qwen3_30b), "--budget", "20GB", "--dry-run", "--json")
    plan = json.loads(out)["memory_plan"]
    assert plan["total"] <= plan["budget"] == 20 * 10**9 and plan["slots"] > 0
    assert plan["fallback"] == pytest.approx(15.4e9, rel=0.01) and plan["weights"] == pytest.approx(3.08e9, rel=0.01)


def test_dry_run_says_when_the_fallback_does_not_fit(capsys, qwen3_30b):
    code, out, err = run_cli(capsys, "--model", str(qwen3_30b), "--budget", "10GB", "--dry-run", "--lo-bits", "4")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: budget 10.00 GB cannot hold the int4 fallback experts")
    assert "the minimum is 19.30 GB" in err
    # Auto tiers refuse only below the narrowest fallback, and say so.
    code, out, err = run_cli(capsys, "--model", str(qwen3_30b), "--budget", "10GB", "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: budget 10.00 GB cannot hold the int2 fallback experts")


def test_explicit_tiers_plan_as_before_and_auto_starts_from_the_widest_fitting_fallback(capsys, qwen3_30b):
    from dynaexq_jax.models.registry import read_config
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime.build import plan_for

    shape = launch.plan_shape(launch.EngineOptions(model=launch.ModelOptions(str(qwen3_30b))), read_config(qwen3_30b))
    for budget_flag, want_bits in (("20GB", 4), ("40GB", 8)):
        code, out, _ = run_cli(capsys, "--model", str(qwen3_30b), "--budget", budget_flag, "--dry-run", "--json",
                               "--lo-bits", "4", "--hi-dtype", "bfloat16")
        explicit = json.loads(out)["memory_plan"]
        want = plan_for(read_config(qwen3_30b), "dynaexq", budget=budget.parse_size(budget_flag),
                        batch=shape[0], longest_prompt=shape[1], max_new_tokens=shape[2], dtype_itemsize=2,
                        opts=DynaExqOptions(lo_bits=4, hi_dtype="bfloat16"))
        assert explicit == want.as_dict()
        code, out, _ = run_cli(capsys, "--model", str(qwen3_30b), "--budget", budget_flag, "--dry-run")
        assert code == 0 and f"int{want_bits} fallback, bfloat16 slots (auto tiers start here" in out


def test_auto_tiers_run_within_the_budget_and_say_what_they_chose(capsys, moe_checkpoint):
    code, out, err = run_cli(capsys, "--model", str(moe_checkpoint[0]), "--budget", "18.3MB", "--prompt", "the",
                             "--max-new-tokens", "2", "--json", "--verbose", "--quiet")
    assert code == 0, err
    plan = json.loads(out)["stats"]["memory_plan"]
    assert plan["total"] <= plan["budget"] and "auto tiers: int" in err


def test_dry_run_plan_is_the_runs_plan(capsys, moe_checkpoint):
    """The plan shown before loading is the one the run then holds (same shape, budget, policy)."""
    # Explicit tiers: auto ones are picked once the weights are read (see the test below).
    common = ["--model", str(moe_checkpoint[0]), "--budget", "18.3MB", "--max-new-tokens", "4", "--lo-bits", "4",
              "--hi-dtype", "bfloat16"]
    code, out, _ = run_cli(capsys, *common, "--dry-run", "--context", "20", "--json")  # a 16-token prompt + 4
    assert code == 0
    dry = json.loads(out)["memory_plan"]
    code, out, err = run_cli(capsys, *common, "--prompt", "the quick brown fox " * 3, "--json", "--verbose", "--quiet")
    assert code == 0
    assert json.loads(out)["stats"]["memory_plan"] == dry
    assert "non-expert weights" in err and "high-precision slots" in err
    assert "tok/s" not in err  # --quiet drops the closing line, not the plan --verbose asked for


def test_closing_line_equals_the_json_stats(capsys, moe_checkpoint):
    code, out, err = run_cli(capsys, "--model", str(moe_checkpoint[0]), "--prompt", "the", "--max-new-tokens", "5",
                             "--budget", "18.3MB", "--json")
    assert code == 0 and err.count("\n") == 1  # one summary line on stderr, also with --json
    s = json.loads(out)["stats"]
    m = re.fullmatch(
        r"prompt (\d+) tok, ([\d.]+) tok/s \| generated (\d+) tok, ([\d.]+) tok/s \| "
        r"accounted ([\d.]+ [KMG]?B) \(no allocator peak on this backend\) of ([\d.]+ [KMG]?B) budget \| "
        r"hi-precision hits ([\d.]+)% \| host->device ([\d.]+) GB\n", err,
    )
    assert m, err
    assert m.groups() == (
        str(s["prompt_tokens"]), f"{s['prefill_tokens_per_s']:.1f}", str(s["generated_tokens"]),
        f"{s['decode_tokens_per_s']:.1f}", budget.format_size(s["accounted_device_bytes"]),
        budget.format_size(s["budget_bytes"]), f"{100 * s['hi_hit_rate']:.1f}", f"{s['h2d_bytes'] / 1e9:.3f}",
    )


def test_progress_bar_shows_bytes_on_a_terminal_only(moe_checkpoint, capsys):
    loader.load(moe_checkpoint[0], jnp.float32, progress=True)
    err = capsys.readouterr().err
    assert "loading" in err and "B/s" in err
    assert not launch.OutputOptions().progress()  # pytest's stderr is not a terminal


@pytest.mark.parametrize("size", ["20GX", "20 G", "-5GB", "1e3GB"])
def test_bad_budget_is_one_line_with_an_example(capsys, qwen3_30b, size):
    code, out, err = run_cli(capsys, "--model", str(qwen3_30b), f"--budget={size}", "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert repr(size) in err and "expected a size like 20GB, 20GiB, 5.5GB, 512MiB or plain bytes" in err


def test_big_little_run_reports_its_counts_in_the_json_stats(capsys, moe_checkpoint):
    path, _ = moe_checkpoint
    code, out, _ = run_cli(
        capsys, "--model", str(path), "--prompt", "def f", "--max-new-tokens", "4", "--dtype", "float32",
        "--policy", "full", "--json", "--big-little", "--little-k", "1", "--little-threshold", "0.5",
    )
    assert code == 0
    s = json.loads(out)["stats"]["big_little"]
    assert (s["little_k"], s["rule"], s["threshold"]) == (1, "router", 0.5)
    assert s["little_share"] == 1.0 and s["pairs_saved"] == s["tokens"] * 2  # 2 MoE layers x (2 - 1) pairs


@pytest.mark.parametrize(
    "extra, needle",
    [(["--context", "100"], "--context applies to --dry-run"), (["--dry-run", "--context", "50000"], "exceeds"),
     (["--interactive", "--json"], "drop --json"), (["--batch", "2"], "--batch applies to --dry-run"),
     (["--little-k", "2"], "--little-k applies to --big-little; add --big-little"),
     (["--big-little", "--little-floor", "2"], "--little-floor is a kept share between 0 and 1")],
)
def test_flag_misuse_is_a_one_line_error(capsys, qwen3_30b, extra, needle):
    code, out, err = run_cli(capsys, "--model", str(qwen3_30b), *extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err
