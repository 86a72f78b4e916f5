"""The check for a lent GPU (`scripts/gpu_check.py`): the answer first, each part in a process of
its own under its own time limit, the report rewritten after every part.

Stages, in order of what they answer (each case and stage is cut to what is left of the whole
check's `total_s`; one that runs out is reported with what it had measured by then, the rest
still run):

1. device: what it is; host->device GB/s (pinned, pageable); the HBM bandwidth the device really
   reaches (a read-and-write and a reduction read, best of five); the cost of one kernel in a
   chain of dependent kernels, inside a CUDA graph (XLA's command buffers) and launched one by
   one. The decode cases' predictions use these figures.
2. decode: tok/s at prompt 128 + 64 new tokens (greedy, random weights of the preset's shapes,
   skewed routing) for dynaexq (20 GB at batch 1, 40 GB at batch 32), static int4 and full bf16
   (no budget) at both, offload (20 GB, batch 1) and transformers' own model at both; dynaexq b1
   and static int4 again with the opt-in fused decode layer ("fused layer"), static int4 with
   the layer loop inside the step's CUDA graph ("one graph", `DYNAEXQ_GRAPH_LOOP=1`); each with
   its build and compile seconds, the peak device bytes, and the step time predicted from its
   own compiled decode step (`runtime.aot`: bytes at the measured bandwidth, each launch at the
   measured cost) beside the measured one.
3. profile: static int4 at batch 1 under `jax.profiler` (`eval.profile`): per kernel its calls,
   device time and achieved GB/s, and the kernels' sum against the steps' wall time, with the
   command buffers replayed op by op and kept. fused-profile: the same over the fused decode
   layer's kernels (GPU only).
4. layer-kernels: the fused layer's attention-side kernels one by one with their tiling variants
   (`eval.layer_bench`). kernels: the Pallas tiled kernel against the XLA tile loop and
   `ragged_dot` (`eval.kernel_bench`).
5. runtime: `eval.runtime_bench` at batch 1: allocator peak against the budget, steps with
   promotions in flight against steps without.

A part is `python -m dynaexq_jax.eval.gpu_check PART COSTS [--smoke]`; it prints one JSON record
a line (`emit`), read by the parent even when the part runs out.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import dynaexq_jax

STAGES = ("device", "decode", "profile", "fused-profile", "layer-kernels", "kernels", "runtime")

# Decode cases, in the order they run: (name, policy, budget (None: no budget), batches). Static
# has no budget: with one it widens to the widest bits that fit (int8 in 40 GB).
CASES = (("dynaexq b1", "dynaexq", "b1", (1,)), ("dynaexq b1 (fused layer)", "dynaexq", "b1", (1,)),
         ("dynaexq b32", "dynaexq", "b32", (32,)), ("static int4", "static", None, (1, 32)),
         ("static int4 (fused layer)", "static", None, (1, 32)), ("full bf16", "full", None, (1, 32)),
         ("static int4 (one graph)", "static", None, (1, 32)), ("offload", "offload", "b1", (1,)),
         ("transformers", "transformers", None, (1, 32)))
# "(fused layer)": the same case with the opt-in fused decode layer (`models.fused_decode.ENABLED`);
# "(one graph)": with the layer loop inside the step's CUDA graph (`runtime.engine.GRAPH_LOOP`);
# each against XLA's own step: it becomes the default once it wins. "fused-profile": the profile
# stage over the fused layer's kernels. Neither switch acts off a GPU: the smoke check skips them.
PART_ENV = {name: {"DYNAEXQ_FUSED_DECODE": "1"} if name.endswith("(fused layer)") else {"DYNAEXQ_GRAPH_LOOP": "1"}
            for name, *_ in CASES if name.endswith(("(fused layer)", "(one graph)"))}
PART_ENV["fused-profile"] = {"DYNAEXQ_FUSED_DECODE": "1"}

GPU = dict(preset="qwen3-30b-a3b", budgets=dict(b1="20GB", b32="40GB"), prompt=128, gen=64, probe_bytes=2 << 30,
           chain=64, profile_steps=16, reps=10, inner=10, kernel_bits=(4, 2, 8, 16), kernel_tokens=(1, 8, 32, 256),
           runtime_gen=64,
           total_s=470,  # the whole check: each part gets at most what is left of it
           limits={"device": 40, "dynaexq b1": 45, "dynaexq b1 (fused layer)": 40, "dynaexq b32": 45, "static int4": 45,
                   "static int4 (fused layer)": 45, "static int4 (one graph)": 45, "full bf16": 40, "offload": 50,
                   "transformers": 55, "profile": 40, "fused-profile": 40, "layer-kernels": 90, "kernels": 50,
                   "runtime": 40})
SMOKE = dict(preset="qwen3-moe-smoke", budgets=dict(b1="48MB", b32="160MB"), prompt=16, gen=8, probe_bytes=32 << 20,
             chain=8, profile_steps=2, reps=1, inner=1, kernel_bits=(4,), kernel_tokens=(1,), runtime_gen=16,
             total_s=3600,
             limits={"device": 120, "dynaexq b1": 150, "dynaexq b1 (fused layer)": 150, "dynaexq b32": 200,
                     "static int4": 200, "static int4 (fused layer)": 200, "static int4 (one graph)": 200,
                     "full bf16": 200, "offload": 150,
                     "transformers": 150, "profile": 200, "fused-profile": 200, "layer-kernels": 200, "kernels": 200,
                     "runtime": 300})


def emit(**record):
    """One result line of a part's process (read by the parent even if the part runs out)."""
    print(json.dumps(record, default=str), flush=True)


