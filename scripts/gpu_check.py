#!/usr/bin/env python
"""The first thing to run on a lent GPU: one command, one Markdown table and one JSON file.

    python scripts/gpu_check.py --out gpu_check            # GPU: Qwen3-30B-A3B shapes, < 9 minutes
    python scripts/gpu_check.py --smoke --out /tmp/check   # CPU: a small preset, the same stages

Stages, each in its own process with its own time limit (a stage that runs out is reported as
such; the others still run), in order of what they teach:

1. device: what it is; host->device GB/s (pinned and pageable), device copy GB/s, and the cost
   of one kernel launch in a chain of small dependent kernels (what the AOT model assumes,
   `dynaexq_jax.runtime.aot.LAUNCH_S`);
2. model: the dynaexq decode step compiled on this GPU at batch 1 and 32, its launches and
   bytes counted from its own HLO (`runtime.aot`), the predicted step time against a measured
   one, and the allocator's peak against the plan;
3. kernels: `bench_kernels.py`, the Pallas tiled kernel against the XLA tile loop and
   `ragged_dot` (the tiling sweep is `bench_kernels.py` without `--no-sweep`);
4. runtime: `bench_runtime.py` at batch 1 and 32: allocator peak against `--budget`, steps with
   promotions in flight against steps without, asynchronous against blocking migration;
5. decode: `bench.py`, every policy at batch 1 and 32 side by side.

Writes OUT/gpu_check.md and OUT/gpu_check.json; paste the table into docs/PERFORMANCE.md
with the device named.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

GPU = dict(preset="qwen3-30b-a3b", budget_b1="20GB", budget_b32="40GB", context=1024, prompt=128, gen=64,
           kernel_args=["--no-sweep"], limits=dict(device=60, model=150, kernels=120, runtime=150, decode=200))
SMOKE = dict(preset="qwen3-moe-smoke", budget_b1="48MB", budget_b32="160MB", context=256, prompt=32, gen=8,
             kernel_args=["--smoke", "--bits", "4", "16", "--tokens", "1", "8", "--reps", "1", "--inner", "1"],
             limits=dict(device=120, model=300, kernels=300, runtime=600, decode=900))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="directory for gpu_check.md and gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="small preset and budgets: the CPU smoke test")
    p.add_argument("--stages", default="device,model,kernels,runtime,decode")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- in-process stages


def stage_device(cfg) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax.experts.swap import host_memory_kind

    dev = jax.devices()[0]
    nbytes = 256 * 2**20 if dev.platform == "gpu" else 32 * 2**20
    host = np.ones(nbytes // 4, np.float32)

    def rate(fn, n=5):
        fn()
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return nbytes / float(np.median(t))

    out = {"platform": dev.platform, "device": str(getattr(dev, "device_kind", dev)), "jax": jax.__version__,
           "h2d_pageable_gbs": rate(lambda: jax.block_until_ready(jax.device_put(host, dev))) / 1e9}
    kind = host_memory_kind(dev)
    if kind:
        pinned = jax.device_put(host, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
        to_dev = jax.sharding.SingleDeviceSharding(dev)
        out["h2d_pinned_gbs"] = rate(lambda: jax.block_until_ready(jax.device_put(pinned, to_dev))) / 1e9
    x = jax.device_put(host, dev)
    copy = jax.jit(lambda a: a + 1)
    out["device_copy_gbs"] = 2 * rate(lambda: jax.block_until_ready(copy(x))) / 1e9
    # A chain of small dependent kernels: the per-kernel cost a decode step pays at batch 1.
    n = 400
    chain = jax.jit(lambda v: jax.lax.fori_loop(0, n, lambda i, v: jnp.sin(v) * 1.0001 + jnp.cumsum(v)[-1:], v))
    v = jnp.ones((256,), jnp.float32)
    jax.block_until_ready(chain(v))
    t0 = time.perf_counter()
    jax.block_until_ready(chain(v))
    out["launch_s_measured"] = (time.perf_counter() - t0) / (2 * n)  # two kernels per iteration
    return out


def stage_model(cfg) -> dict:
    """The dynaexq decode step compiled on this device, predicted against measured."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.io import preset
    from dynaexq_jax.runtime import aot
    from dynaexq_jax.runtime.build import build_engine, plan_for
    from dynaexq_jax.runtime.engine import peak_device_bytes

    mcfg = preset.preset_config(cfg["preset"])
    ckpt = preset.random_checkpoint(mcfg, jnp.bfloat16, routing_skew=1.0)
    rows = []
    for batch, budget in ((1, cfg["budget_b1"]), (32, cfg["budget_b32"])):
        budget = budget_lib.parse_size(budget)
        shape = dict(batch=batch, longest_prompt=cfg["prompt"], max_new_tokens=cfg["context"] - cfg["prompt"])
        plan = plan_for(mcfg, "dynaexq", budget=budget, dtype_itemsize=2, **shape)
        eng, plan = build_engine(ckpt, "dynaexq", budget=budget, **shape)
        prompts = np.random.default_rng(batch).integers(1, mcfg.vocab_size, (batch, cfg["prompt"])).tolist()
        eng.generate(prompts, cfg["gen"])  # compile, fill the slots
        g = eng.generate(prompts, cfg["gen"], eos_token_ids=())
        decode = next(v for k, v in eng._compiled.items() if k[0] == "decode")
        traffic, minimum = aot.traffic_and_min(mcfg, "dynaexq", plan, step="decode", batch=batch,
                                               context=cfg["context"], prompt=cfg["prompt"], itemsize=2,
                                               hi_dtype="bfloat16", group=budget_lib.expert_group_size(mcfg))
        r = aot.report_step(decode, traffic)
        bw = aot.GPUS.get("h200" if "H200" in str(jax.devices()[0].device_kind) else "h100")[1]
        measured = 1 / (g.stats["decode_tokens_per_s"] / batch)
        rows.append({"batch": batch, "budget_bytes": budget, "slots": plan.slots, "launches": r["launches"],
                     "bytes": r["bytes"], "min_bytes": minimum, "predicted_step_s": aot.predicted_s(r["bytes"], r["runs"], bw),
                     "measured_step_s": measured, "accounted_bytes": plan.total, "peak_device_bytes": peak_device_bytes(),
                     "hi_hit_rate": g.stats["hi_hit_rate"]})
        del eng
    return {"rows": rows}


