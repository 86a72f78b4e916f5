"""Where the time to the first token goes: one engine started and asked for one token, phase by
phase (what `scripts/bench_startup.py` runs in a fresh process per measurement).

Phases, in the order a start goes through them:

    read      config, non-expert weights onto the device, the experts mapped (a checkpoint) or
              their generator set up (a preset)
    tiers     auto tiers only: the experts' quantization errors (a sampled pass, or the cache)
              and the choice
    convert   the one conversion pass (or mapping its results back from the cache)
    build     the rest of the engine: the host bank (a mapping), the slot pool, the policy
    fill      the slots' warm start (dynaexq)
    compile   what the first request still waited for compiles (they started from shapes
              during `convert`; `compile_ahead` is their own time, overlapped)
    first     the first request's prefill and its first token
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dynaexq_jax.io import loader, preset
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.build import auto_tiers, build_engine
from dynaexq_jax.runtime.engine import Request

PHASES = ("read", "tiers", "convert", "build", "fill", "compile", "first")
AUTO = DynaExqOptions(lo_bits="auto", hi_dtype="auto")  # the command line's default tiers


def measure(source: str, policy: str, budget: int | None, *, dtype: str = "bfloat16", prompt_len: int = 32,
            max_new_tokens: int = 16, routing_skew: float = 1.0, opts: DynaExqOptions = AUTO,
            started: float | None = None) -> dict:
    """Start an engine for `policy` on `source` (a checkpoint folder, or a preset name) and
    generate one token; -> {phase: seconds}, with `total` (from `started`, a `perf_counter`
    taken when the process began, or from this call) and the bytes read and converted."""
    t0 = time.perf_counter()
    started = t0 if started is None else started
    marks = {}

    def mark(name):
        marks[name] = time.perf_counter()

    if Path(source).is_dir():
        ckpt = loader.load(source, jnp.dtype(dtype))
    else:
        ckpt = preset.random_checkpoint(preset.preset_config(source), jnp.dtype(dtype), routing_skew=routing_skew)
    jax.block_until_ready(ckpt.params)
    mark("read")
    shape = dict(batch=1, longest_prompt=prompt_len, max_new_tokens=max_new_tokens)
    if policy == "dynaexq":
        opts, _ = auto_tiers(ckpt, opts, budget=budget, **shape)
    mark("tiers")
    eng, plan = build_engine(ckpt, policy, budget=budget, opts=opts, request=Request(1, prompt_len, max_new_tokens),
                             **shape)
    mark("built")
    stats = eng.policy.stats()
    gen = eng.generate([[(7 * i + 3) % ckpt.config.vocab_size for i in range(prompt_len)]], 1)
    mark("first")
    convert = stats.get("convert_s", 0.0)
    fill, compile_wait = gen.stats.get("fill_s", 0.0), eng.compile_s
    out = {
        "read": marks["read"] - t0,
        "tiers": marks["tiers"] - marks["read"],
        "convert": convert,
        "build": marks["built"] - marks["tiers"] - convert,
        "fill": fill,
        "compile": compile_wait,
        "first": marks["first"] - marks["built"] - fill - compile_wait,
        "startup_to_call": t0 - started,  # the interpreter and imports, before this call
    }
    out["total"] = marks["first"] - started
    H, I, E = ckpt.config.hidden_size, ckpt.config.moe_intermediate_size, ckpt.config.num_experts
    expert_bytes = len(ckpt.config.moe_layers) * E * 3 * H * I * ckpt.dtype.itemsize
    ahead = getattr(eng, "_ahead", None)
    out.update(
        policy=policy, source=source, budget=budget, slots=plan.slots, lo_bits=plan.lo_bits,
        expert_bytes=expert_bytes, checkpoint_bytes_read=ckpt.bytes_read,
        compile_ahead=ahead.seconds if ahead is not None else 0.0,
        converted_gbs=expert_bytes / convert / 1e9 if convert > 0 else None,
        host_bank=stats.get("host_bank"), tokens=gen.tokens[0],
    )
    return out


__all__ = ["PHASES", "measure"]
