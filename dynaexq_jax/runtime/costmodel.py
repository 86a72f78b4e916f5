"""A bandwidth cost model of one decode step, to compare with measurements and to project.

Decode is memory-bound: a step reads the non-expert weights, the KV cache and the weights of
every expert some token routes to, and a policy may also move experts host -> device. The
model predicts

    step_s = read_bytes / hbm_bw + blocking_h2d_bytes / h2d_bw     (offload: copies block)
    step_s = max(read_bytes / hbm_bw, h2d_bytes / h2d_bw)          (dynaexq, prefetch: overlap)

with the expected number of distinct experts a layer touches under uniform routing,
E * (1 - (1 - k/E) ** B); skewed routing touches fewer, so the model overestimates there.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# Spec-sheet figures (HBM/GDDR bandwidth, practical host->device over PCIe) for projection.
KNOWN_DEVICES = {
    "H100-SXM": (3.35e12, 50e9),
    "H200": (4.8e12, 50e9),
    "A6000": (768e9, 22e9),
    "RTX-5090": (1.79e12, 50e9),
}

OVERLAPPED = {"dynaexq", "prefetch", "full", "static"}


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    hbm: float  # bytes/s, device-to-device copy
    h2d: float  # bytes/s, host -> device (pinned where available)


def measure_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> Bandwidth:
    """Median device copy and host->device rates, measured on the default device."""
    dev = jax.devices()[0]
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)
    copy(x).block_until_ready()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        t.append(time.perf_counter() - t0)
    hbm = 2 * nbytes / float(np.median(t))  # read + write
    from dynaexq_jax.experts.swap import host_memory_kind, stage

    host = np.zeros((nbytes // 4,), np.float32)
    kind = host_memory_kind(dev)
    if kind:
        host = jax.device_put(host, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stage(host, dev).block_until_ready()
        t.append(time.perf_counter() - t0)
    return Bandwidth(hbm=hbm, h2d=nbytes / float(np.median(t)))


def best_seconds(fn, n: int = 5) -> float:
    """The fastest of `n` calls of `fn` (after one to compile and warm), to its result's readiness."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def call_seconds(fn, *args, reps: int, inner: int) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls of `fn(*args)` (after
    one to compile and warm): a kernel's time with the host's dispatch overlapped, as in a step."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int, reps: int, inner: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (a read and a write of `nbytes`)."""
    a = jnp.zeros((nbytes,), jnp.uint8)
    return 2 * nbytes / call_seconds(jax.jit(lambda v: v + jnp.uint8(1)), a, reps=reps, inner=inner)


def host_to_device_gbs(nbytes: int) -> dict:
    """GB/s of `nbytes` from pageable host memory to the default device, and from pinned host
    memory where the device has it (best of three each)."""
    from dynaexq_jax.experts.swap import host_memory_kind

    dev = jax.devices()[0]
    host = np.ones(nbytes // 4, np.float32)
    out = {"h2d_pageable_gbs": host.nbytes / best_seconds(lambda: jax.device_put(host, dev), 3) / 1e9}
    kind = host_memory_kind(dev)
    if kind:
        pinned = jax.device_put(host, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
        to_dev = jax.sharding.SingleDeviceSharding(dev)
        out["h2d_pinned_gbs"] = host.nbytes / best_seconds(lambda: jax.device_put(pinned, to_dev), 3) / 1e9
    return out


def hbm_gbs(nbytes: int) -> dict:
    """The bandwidth the default device reaches over an `nbytes` bf16 array: read and written
    once (a scaling), read once (a float32 sum), and the better of the two."""
    x = jnp.ones((nbytes // 8192, 4096), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 2)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    copy_gbs = 2 * x.nbytes / best_seconds(lambda: copy(x)) / 1e9
    read_gbs = x.nbytes / best_seconds(lambda: total(x)) / 1e9
    return {"copy_gbs": copy_gbs, "read_gbs": read_gbs, "bandwidth_gbs": max(copy_gbs, read_gbs)}


def kernel_seconds(n: int, command_buffers: bool) -> float:
    """Seconds per kernel of `n` dependent one-block Pallas kernels (they never fuse), compiled
    with XLA's command buffers (one CUDA graph) or without (each launched by the host)."""
    from jax.experimental import pallas as pl

    interpret = jax.devices()[0].platform != "gpu"

    def bump(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    one = pl.pallas_call(bump, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=interpret)

    def chain(x):
        for _ in range(n):
            x = one(x)
        return x

    x = jnp.zeros((8, 128), jnp.float32)
    options = {} if command_buffers else {"xla_gpu_enable_command_buffer": ""}
    compiled = jax.jit(chain).lower(x).compile(options)
    return best_seconds(lambda: compiled(x)) / n


def distinct_experts(num_experts: int, k: int, tokens: int) -> float:
    """Expected experts a layer touches for `tokens` tokens under uniform top-k routing."""
    return num_experts * (1 - (1 - k / num_experts) ** tokens)


@dataclasses.dataclass(frozen=True)
class StepCost:
    read_bytes: float
    h2d_bytes: float
    seconds: float


def decode_step_cost(
    policy: str,
    *,
    cfg,
    batch: int,
    weights_bytes: int,
    kv_bytes: int,
    hi_expert_bytes: int,
    lo_expert_bytes: int,
    hi_hit_rate: float,
    h2d_bytes_per_step: float,
    bw: Bandwidth,
) -> StepCost:
    touched = len(cfg.moe_layers) * distinct_experts(cfg.num_experts, cfg.experts_per_token, batch)
    per_expert = hi_hit_rate * hi_expert_bytes + (1 - hi_hit_rate) * lo_expert_bytes
    read = weights_bytes + kv_bytes + touched * per_expert
    return StepCost(read, h2d_bytes_per_step, step_seconds(policy, read, h2d_bytes_per_step, bw))


def step_seconds(policy: str, read_bytes: float, h2d_bytes: float, bw: Bandwidth) -> float:
    if policy in OVERLAPPED:
        return max(read_bytes / bw.hbm, h2d_bytes / bw.h2d)
    return read_bytes / bw.hbm + h2d_bytes / bw.h2d


def project(policy: str, cost: StepCost) -> dict[str, float]:
    """Predicted seconds per decode step of the same bytes on each of KNOWN_DEVICES."""
    return {
        name: step_seconds(policy, cost.read_bytes, cost.h2d_bytes, Bandwidth(hbm, h2d))
        for name, (hbm, h2d) in KNOWN_DEVICES.items()
    }