def stage_kernels(cfg) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_kernels
    import jax

    args = bench_kernels.parse_args(cfg["kernel_args"])
    shapes = bench_kernels.SMOKE if "--smoke" in cfg["kernel_args"] else bench_kernels.FULL
    for knob in ("reps", "inner", "tokens"):
        if getattr(args, knob) is None:
            setattr(args, knob, shapes[knob])
    rows, bw = bench_kernels.run(shapes, args, jax.devices()[0].platform == "gpu")
    return {"copy_gbs": bw / 1e9, "rows": rows}


IN_PROCESS = {"device": stage_device, "model": stage_model, "kernels": stage_kernels}


# ----------------------------------------------------------------------------- subprocess stages


def stage_script(name, cfg, out: Path) -> list[list[str]]:
    """The command lines of a stage that runs existing benchmarks."""
    py = sys.executable
    if name == "runtime":
        return [[py, str(HERE / "bench_runtime.py"), "--preset", cfg["preset"], "--budget", budget, "--batch-size",
                 str(b), "--prompt-len", str(cfg["prompt"]), "--gen-len", str(cfg["gen"] * 2),
                 "--json", str(out / f"runtime_b{b}.json")]
                for b, budget in ((1, cfg["budget_b1"]), (32, cfg["budget_b32"]))]
    if name == "decode":
        return [[py, str(HERE / "bench.py"), "--preset", cfg["preset"], "--budget", cfg["budget_b32"],
                 "--batch-sizes", "1,32", "--prompt-len", str(cfg["prompt"]), "--gen-len", str(cfg["gen"]),
                 "--repeats", "1", "--routing-skew", "1", "--policies", "static,offload,prefetch,dynaexq,full",
                 "--json", str(out / "decode.json")]]
    raise ValueError(name)


