"""Residency policies measured side by side: which of them a budget holds, one (policy, batch)
row of decode rates, bytes and memory, and the reference logits every row's quality is held to.

The rows are what `scripts/bench.py` prints and writes; `min_decode_bytes` is what a decode
step must read at least (`runtime.aot.traffic_and_min`), `min_bytes_gbs` that figure over the
measured time per step: the rate the step reached on its unavoidable bytes.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.eval import big_little
from dynaexq_jax.runtime import aot, costmodel
from dynaexq_jax.runtime import mesh as mesh_lib
from dynaexq_jax.runtime.build import plan_for
from dynaexq_jax.runtime.engine import free_device_bytes


def variant(name: str, opts):
    """A --policies entry -> (policy, its options): "dynaexq/int8" is dynaexq with int8 slots."""
    policy, _, hi = name.partition("/")
    return policy, dataclasses.replace(opts, hi_dtype=hi) if hi else opts


def fitting_plans(cfg, names, budget, *, batch, longest_prompt, max_new_tokens, itemsize, opts, floe,
                  devices=1) -> dict:
    """The memory plan of every policy the budget holds, from the config alone (before any
    weight is made or read); a budget none of them fits is an error."""
    plans = {}
    for name in names:
        policy, o = variant(name, opts)
        try:
            plans[name] = plan_for(cfg, policy, budget=budget, batch=batch, longest_prompt=longest_prompt,
                                   max_new_tokens=max_new_tokens, dtype_itemsize=itemsize, opts=o, floe=floe,
                                   devices=devices)
        except UserError as e:
            print(f"{name}: skipped ({e})", file=sys.stderr)
    if not plans and budget is None:
        raise UserError(f"none of --policies {','.join(names)} can run this model (each one's reason is above)")
    if not plans:
        raise UserError(f"budget {budget_lib.format_size(budget)} fits none of --policies {','.join(names)} "
                        "(each one's minimum is above); pass a larger --budget")
    return plans


def measure(eng, plan, policy: str, popts, *, cfg, prompts, gen_len: int, repeats: int, longest_batch: int,
            bw, itemsize: int, quality=None, on_tokens=None) -> tuple[dict, costmodel.StepCost]:
    """One row: a warm-up generation of `prompts` (compilation, residency warm-up) left out,
    then the medians of `repeats`; with the cost model's step for the measured hit rate and
    host->device bytes. `quality`: the sequences a mesh's load report routes."""
    B, steps, prompt_len = len(prompts), gen_len - 1, len(prompts[0])
    eng.generate(prompts, gen_len, eos_token_ids=(), on_tokens=on_tokens)
    gens = [eng.generate(prompts, gen_len, eos_token_ids=(), on_tokens=on_tokens) for _ in range(repeats)]
    runs = [g.stats for g in gens]

    def med(k):
        return statistics.median(r[k] for r in runs) if runs[0].get(k) is not None else None

    h2d = med("h2d_bytes")
    lo_bytes = plan.fallback // max(plan.num_experts_total, 1) if plan.fallback else plan.slot_bytes
    cost = costmodel.decode_step_cost(
        policy, cfg=cfg, batch=B, weights_bytes=plan.weights, kv_bytes=plan.kv_cache * B // longest_batch,
        hi_expert_bytes=plan.slot_bytes, lo_expert_bytes=lo_bytes, hi_hit_rate=med("hi_hit_rate") or 0.0,
        h2d_bytes_per_step=(h2d or 0) / steps, bw=bw,
    )
    tpot = med("decode_s") / steps
    min_bytes = aot.decode_min_bytes(cfg, policy, plan, batch=B, prompt_len=prompt_len, gen_len=gen_len,
                                     itemsize=itemsize, hi_dtype=popts.hi_dtype, group_size=popts.group_size)
    row = {
        "batch_size": B,
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "prefill_tokens_per_s": med("prefill_tokens_per_s"),
        "ttft_s": med("prefill_s"),
        "tpot_s": tpot,
        "min_decode_bytes": min_bytes,
        "min_bytes_gbs": min_bytes / tpot / 1e9,
        "h2d_bytes_per_token": (h2d or 0) / (B * gen_len),
        # Decode steps alone (layerwise policies: offload, prefetch, floe), prefill's bytes apart.
        "h2d_decode_bytes_per_token": None if med("h2d_prefill_bytes") is None
        else (h2d - med("h2d_prefill_bytes")) / (B * steps),
        "stream_gbps": med("stream_gbps"),
        "transfer_wait_s": med("transfer_wait_s"),
        "peak_device_bytes": runs[-1]["peak_device_bytes"],
        "accounted_device_bytes": plan.total,
        "hi_hit_rate": med("hi_hit_rate"),
        "predicted_tpot_s": cost.seconds,
        "kl_vs_full": None, "top1_agreement": None,
        **big_little.little_columns(runs),
        **(mesh_lib.load_report(eng, gens[-1], plan, quality) if quality is not None else {}),
    }
    return row, cost


def reference_logits(cfg, reference: str, build, quality, *, itemsize: int, opts, shape: dict):
    """The next-token logits of `reference` ("full": every expert dense; "static8": every expert
    at int8) on `quality`, from an engine `build(policy, budget, opts)` makes on one device
    outside any budget; None, saying why, when the device cannot hold it."""
    o = opts if reference == "full" else dataclasses.replace(opts, lo_bits=8)
    policy = "full" if reference == "full" else "static"
    try:
        need = plan_for(cfg, policy, budget=None, dtype_itemsize=itemsize, opts=o, **shape).total
        free = free_device_bytes()
        if free is not None and need > free:  # e.g. a 7B preset on a CPU: the host bank shares its memory
            raise UserError(f"it needs {budget_lib.format_size(need)} and the device has "
                            f"{budget_lib.format_size(free)} free; try --reference static8")
        eng, _ = build(policy, None, o)
        return eng.logits(quality)
    except UserError as e:
        print(f"reference {reference} skipped ({e})", file=sys.stderr)
        return None
