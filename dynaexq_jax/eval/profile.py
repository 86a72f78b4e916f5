"""An engine's compiled decode step under `jax.profiler`: the kernels a step runs, each one's
device time per step and the GB/s it reaches (its bytes from `runtime.aot`'s accounting), with
the kernels' sum beside the step's wall time. Profiled twice: as the profiler runs a step by
default (XLA replays its CUDA graphs op by op while it traces) and with the graphs kept
(`xla_enable_command_buffers_during_profiling`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.runtime import aot
from dynaexq_jax.runtime.engine import DecodeState, cache_bucket, compiler_options, prompt_bucket, stop_array

TOP = 12  # kernels listed per profile, the longest first


def profiled_ops(logdir: str | Path) -> dict[str, list[float]]:
    """{op: [seconds of each execution]} from a `jax.profiler` trace in `logdir`: the device's
    XLA ops (or its kernels), or on a CPU the XLA ops its client threads ran."""
    pb = sorted(Path(logdir).rglob("*.xplane.pb"))
    if not pb:
        return {}
    data = jax.profiler.ProfileData.from_file(str(pb[-1]))
    planes = list(data.planes)
    devices = [p for p in planes if p.name.startswith("/device:")]
    ops: dict[str, list[float]] = {}
    for plane in devices or [p for p in planes if p.name == "/host:CPU"]:
        lines = list(plane.lines)
        xla_ops = [ln for ln in lines if ln.name == "XLA Ops"]
        for line in xla_ops or [ln for ln in lines if "XLA" in ln.name or ln.name.startswith("Stream")]:
            for e in line.events:
                if e.name.startswith(("end:", "ThreadpoolListener", "ThunkExecutor", "$")) or e.duration_ns <= 0:
                    continue
                ops.setdefault(e.name, []).append(e.duration_ns * 1e-9)
    return ops


def profile_decode(eng, plan, policy: str, *, prompt: int, gen: int, steps: int) -> list[dict]:
    """The engine's last compiled decode step (a batch-1 greedy request of `prompt` + `gen`
    tokens has run), run `steps` times back to back on its own outputs under the profiler, once
    per mode -> per mode {mode, step_wall_s, kernel_sum_s, ops, top: [{op, calls_per_step,
    s_per_step, gbs}]}."""
    cfg = eng.cfg
    decode = [v for k, v in eng._compiled.items() if k[0] == "decode"][-1]
    traffic, _ = aot.traffic_and_min(cfg, policy, plan, step="decode", batch=1, context=prompt + gen, prompt=prompt,
                                     itemsize=2, hi_dtype="bfloat16", group=budget_lib.expert_group_size(cfg))
    bytes_of = {k.name: aot.kernel_bytes(k, traffic) for k in aot.kernels(decode.as_text())}
    # The step's own arguments as `generate` makes them: one row, the cache length of its bucket, greedy.
    length = cache_bucket(prompt_bucket(prompt) + gen)
    knobs = tuple(jax.device_put(v) for v in (np.float32(0), np.int32(0), np.float32(1))) + (stop_array(set()),)
    state0 = DecodeState(jnp.zeros(1, jnp.int32), jnp.full(1, prompt, jnp.int32), jnp.ones(1, bool),
                         jnp.zeros((), jnp.int32))
    graphs = eng._decode.lower(eng.params, eng.policy.experts, eng._empty_cache(1, length), eng._stats0(), state0,
                               jax.random.key(0), knobs, greedy=True, big_little=None).compile(
        {**compiler_options(), "xla_enable_command_buffers_during_profiling": True})
    out = []
    for mode, step in (("op by op (the profiler's default)", decode), ("command buffers kept", graphs)):
        def run(cache, stats, state, step=step):
            return step(eng.params, eng.policy.experts, cache, stats, state, jax.random.key(0), knobs)

        cache, stats, state = run(eng._empty_cache(1, length), eng._stats0(), state0)
        jax.block_until_ready(state)
        with tempfile.TemporaryDirectory() as logdir:
            with jax.profiler.trace(logdir):
                t0 = time.perf_counter()
                for _ in range(steps):
                    cache, stats, state = run(cache, stats, state)
                jax.block_until_ready(state)
                wall = (time.perf_counter() - t0) / steps
            ops = profiled_ops(logdir)
        per_step = {name: sum(t) / steps for name, t in ops.items()}
        top = sorted(per_step.items(), key=lambda kv: -kv[1])[:TOP]
        out.append(dict(mode=mode, step_wall_s=wall, kernel_sum_s=sum(per_step.values()), ops=len(ops),
                        top=[{"op": name, "calls_per_step": len(ops[name]) / steps, "s_per_step": s,
                              "gbs": bytes_of[name] * len(ops[name]) / steps / s / 1e9
                              if bytes_of.get(name) and s > 0 else None} for name, s in top]))
    return out


__all__ = ["profile_decode", "profiled_ops"]
