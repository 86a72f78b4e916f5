"""A run's figures: its stats as one dict (what --json prints), and the lines a command
prints about them (the closing summary, the timings before the first token)."""

from __future__ import annotations

from dynaexq_jax.budget import format_size
from dynaexq_jax.launch.options import EngineOptions


def runtime_info() -> dict:
    """Where the run computes: JAX's backend, the device's kind, and the compilation cache in use."""
    import jax

    from dynaexq_jax.runtime import compile_cache

    cache = compile_cache.active_dir()
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "compile_cache": None if cache is None else str(cache)}


def run_stats(opts: EngineOptions, gen_stats: dict, plan, budget_bytes: int | None, load_s: float) -> dict:
    """A generation's stats with the run's setting, plan and machine. `load_s`: loading and
    building the engine; the quantization inside it is reported as convert_s (the policy's),
    the rest as load_s."""
    stats = dict(gen_stats, budget_bytes=budget_bytes, model=str(opts.model.model), dtype=opts.model.dtype,
                 policy=opts.policy.policy)
    stats["load_s"] = load_s - stats["convert_s"]
    stats["accounted_device_bytes"] = plan.total
    stats["memory_plan"] = plan.as_dict()
    stats.update(runtime_info())
    return stats


def summary_line(stats: dict) -> str:
    """The closing line: throughput, memory, cache behaviour; every figure is in `stats`."""

    def rate(x):
        return "n/a" if x is None else f"{x:.1f}"

    peak, budget = stats["peak_device_bytes"], stats["budget_bytes"]
    memory = (f"peak {format_size(peak)}" if peak is not None
              else f"accounted {format_size(stats['accounted_device_bytes'])} (no allocator peak on this backend)")
    if budget is not None:
        memory += f" of {format_size(budget)} budget"
    hit = stats["hi_hit_rate"]
    parts = [
        f"prompt {stats['prompt_tokens']} tok, {rate(stats['prefill_tokens_per_s'])} tok/s",
        f"generated {stats['generated_tokens']} tok, {rate(stats['decode_tokens_per_s'])} tok/s",
        memory,
        f"hi-precision hits {'n/a' if hit is None else f'{hit:.1%}'}",
        f"host->device {stats['h2d_bytes'] / 1e9:.3f} GB",
    ]
    if "checkpoint_bytes_read" in stats:
        parts.append(f"read {format_size(stats['checkpoint_bytes_read'])} of the checkpoint")
    bl = stats.get("big_little")
    if bl and bl["little_share"] is not None:
        parts.append(f"little {bl['little_share']:.1%} of token-layers, {bl['pairs_saved']} pairs "
                     f"({bl['bytes_saved'] / 1e9:.3f} GB of expert reads) saved, {bl['fallbacks']} fallbacks")
    return " | ".join(parts)


def timings_line(stats: dict) -> str:
    """Where the time before the first token went (--verbose)."""
    return ("load {load_s:.2f} s | convert {convert_s:.2f} s | fill {fill_s:.2f} s | compile {compile_s:.2f} s"
            .format(**stats))
