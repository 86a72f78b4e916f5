"""From a loaded checkpoint, a policy name and a budget to a running engine and its plan."""

from __future__ import annotations

import dataclasses

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.policies import POLICIES, build_policy
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime.engine import Engine, cache_bucket, prompt_bucket
from dynaexq_jax.runtime.layerwise import LayerwiseEngine


def plan_for(cfg, policy: str, *, budget: int | None, batch: int, longest_prompt: int, max_new_tokens: int,
             dtype_itemsize: int, opts: DynaExqOptions = DynaExqOptions()) -> budget_lib.MemoryPlan:
    """The memory plan `build_engine` makes, from the config alone (a dry run, or the check
    before any weight is read)."""
    if policy not in POLICIES:
        raise budget_lib.BudgetError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    prompt = prompt_bucket(longest_prompt)
    return budget_lib.policy_plan(
        cfg, policy, budget=budget, batch=batch, prompt=prompt, context=cache_bucket(prompt + max_new_tokens),
        dtype_itemsize=dtype_itemsize, lo_bits=opts.lo_bits, hi_dtype=opts.hi_dtype,
        group_size=budget_lib.expert_group_size(cfg, opts.group_size),
    )


def build_engine(
    ckpt,
    policy: str,
    *,
    budget: int | None,
    batch: int,
    longest_prompt: int,
    max_new_tokens: int,
    opts: DynaExqOptions = DynaExqOptions(),
    hotness_profile: str | None = None,
    transfer=None,
    progress: bool = False,
    big_little: BigLittle | None = None,
):
    """An engine for `policy` sized for `batch` prompts of up to `longest_prompt` tokens plus
    `max_new_tokens`, routing big-little if `big_little` is given. Returns (engine, memory plan); the plan's `total` is the accounted
    device bytes."""
    cfg = ckpt.config
    plan = plan_for(cfg, policy, budget=budget, batch=batch, longest_prompt=longest_prompt,
                    max_new_tokens=max_new_tokens, dtype_itemsize=ckpt.dtype.itemsize, opts=opts)
    opts = dataclasses.replace(opts, group_size=budget_lib.expert_group_size(cfg, opts.group_size))
    pol = build_policy(policy, ckpt, plan, opts, batch=batch, hotness_profile=hotness_profile, transfer=transfer,
                       progress=progress)
    engine = (LayerwiseEngine if pol.layerwise else Engine)(ckpt, pol, big_little)
    return engine, plan


__all__ = ["DynaExqOptions", "build_engine", "plan_for"]
