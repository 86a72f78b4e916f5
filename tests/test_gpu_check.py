"""`scripts/gpu_check.py`, the one command for a lent GPU, runs end to end on the CPU at its
small preset, so the day a GPU is lent it is not debugged on the clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("device", "model", "kernels", "runtime", "decode")


def test_gpu_check_smoke_runs_every_stage_and_writes_its_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: v.get("log", v["status"])[-2000:] for k, v in doc["stages"].items() if v["status"] != "ok"}
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
    assert tuple(doc["stages"]) == STAGES
    model_rows = doc["stages"]["model"]["model"]["rows"]
    assert [r["batch"] for r in model_rows] == [1, 32]
    for r in model_rows:  # the decode step's own HLO, counted, next to the analytic minimum
        assert r["launches"] > 0 and r["min_bytes"] > 0 and r["bytes"] >= r["min_bytes"] * 0.5
        assert r["predicted_step_s"] > 0 and r["measured_step_s"] > 0
    decode = doc["stages"]["decode"]["decode"]["results"]
    assert {x["policy"] for x in decode} == {"static", "offload", "prefetch", "dynaexq", "full"}
    assert all(x["decode_tokens_per_s"] > 0 for x in decode)
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {s} | ok |" in table for s in STAGES)
