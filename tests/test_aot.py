"""The decode step compiled for an H200 without a GPU: it reads the experts it routes to, not
the slot pool (needs the compile-only GPU stack; see README "Compiling for a GPU")."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AOT_PYTHON = Path(os.environ.get("DYNAEXQ_AOT_PYTHON", ROOT / ".aot-venv" / "bin" / "python"))
MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"

pytestmark = pytest.mark.skipif(
    not AOT_PYTHON.exists(),
    reason=f"the compile-only GPU stack is not installed at {AOT_PYTHON} (set DYNAEXQ_AOT_PYTHON; .ci/run installs it)",
)


def report(*args, source=("--model", str(MODEL))) -> list[dict]:
    out = subprocess.run([str(AOT_PYTHON), str(ROOT / "scripts" / "aot_report.py"), *source, "--json", *args],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["steps"]


def test_decode_reads_the_routed_experts_not_the_whole_slot_pool():
    # 25 MB: every expert's int4 fallback and a few slots; 40 MB: a slot for every expert.
    few, every = (report("--budget", budget, "--batch", "1", "--context", "256", "--policy", "dynaexq",
                         "--steps", "decode", "--gpu", "h100,h200") for budget in ("25MB", "40MB"))
    for s in few + every:
        assert s["pallas_bytes"] > 0  # the experts ran as Pallas kernels, as on a GPU
        assert s["bytes"] <= 1.25 * s["min_bytes"], s
        assert s["compile_s"] < 60
    assert few[0]["slots"] < 32 and every[0]["slots"] == 128
    # Slots ten times over cost only what reading the hot experts at high precision costs.
    assert every[0]["bytes"] - few[0]["bytes"] <= 1.25 * (every[0]["min_bytes"] - few[0]["min_bytes"]) + 20_000


def test_static_decode_is_within_a_quarter_of_the_minimum():
    (step,) = report("--policy", "static", "--batch", "1", "--context", "256", "--steps", "decode")
    assert step["bytes"] <= 1.25 * step["min_bytes"], step


def test_a_budget_that_cannot_hold_the_policy_is_reported_not_compiled():
    steps = report("--budget", "20MB", "--policy", "full", "--steps", "decode")
    assert len(steps) == 1 and "needs" in steps[0]["refused"]


def test_latent_attention_decode_reads_the_latent_cache_once():
    """DeepSeek-V3's attention shapes (a 512 + 64 latent per token; 16 heads of 192 + 128 dims,
    8.9 times the latent expanded) at a context where the cache is most of what a decode step
    must read: the step reads within a quarter of the minimum, which counts the latent once."""
    (step,) = report("--batch", "8", "--context", "8192", "--steps", "decode", "--policy", "static",
                     source=("--preset", "deepseek-v3-smoke"))
    latent = 4 * 8 * 8192 * (512 + 64) * 2
    assert step["min_bytes"] > latent > step["min_bytes"] / 2
    assert step["bytes"] <= 1.25 * step["min_bytes"], step