def run_stage(name, cfg, out: Path) -> dict:
    limit = cfg["limits"][name]
    t0 = time.perf_counter()
    if name in IN_PROCESS:
        cmd = [sys.executable, __file__, "--_stage", name, "--out", str(out)] + (["--smoke"] if cfg is SMOKE else [])
        cmds = [cmd]
    else:
        cmds = stage_script(name, cfg, out)
    logs = []
    for cmd in cmds:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1, limit - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            return {"status": f"ran out of its {limit} s", "seconds": time.perf_counter() - t0}
        logs.append(p.stdout[-4000:] + p.stderr[-2000:])
        if p.returncode != 0:
            return {"status": f"failed (exit {p.returncode})", "log": logs[-1], "seconds": time.perf_counter() - t0}
    result = {"status": "ok", "seconds": time.perf_counter() - t0, "log": "\n".join(logs)[-6000:]}
    for f in sorted(out.glob(f"{name}*.json")):
        result[f.stem] = json.loads(f.read_text())
    return result


def markdown(doc: dict) -> str:
    lines = [f"## gpu_check ({doc['date']}, {doc.get('device', {}).get('device', {}).get('device', '?')})", ""]
    lines += ["| stage | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in doc["stages"].items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} | {summary(name, r)} |")
    return "\n".join(lines) + "\n"


def summary(name: str, r: dict) -> str:
    """One cell of figures per stage; the JSON has everything."""
    if r["status"] != "ok":
        return ""
    if name == "device":
        d = r["device"]
        return (f"{d['device']}; h2d pinned {d.get('h2d_pinned_gbs', float('nan')):.1f} GB/s, pageable "
                f"{d['h2d_pageable_gbs']:.1f} GB/s; copy {d['device_copy_gbs']:.0f} GB/s; "
                f"launch {d['launch_s_measured'] * 1e6:.2f} us")
    if name == "model":
        return "; ".join(f"b{m['batch']}: {m['launches']} launches, {m['bytes'] / 1e9:.2f}/{m['min_bytes'] / 1e9:.2f} GB, "
                         f"predicted {m['predicted_step_s'] * 1e3:.2f} ms vs measured {m['measured_step_s'] * 1e3:.2f} ms, "
                         f"peak {m['peak_device_bytes']} of {m['accounted_bytes']} accounted"
                         for m in r["model"]["rows"])
    if name == "runtime":
        return "; ".join(f"{k}: async {v['async']['decode_tokens_per_s']:.0f} vs blocking "
                         f"{v['blocking']['decode_tokens_per_s']:.0f} tok/s, in-flight step ratio "
                         f"{v['async']['ratio'] if v['async']['ratio'] is not None else float('nan'):.2f}"
                         for k, v in r.items() if k.startswith("runtime_"))
    if name == "decode":
        return "; ".join(f"{x['policy']} b{x['batch_size']}: {x['decode_tokens_per_s']:.0f} tok/s"
                         for x in r.get("decode", {}).get("results", []) if x.get("decode_tokens_per_s"))
    if name == "kernels":
        return f"{len(r['kernels']['rows'])} kernel rows, copy {r['kernels']['copy_gbs']:.0f} GB/s"
    return ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_stage" in argv:  # a stage in a process of its own
        i = argv.index("--_stage")
        name = argv.pop(i + 1)
        argv.pop(i)
        args = parse_args(argv)
        cfg = SMOKE if args.smoke else GPU
        result = IN_PROCESS[name](cfg)
        (Path(args.out) / f"{name}.json").write_text(json.dumps(result, default=str))
        return 0
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    doc = {"date": time.strftime("%Y-%m-%d"), "config": {k: v for k, v in cfg.items() if k != "limits"}, "stages": {}}
    for name in stages:
        doc["stages"][name] = run_stage(name, cfg, out)
        print(f"{name}: {doc['stages'][name]['status']} ({doc['stages'][name]['seconds']:.0f} s)", file=sys.stderr)
    doc["device"] = doc["stages"].get("device", {})
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0 if all(r["status"] == "ok" for r in doc["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