def _gpu() -> bool:
    import jax

    return jax.devices()[0].platform == "gpu"


# ----------------------------------------------------------------------------- the device


def stage_device(cfg, costs):
    import jax

    from dynaexq_jax.runtime import costmodel

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    emit(platform=dev.platform, device=str(getattr(dev, "device_kind", dev)), memory_bytes=stats.get("bytes_limit"),
         runtime=str(getattr(dev.client, "platform_version", "")), jax=jax.__version__)
    emit(**costmodel.host_to_device_gbs(cfg["probe_bytes"] // 2))  # half the probe: host copies are slow
    emit(**costmodel.hbm_gbs(cfg["probe_bytes"]))
    emit(graph_kernel_s=costmodel.kernel_seconds(cfg["chain"], True),
         launch_s=costmodel.kernel_seconds(cfg["chain"], False))


# ----------------------------------------------------------------------------- decode


def case_engine(cfg, name, costs):
    """One policy's engine: built (timed), then each batch warmed (compile) and measured."""
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.io import preset
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime import aot
    from dynaexq_jax.runtime.build import build_engine
    from dynaexq_jax.runtime.engine import device_memory, peak_device_bytes

    _, policy, budget_key, batches = next(c for c in CASES if c[0] == name)
    mcfg = preset.preset_config(cfg["preset"])
    budget = budget_lib.parse_size(cfg["budgets"][budget_key]) if budget_key else None
    t0 = time.perf_counter()
    ckpt = preset.random_checkpoint(mcfg, jnp.bfloat16, routing_skew=1.0)
    eng, plan = build_engine(ckpt, policy, budget=budget, batch=max(batches), longest_prompt=cfg["prompt"],
                             max_new_tokens=cfg["gen"], opts=DynaExqOptions(lo_bits=4))
    emit(build_s=time.perf_counter() - t0, slots=plan.slots, accounted_bytes=plan.total, after_build=device_memory())
    dump = Path(os.environ["DYNAEXQ_GPU_CHECK_DUMP"])
    for batch in batches:
        for f in dump.iterdir():  # only this batch's step in the dump
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        prompts = np.random.default_rng(batch).integers(1, mcfg.vocab_size, (batch, cfg["prompt"])).tolist()
        t0 = time.perf_counter()
        eng.generate(prompts, cfg["gen"])  # compile, fill the slots
        warm_s = time.perf_counter() - t0
        g = eng.generate(prompts, cfg["gen"], eos_token_ids=())
        row = {"batch": batch, "warmup_s": warm_s, "compile_s": eng.compile_s,
               "decode_tokens_per_s": g.stats["decode_tokens_per_s"],
               "step_s": batch / g.stats["decode_tokens_per_s"], "peak_device_bytes": peak_device_bytes(),
               "after_generate": device_memory()}
        if policy != "offload":  # offload runs layer by layer from the host: no one compiled step
            row.update(aot.measured_step(eng, plan, policy, batch=batch, prompt=cfg["prompt"], gen=cfg["gen"],
                                         costs=costs, dump=dump))
        emit(**row)


def case_transformers(cfg, costs):
    """transformers' Qwen3-MoE on the same device and shapes: bf16, every expert resident."""
    from dynaexq_jax.eval import transformers_peer

    for record in transformers_peer.decode_speed(cfg["preset"], prompt=cfg["prompt"], gen=cfg["gen"]):
        emit(**record)


# ----------------------------------------------------------------------------- profile


def stage_profile(cfg, costs):
    """Static int4 at batch 1: its decode step run bare under the profiler (`eval.profile`)."""
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.eval import profile
    from dynaexq_jax.io import preset
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime.build import build_engine

    mcfg = preset.preset_config(cfg["preset"])
    t0 = time.perf_counter()
    ckpt = preset.random_checkpoint(mcfg, jnp.bfloat16, routing_skew=1.0)
    eng, plan = build_engine(ckpt, "static", budget=budget_lib.parse_size(cfg["budgets"]["b1"]), batch=1,
                             longest_prompt=cfg["prompt"], max_new_tokens=cfg["gen"], opts=DynaExqOptions(lo_bits=4))
    eng.generate([np.random.default_rng(1).integers(1, mcfg.vocab_size, cfg["prompt"]).tolist()], cfg["gen"])
    emit(build_s=time.perf_counter() - t0)
    for record in profile.profile_decode(eng, plan, "static", prompt=cfg["prompt"], gen=cfg["gen"],
                                         steps=cfg["profile_steps"]):
        emit(**record)


# ----------------------------------------------------------------------------- kernels, runtime


def stage_layer_kernels(cfg, costs):
    from dynaexq_jax.eval import layer_bench
    from dynaexq_jax.runtime import costmodel

    shapes = layer_bench.SMOKE if cfg is SMOKE else layer_bench.FULL
    bw = costmodel.copy_bandwidth(shapes["copy_bytes"], cfg["reps"], cfg["inner"])
    emit(copy_gbs=bw / 1e9)
    for row in layer_bench.run(shapes, reps=cfg["reps"], inner=cfg["inner"], gpu=_gpu(), bw=bw):
        emit(row=row)  # each as measured: a stage that runs out of time keeps what it had


def stage_kernels(cfg, costs):
    from dynaexq_jax.eval import kernel_bench

    shapes = kernel_bench.SMOKE if cfg is SMOKE else kernel_bench.FULL
    rows, bw = kernel_bench.run(shapes, bits=cfg["kernel_bits"], tokens=cfg["kernel_tokens"], reps=cfg["reps"],
                                inner=cfg["inner"], gpu=_gpu(), sweep_tiling=False)
    emit(copy_gbs=bw / 1e9, rows=rows)


def stage_runtime(cfg, costs):
    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.eval import runtime_bench

    bench = runtime_bench.RuntimeBench(cfg["preset"], budget_lib.parse_size(cfg["budgets"]["b1"]),
                                       prompt_len=cfg["prompt"], gen_len=cfg["runtime_gen"])
    record = {"preset": bench.preset, "budget_bytes": bench.budget, "batch_size": bench.batch}
    for variant, row in runtime_bench.run(bench):
        record[variant] = row
    emit(**record)


PARTS: dict[str, Callable] = {"device": stage_device, "profile": stage_profile, "fused-profile": stage_profile,
                              "layer-kernels": stage_layer_kernels, "kernels": stage_kernels, "runtime": stage_runtime,
                              "transformers": case_transformers}


def run_part_here(part: str, cfg: dict, costs: dict) -> None:
    """One stage or decode case, in this process (a fresh one: `run_part` starts it)."""
    if part in PARTS:
        PARTS[part](cfg, costs)
    else:
        case_engine(cfg, part, costs)


# ----------------------------------------------------------------------------- the runner


def run_part(part: str, cfg: dict, costs: dict, dump: Path, deadline: float) -> dict:
    """One stage or decode case in a process of its own, under its time limit (and what is left
    before `deadline`, a `perf_counter` time): its result lines, as far as it got."""
    from dynaexq_jax.eval import process

    limit = int(min(cfg["limits"][part], deadline - time.perf_counter()))
    if limit < 5:
        return {"status": f"skipped: the check's {cfg['total_s']} s are spent", "seconds": 0.0, "records": []}
    cmd = [sys.executable, "-m", __name__, part, json.dumps(costs)] + (["--smoke"] if cfg is SMOKE else [])
    root = str(Path(dynaexq_jax.__file__).resolve().parents[1])  # importable however the parent found it
    env = {**os.environ, **PART_ENV.get(part, {}), "DYNAEXQ_GPU_CHECK_DUMP": str(dump),
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
           # the decode step's thunks, for its launches and graphs (read back by the case itself)
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*_decode.*")}
    done = process.run(cmd, env=env, timeout=limit)
    if done.returncode is None:
        status = f"ran out of its {limit} s"
    else:
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    records = []
    for line in done.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    result = {"status": status, "seconds": done.seconds, "records": records}
    if status != "ok":
        result["log"] = done.stderr[-3000:]
    return result


def check(cfg: dict, stages, cases, save: Callable[[dict], None], dump: Path) -> dict:
    """Every stage of `stages` in order (the decode stage's `cases` only), `save(doc)` after
    each part: -> the report (its `stages` hold each part's status, seconds and records)."""
    from dynaexq_jax.eval.gpu_report import merged

    doc = {"date": time.strftime("%Y-%m-%d"), "config": {k: v for k, v in cfg.items() if k != "limits"},
           "stages": {}}
    costs = {"bandwidth_gbs": None, "launch_s": None, "graph_kernel_s": None}
    deadline = time.perf_counter() + cfg["total_s"]
    for name in stages:
        if name == "decode":
            doc["stages"]["decode"] = {}
            for case in (c[0] for c in CASES if c[0] in cases):
                if cfg is SMOKE and case in PART_ENV:
                    continue
                doc["stages"]["decode"][case] = run_part(case, cfg, costs, dump, deadline)
                print(f"decode {case}: {doc['stages']['decode'][case]['status']}", file=sys.stderr)
                save(doc)
            continue
        if cfg is SMOKE and name in PART_ENV:
            continue
        doc["stages"][name] = run_part(name, cfg, costs, dump, deadline)
        print(f"{name}: {doc['stages'][name]['status']}", file=sys.stderr)
        if name == "device":  # the measured costs every prediction after this uses
            measured = merged(doc["stages"]["device"]["records"])
            costs = {k: measured.get(k) for k in costs}
        save(doc)
    return doc


def passed(doc: dict) -> bool:
    ok = [r["status"] == "ok" for name, r in doc["stages"].items() if name != "decode"]
    return all(ok + [c["status"] == "ok" for c in doc["stages"].get("decode", {}).values()])


if __name__ == "__main__":  # a part: PART COSTS [--smoke]
    run_part_here(sys.argv[1], SMOKE if "--smoke" in sys.argv[2:] else GPU, json.loads(sys.argv[2]))
