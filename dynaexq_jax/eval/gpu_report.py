"""`scripts/gpu_check.py`'s report: its JSON (stages, each part's status, seconds and result
records) as the Markdown tables pasted into docs/PERFORMANCE.md with the device named."""

from __future__ import annotations


def merged(records: list[dict]) -> dict:
    """A part's result records as one dict (a later record's fields over an earlier one's)."""
    out = {}
    for r in records:
        out.update(r)
    return out


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.1f}"


def markdown(doc: dict) -> str:
    dev = merged(doc["stages"].get("device", {}).get("records", []))
    lines = [f"## gpu_check ({doc['date']}, {dev.get('device', '?')}, jax {dev.get('jax', '?')})", ""]
    if dev:
        lines += [f"Device: {dev.get('device')} ({(dev.get('memory_bytes') or 0) / 2**30:.0f} GiB, "
                  f"{dev.get('runtime')}); "
                  f"h2d pinned {dev.get('h2d_pinned_gbs', float('nan')):.1f} GB/s, pageable "
                  f"{dev.get('h2d_pageable_gbs', float('nan')):.1f} GB/s; HBM copy {dev.get('copy_gbs', 0):.0f} GB/s, "
                  f"read {dev.get('read_gbs', 0):.0f} GB/s; a kernel in a chain: "
                  f"{dev.get('graph_kernel_s', 0) * 1e6:.2f} us in a CUDA graph, {dev.get('launch_s', 0) * 1e6:.2f} us "
                  "launched alone.", ""]
    decode = doc["stages"].get("decode", {})
    if decode:
        lines += ["| case | batch | status | build s | warm-up s | decode tok/s | step ms | predicted ms | kernels "
                  "(in graphs / host launches) | bytes / min | peak GB (plan; after build; largest alloc) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in decode.items():
            head = merged([x for x in r["records"] if "batch" not in x])
            rows = [x for x in r["records"] if "batch" in x] or [{}]
            for x in rows:
                pred = x.get("predicted_step_s")
                lines.append(
                    f"| {name} | {x.get('batch', '')} | {r['status']} | {head.get('build_s', float('nan')):.0f} | "
                    f"{x.get('warmup_s', float('nan')):.0f} | {x.get('decode_tokens_per_s', float('nan')):.1f} | "
                    f"{x.get('step_s', float('nan')) * 1e3:.2f} | {'-' if pred is None else f'{pred * 1e3:.2f}'} | "
                    + (f"{x['launches']} ({x['in_graphs']} / {x['host_launches']}) | "
                       f"{x['bytes'] / 1e9:.2f} / {x['min_bytes'] / 1e9:.2f} GB | " if "launches" in x else "- | - | ")
                    + f"{(x.get('peak_device_bytes') or 0) / 1e9:.1f} ({_gb(head.get('accounted_bytes'))}; "
                    f"{_gb(head.get('after_build', {}).get('peak_bytes_in_use'))}; "
                    f"{_gb(x.get('after_generate', {}).get('largest_alloc_size'))}) |")
        lines.append("")
    profiles = [(stage, x) for stage in ("profile", "fused-profile")
                for x in doc["stages"].get(stage, {}).get("records", []) if "mode" in x]
    for stage, x in profiles:
        what = "Profile of the fused layer" if stage == "fused-profile" else "Profile"
        lines += [f"{what} ({x['mode']}): kernels {x['kernel_sum_s'] * 1e3:.2f} ms of a "
                  f"{x['step_wall_s'] * 1e3:.2f} ms step ({x['ops']} ops)", "",
                  "| op | calls/step | ms/step | GB/s |", "|---|---|---|---|"]
        for t in x["top"]:
            gbs = "-" if t["gbs"] is None else f"{t['gbs']:.0f}"
            lines.append(f"| {t['op']} | {t['calls_per_step']:.0f} | {t['s_per_step'] * 1e3:.3f} | {gbs} |")
        lines.append("")
    layer = doc["stages"].get("layer-kernels", {}).get("records", [])
    rows = [x["row"] for x in layer if "row" in x]
    if rows:
        lines += [f"The fused layer's kernels one by one (copy bandwidth {merged(layer)['copy_gbs']:.0f} GB/s):", "",
                  "| batch | kernel | programs | us | MB | GB/s | % copy | rel err |", "|---" * 8 + "|"]
        for r in rows:
            cells = [f"{r[k]:{f}}" if r.get(k) is not None else "-"
                     for k, f in (("us", ".1f"), ("mb", ".2f"), ("gbs", ".0f"), ("pct", ".0f"), ("err", ".1e"))]
            if "error" in r:
                cells[0] = f"failed: {r['error']}"
            lines.append(f"| {r['batch']} | {r['kernel']} | {r['programs']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    for name, r in doc["stages"].items():
        if name == "decode":
            for case, c in r.items():
                lines.append(f"| decode: {case} | {c['status']} | {c['seconds']:.0f} |")
        else:
            lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


__all__ = ["markdown", "merged"]
