"""From options to a running engine: the model's config and tokenizer, the checks that need
them, and the engine itself (load, auto tiers, placement, `runtime.build.build_engine`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple

from dynaexq_jax.launch.flags import FlagError
from dynaexq_jax.launch.options import EngineOptions, ModelOptions, PolicyOptions
from dynaexq_jax.launch.plan import memory_plan


def read_model(model: ModelOptions):
    """(checkpoint directory, its `ModelConfig`, its tokenizer), before any weight is read."""
    from dynaexq_jax.io import loader
    from dynaexq_jax.models import registry

    path = Path(model.model)
    if not path.is_dir():
        raise loader.CheckpointError(f"model directory {path} does not exist; pass --model DIR of a Hugging Face "
                                     "checkpoint")
    cfg = registry.read_config(path)
    tok = loader.load_tokenizer(path)
    if tok is None:
        raise loader.CheckpointError(f"{path} has no tokenizer.json, so text prompts cannot be encoded")
    return path, cfg, tok


def check_hotness(policy: PolicyOptions, cfg) -> None:
    """A --hotness profile is read in full before any weight is: missing, corrupt, empty or
    another model's is an error now, not after the first runs."""
    from dynaexq_jax.policies.hotness import HotnessTracker

    if policy.hotness:
        if not Path(policy.hotness).exists():  # a folder or unreadable file: the reader says which
            raise FlagError(f"--hotness {policy.hotness} does not exist; record one with --save-hotness or "
                            "scripts/build_tasks.py")
        HotnessTracker.load(policy.hotness, expect_shape=(len(cfg.moe_layers), cfg.num_experts))


def check_vocab(ids: list[list[int]], cfg, model: Path) -> None:
    """Token ids past the embedding table would be read as NaN: the tokenizer is not the model's."""
    worst = max(max(i) for i in ids)
    if worst >= cfg.vocab_size:
        raise FlagError(f"{model / 'tokenizer.json'} gives token id {worst}, but config.json's vocab_size is "
                        f"{cfg.vocab_size}; the tokenizer does not belong to this model, restore the model's own")


def check_slots_for_hotness(opts: EngineOptions, plan) -> None:
    if opts.policy.save_hotness and plan.slots == 0:  # dynaexq without slots runs static: it learns no hotness
        raise FlagError("--save-hotness: the budget leaves no high-precision slot, so no hotness is learned; "
                        "raise --budget or drop --save-hotness")


class Loaded(NamedTuple):
    engine: object  # `Engine`, `LayerwiseEngine` or `MeshEngine`
    plan: object  # its `MemoryPlan`
    checkpoint: object  # the engine's (on a mesh the replicated copy; the loaded one is freed)
    load_s: float  # loading and building, the policy's conversion included


def load_engine(opts: EngineOptions, budget_bytes: int | None, cfg, shape, *, progress: bool = False,
                log: Callable[[str], None] | None = None, request=None) -> Loaded:
    """Load, convert and place the model for `shape` (`plan.plan_shape`). Everything that can be
    refused from the config alone is refused before any weight is read. `log` (e.g. --verbose)
    gets the plan as the run will make it, the auto tiers' choice, and where the run computes.
    `request` (a `runtime.engine.Request`): its steps compile while the experts convert."""
    import jax.numpy as jnp

    from dynaexq_jax.io import loader
    from dynaexq_jax.launch.report import runtime_info
    from dynaexq_jax.runtime import mesh as mesh_lib
    from dynaexq_jax.runtime.build import auto_tiers, build_engine

    bl = opts.big_little.setting(cfg.experts_per_token)  # bad knobs fail before any weight is read
    start, _ = memory_plan(opts, cfg, shape, budget_bytes)  # refuses a budget before any weight is read
    devices = opts.mesh.size()
    mesh = None if devices is None else mesh_lib.expert_mesh(devices)
    placement = None
    if opts.mesh.placement == "balanced":
        from dynaexq_jax.policies.hotness import HotnessTracker

        load = HotnessTracker.load(opts.policy.hotness, expect_shape=(len(cfg.moe_layers), cfg.num_experts)).scores
        placement = mesh_lib.Placement.balanced(load, devices)
    elif mesh is not None:
        placement = mesh_lib.Placement.contiguous(len(cfg.moe_layers), cfg.num_experts, devices)
    tiers = opts.policy.dynaexq()
    auto = opts.policy.policy == "dynaexq" and "auto" in (tiers.lo_bits, tiers.hi_dtype) and mesh is None
    if not auto:  # explicit tiers: the run's plan is this one
        check_slots_for_hotness(opts, start)
    t0 = time.perf_counter()
    ckpt = loader.load(opts.model.model, jnp.dtype(opts.model.dtype), progress=progress)  # experts read as used
    batch, longest, new = shape
    choice = None
    if auto:  # auto tiers need the experts' errors, so they are picked once the weights are in
        tiers, choice = auto_tiers(ckpt, tiers, budget=budget_bytes, batch=batch, longest_prompt=longest,
                                   max_new_tokens=new, hotness_profile=opts.policy.hotness)
    plan, text = memory_plan(opts, cfg, shape, budget_bytes, tiers)
    check_slots_for_hotness(opts, plan)
    if log is not None:
        log(text)
        if choice is not None:
            log(choice.describe())
        info = runtime_info()
        log(f"backend {info['backend']}, device {info['device']}, compile cache {info['compile_cache'] or 'off'}")
    eng, plan = build_engine(
        ckpt, opts.policy.policy, budget=budget_bytes, batch=batch, longest_prompt=longest, max_new_tokens=new,
        hotness_profile=opts.policy.hotness, opts=tiers, progress=progress,
        big_little=bl, floe=opts.policy.floe(), mesh=mesh, placement=placement, request=request,
    )
    return Loaded(eng, plan, eng.checkpoint, time.perf_counter() - t0)
