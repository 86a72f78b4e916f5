"""/metrics: the scheduler's and the policy's counters in Prometheus' text format."""

from __future__ import annotations

import os
import time

import jax

from dynaexq_jax.runtime.scheduler import Histogram, Scheduler


def _line(name: str, value, labels: str = "") -> str:
    return f"{name}{labels} {value}"


def _metric(out: list, name: str, kind: str, text: str, *samples) -> None:
    out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"] + [_line(name, v, lab) for lab, v in samples]


def _histogram(out: list, name: str, text: str, h: Histogram) -> None:
    out += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
    out += [_line(f"{name}_bucket", n, f'{{le="{b}"}}') for b, n in zip(h.buckets, h.counts)]
    out += [_line(f"{name}_bucket", h.count, '{le="+Inf"}'), _line(f"{name}_sum", h.sum),
            _line(f"{name}_count", h.count)]


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def device_bytes_in_use() -> int | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    return sum(s["bytes_in_use"] for s in stats) if all(s and "bytes_in_use" in s for s in stats) else None


def render(sch: Scheduler, rejected: dict) -> str:
    c = sch.counters
    out: list[str] = []
    p = "dynaexq_"
    _metric(out, p + "requests_total", "counter", "Requests accepted into the queue.", ("", c.requests))
    _metric(out, p + "requests_finished_total", "counter", "Requests ended, by reason.",
            *((f'{{reason="{r}"}}', n) for r, n in sorted(c.finished.items())))
    _metric(out, p + "requests_rejected_total", "counter", "Requests refused before queueing, by reason.",
            *((f'{{reason="{r}"}}', n) for r, n in sorted(rejected.items())))
    _metric(out, p + "queue_depth", "gauge", "Requests waiting for a sequence slot.", ("", sch.queued))
    _metric(out, p + "running_sequences", "gauge", "Sequence slots in use (prefilling or generating).",
            ("", sch.running))
    _metric(out, p + "max_batch", "gauge", "Sequence slots.", ("", sch.max_batch))
    _metric(out, p + "prompt_tokens_total", "counter", "Prompt tokens prefilled.", ("", c.prompt_tokens))
    _metric(out, p + "generation_tokens_total", "counter", "Tokens generated.", ("", c.generated_tokens))
    _metric(out, p + "generation_tokens_per_second", "gauge", "Tokens generated per second over the last "
            f"{c.window_s:.0f} s.", ("", f"{c.tokens_per_s(time.perf_counter()):.3f}"))
    _metric(out, p + "decode_steps_total", "counter", "Decode steps run.", ("", c.decode_steps))
    _metric(out, p + "decode_steps_shared_total", "counter", "Decode steps that advanced more than one sequence.",
            ("", c.shared_decode_steps))
    _metric(out, p + "decode_sequence_steps_total", "counter", "Sequences advanced, summed over decode steps "
            "(divided by decode_steps_total: the mean batch).", ("", c.decode_rows))
    _metric(out, p + "prefill_chunks_total", "counter", "Prompt chunks prefilled.", ("", c.prefill_chunks))
    _histogram(out, p + "time_to_first_token_seconds", "From queueing to the first token.", c.ttft_s)
    _histogram(out, p + "time_per_output_token_seconds", "A finished request's mean time per token after its first.",
               c.token_s)
    _metric(out, p + "compiled_steps", "gauge", "Steps compiled so far (flat once warmed up: joining and leaving "
            "compile nothing).", ("", sch.compiled_steps))
    rss = resident_bytes()
    if rss is not None:
        _metric(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", ("", rss))
    device = device_bytes_in_use()
    if device is not None:
        _metric(out, p + "device_memory_bytes_in_use", "gauge", "Device memory in use, all local devices (the "
                "allocator's count; absent where the backend keeps none, as on a CPU).", ("", device))
    stats = sch.routing_now()
    pairs = int(stats.counts.sum())
    _metric(out, p + "hi_precision_hit_ratio", "gauge", "Share of routed expert pairs served by a high-precision "
            "tier, all traffic.", ("", f"{int(stats.hi_pairs) / pairs:.6f}" if pairs else "NaN"))
    policy = sch.engine.policy.stats()
    for key, kind, text in (("promotions", "counter", "Experts promoted to a high-precision slot."),
                            ("demotions", "counter", "Experts demoted to their fallback."),
                            ("h2d_bytes", "counter", "Bytes copied host to device by the policy.")):
        _metric(out, p + key + "_total", kind, text, ("", policy.get(key, 0)))
    return "\n".join(out) + "\n"
