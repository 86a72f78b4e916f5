"""`scripts/gpu_check.py`, the one command for a lent GPU, runs end to end on the CPU at its
small preset, so the day a GPU is lent it is not debugged on the clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dynaexq_jax.eval import gpu_check, gpu_report, process
from dynaexq_jax.eval.gpu_report import merged
from dynaexq_jax.io import files

ROOT = Path(__file__).resolve().parents[1]

ENGINES = ("dynaexq b1", "static int4")
# A cut of the check (CI time): one engine case per kind of step (dynaexq's, static's), offload's
# layer loop, and the stages around them. The others run the same code with other settings; the
# layer-kernels, kernels and runtime stages run `eval.layer_bench`, `kernel_bench` and
# `runtime_bench`, whose scripts have tests of their own (tests/test_bench.py).
CASES = ENGINES + ("offload",)
STAGES = ("device", "decode", "profile")


def test_gpu_check_smoke_answers_decode_speed_first_with_predictions_then_profiles(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out", str(tmp_path),
                           "--stages", ",".join(STAGES), "--cases", ",".join(CASES)],
                          capture_output=True, text=True, timeout=1500)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = {k: v for k, v in doc["stages"].items() if k != "decode"} | doc["stages"]["decode"]
    failed = {k: v.get("log", v["status"])[-2000:] for k, v in parts.items() if v["status"] != "ok"}
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != files.MARKER)  # the marker: the tool's own
    assert tuple(doc["stages"]) == STAGES and written == ["gpu_check.json", "gpu_check.md"]
    device = merged(doc["stages"]["device"]["records"])
    assert all(device[k] > 0 for k in ("bandwidth_gbs", "copy_gbs", "read_gbs", "graph_kernel_s", "launch_s"))
    cases = doc["stages"]["decode"]
    assert tuple(cases) == CASES
    for name, case in cases.items():
        rows = [r for r in case["records"] if "batch" in r]
        assert [r["batch"] for r in rows] == list(next(c[3] for c in gpu_check.CASES if c[0] == name)), name
        assert merged(case["records"])["build_s"] > 0
        for r in rows:
            assert r["decode_tokens_per_s"] > 0, (name, r)
            if name in ENGINES:  # the step's own accounting, predicted with the measured costs
                assert r["launches"] > 0 and r["min_bytes"] > 0 and r["bytes"] >= 0.5 * r["min_bytes"], (name, r)
                assert r["predicted_step_s"] > 0, (name, r)
    profiles = [r for r in doc["stages"]["profile"]["records"] if "mode" in r]
    assert len(profiles) == 2 and all(p["kernel_sum_s"] > 0 and p["top"] for p in profiles)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| dynaexq b1 | 1 | ok |" in table and "Profile (command buffers kept)" in table


def test_the_report_names_the_fused_layers_profile_and_kernel_variants_apart_from_the_default_steps():
    def stage(op):
        top = [{"op": op, "calls_per_step": 48, "s_per_step": 2e-3, "gbs": 500.0}]
        record = {"mode": "command buffers kept", "kernel_sum_s": 5e-3, "step_wall_s": 6e-3, "ops": 300, "top": top}
        return {"status": "ok", "seconds": 30.0, "records": [{"build_s": 9.0}, record]}

    rows = [dict(batch=1, kernel="attn_out", programs=32, us=10.0, mb=16.8, gbs=1680.0, pct=57.0, err=0.0),
            dict(batch=1, kernel="attn_in[warps=4,stages=3]", programs=40, us=None, mb=21.0, gbs=None, pct=None,
                 err=None, error="RESOURCE_EXHAUSTED: Shared memory size limit exceeded")]
    layer = {"status": "ok", "seconds": 40.0, "records": [{"copy_gbs": 2965.0}] + [{"row": r} for r in rows]}
    table = gpu_report.markdown({"date": "2026-12-05", "stages": {"profile": stage("gemm_fusion"),
                                                                    "fused-profile": stage("attn_out_m1"),
                                                                    "layer-kernels": layer}})
    assert "| 1 | attn_out | 32 | 10.0 | 16.80 | 1680 | 57 | 0.0e+00 |" in table
    assert "| 1 | attn_in[warps=4,stages=3] | 40 | failed: RESOURCE_EXHAUSTED: Shared memory" in table
    default, fused = table.split("Profile of the fused layer (command buffers kept): kernels 5.00 ms of a 6.00 ms")
    assert "Profile (command buffers kept)" in default and "gemm_fusion" in default and "attn_out" not in default
    assert "| attn_out_m1 | 48 | 2.000 | 500 |" in fused and "| fused-profile | ok | 30 |" in fused
    assert gpu_check.PART_ENV["fused-profile"] == {"DYNAEXQ_FUSED_DECODE": "1"}


def test_a_part_that_runs_out_of_its_time_keeps_what_it_had_printed():
    code = "import time; print('{\"measured\": 1}', flush=True); time.sleep(60)"
    done = process.run([sys.executable, "-c", code], env=dict(os.environ), timeout=3)
    assert done.returncode is None and done.stdout == '{"measured": 1}\n' and 3 <= done.seconds < 30


def test_every_stage_and_case_runs_as_a_part_under_a_limit_of_its_own():
    parts = (set(gpu_check.STAGES) - {"decode"}) | {name for name, *_ in gpu_check.CASES}
    for cfg in (gpu_check.GPU, gpu_check.SMOKE):
        assert set(cfg["limits"]) == parts
    assert set(gpu_check.PARTS) | {name for name, policy, *_ in gpu_check.CASES if policy != "transformers"} == parts
