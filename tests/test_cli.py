"""scripts/generate.py: JSON output, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from dynaexq_jax import engine, loader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import generate  # noqa: E402


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
    ids=["missing-dir", "missing-shard", "wrong-model-type", "unsupported-rope", "bad-budget", "prompt-too-long", "bad-top-p"],
)
def test_bad_input_gives_one_line_error_and_nonzero_exit(capsys, tmp_path, moe_checkpoint, edit_config, breakage, extra, needle):
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
