"""Does the DynaExq runtime keep its promises? The allocator's peak against the budget, and the
decode step with promotions in flight against without (`scripts/bench_runtime.py`, and
gpu_check's runtime stage).

The preset's router is skewed so a hot set exists, and the hot set moves every `shift_every`
decode steps, so promotions keep flowing. A step counts as "in flight" when at least one
host->device copy was outstanding when it was dispatched. Each run is done twice: asynchronous
promotions, and blocking ones (every promotion lands before the next step) for comparison.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.io import preset
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.build import build_engine, plan_for
from dynaexq_jax.runtime.engine import peak_device_bytes


@dataclasses.dataclass(frozen=True)
class RuntimeBench:
    preset: str
    budget: int  # bytes
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 256
    routing_skew: float = 1.0
    shift_every: int = 32  # decode steps between moves of the hot set (0: never)
    rebalance_every: int = 8
    dtype: str = "bfloat16"

    @property
    def options(self) -> DynaExqOptions:
        return DynaExqOptions(rebalance_every=self.rebalance_every)


def check(bench: RuntimeBench):
    """-> the preset's config, from the preset and the budget alone, before any weight is made: a
    budget too small, or one that leaves no slot to promote into, is refused here."""
    cfg = preset.preset_config(bench.preset)
    plan = plan_for(cfg, "dynaexq", budget=bench.budget, batch=bench.batch, longest_prompt=bench.prompt_len,
                    max_new_tokens=bench.gen_len, dtype_itemsize=jnp.dtype(bench.dtype).itemsize, opts=bench.options)
    if plan.slots == 0:
        raise UserError(f"budget {budget_lib.format_size(bench.budget)} leaves no high-precision slot (the minimum "
                        f"is {budget_lib.format_size(plan.minimum)} plus {budget_lib.format_size(plan.slot_bytes)} "
                        f"per slot); nothing would be promoted, so pass a larger --budget")
    return cfg


def timed_run(eng, prompts, gen_len, shift, shift_every):
    """Per decode step: wall time between consecutive tokens and whether copies were in flight."""
    swapper = eng.policy.swapper
    marks = []  # (time, in flight at dispatch of the next step)

    def on_tokens(_ids):
        marks.append((time.perf_counter(), bool(swapper.inflight)))
        if shift_every and len(marks) % shift_every == 0:
            eng.params = shift.params(eng.params, len(marks) // shift_every)

    gen = eng.generate(prompts, gen_len, eos_token_ids=(), on_tokens=on_tokens)
    steps = [(t1 - t0, fl) for (t0, fl), (t1, _) in zip(marks, marks[1:])]
    return gen, steps


def run(bench: RuntimeBench) -> Iterator[tuple[str, dict]]:
    """("async" | "blocking", its figures), each as measured (after a warm-up run that compiles
    and fills the slots)."""
    cfg = check(bench)
    ckpt = preset.random_checkpoint(cfg, jnp.dtype(bench.dtype), routing_skew=bench.routing_skew)
    shift = preset.RouterShift(ckpt, bench.routing_skew)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (bench.batch, bench.prompt_len)).tolist()
    for variant, blocking in (("async", False), ("blocking", True)):
        eng, plan = build_engine(ckpt, "dynaexq", budget=bench.budget, batch=bench.batch,
                                 longest_prompt=bench.prompt_len, max_new_tokens=bench.gen_len,
                                 opts=dataclasses.replace(bench.options, blocking=blocking))
        timed_run(eng, prompts, bench.gen_len, shift, bench.shift_every)
        gen, steps = timed_run(eng, prompts, bench.gen_len, shift, bench.shift_every)
        busy = [t for t, fl in steps if fl]
        idle = [t for t, fl in steps if not fl]
        med = lambda xs: float(np.median(xs)) if xs else None
        yield variant, {
            "slots": plan.slots,
            "accounted_device_bytes": plan.total,
            "peak_device_bytes": peak_device_bytes(),
            "steps_with_copies_in_flight": len(busy),
            "steps_without": len(idle),
            "median_step_s_in_flight": med(busy),
            "median_step_s_without": med(idle),
            "ratio": med(busy) / med(idle) if busy and idle else None,
            "decode_tokens_per_s": gen.stats["decode_tokens_per_s"],
            "hi_hit_rate": gen.stats["hi_hit_rate"],
            "promotions": gen.stats["promotions"],
            "h2d_bytes": gen.stats["h2d_bytes"],
            "transfer_wait_s": gen.stats["transfer_wait_s"],
        }
        del eng


def line(variant: str, row: dict, budget: int) -> str:
    """One variant's figures as a line of text."""
    peak = row["peak_device_bytes"]
    fmt = budget_lib.format_size
    return (f"{variant:>8}: {row['slots']} slots, accounted {fmt(row['accounted_device_bytes'])} of {fmt(budget)}, "
            f"allocator peak {'n/a (backend reports none)' if peak is None else fmt(peak)}; "
            f"step {row['median_step_s_in_flight'] or float('nan'):.4f} s with copies in flight "
            f"({row['steps_with_copies_in_flight']} steps) vs {row['median_step_s_without'] or float('nan'):.4f} s "
            f"without ({row['steps_without']}); decode {row['decode_tokens_per_s']:.1f} tok/s, "
            f"hit {row['hi_hit_rate']:.1%}")
