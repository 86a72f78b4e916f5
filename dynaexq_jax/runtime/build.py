"""From a loaded checkpoint, a policy name and a budget to a running engine and its plan."""

from __future__ import annotations

import dataclasses

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.io import store
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.policies import POLICIES, autotier, build_policy
from dynaexq_jax.policies.dynaexq import DynaExqOptions, warm_tracker
from dynaexq_jax.policies.floe import FloeOptions
from dynaexq_jax.policies.tiers import abstract_state, quant_errors
from dynaexq_jax.runtime import mesh as mesh_lib
from dynaexq_jax.runtime.engine import Ahead, Engine, Request, cache_bucket, prompt_bucket
from dynaexq_jax.runtime.layerwise import LayerwiseEngine

MESH_HINTS = (2, 4, 8)  # mesh sizes a refusal on one device names, where they would fit


def mesh_hint(cfg, policy: str, opts: DynaExqOptions, **shape) -> str:
    """"; on --mesh expert=N each device needs ..." for the mesh sizes whose per-device plan
    (the mesh's own tiers: "auto" is int4 fallbacks, bf16 slots) fits `shape`'s budget, or ""."""
    if policy not in mesh_lib.MESH_POLICIES or shape["budget"] is None:
        return ""
    fixed = fixed_tiers(opts)
    fits = []
    for n in (n for n in MESH_HINTS if cfg.num_experts % n == 0):
        try:
            plan = plan_for(cfg, policy, opts=fixed, devices=n, **shape)
        except UserError:
            continue
        fits.append(f"{budget_lib.format_size(plan.total if policy == 'full' else plan.minimum)} on --mesh expert={n}")
    if not fits:
        return ""
    return (f"; spread over devices it fits, each needing {', '.join(fits)} "
            f"({budget_lib.format_name(fixed.lo_bits)} fallbacks)")


def plan_for(cfg, policy: str, *, budget: int | None, batch: int, longest_prompt: int, max_new_tokens: int,
             dtype_itemsize: int, opts: DynaExqOptions = DynaExqOptions(),
             floe: FloeOptions = FloeOptions(), devices: int = 1, hint: bool = True) -> budget_lib.MemoryPlan:
    """The memory plan `build_engine` makes, from the config alone (a dry run, or the check
    before any weight is read). `devices` > 1: one device's plan on a mesh of that many
    (`runtime.mesh.device_plan`; `budget` is per device). A budget one device cannot meet is a
    BudgetError naming the minimum and (`hint`) the mesh sizes that would fit (`mesh_hint`)."""
    shape = dict(budget=budget, batch=batch, longest_prompt=longest_prompt, max_new_tokens=max_new_tokens,
                 dtype_itemsize=dtype_itemsize)
    if devices == 1 and hint:
        try:
            return plan_for(cfg, policy, opts=opts, floe=floe, hint=False, **shape)
        except budget_lib.BudgetError as e:
            raise budget_lib.BudgetError(str(e) + mesh_hint(cfg, policy, opts, **shape)) from None
    if devices > 1:
        one = lambda c, b: plan_for(c, policy, budget=b, batch=batch, longest_prompt=longest_prompt,
                                    max_new_tokens=max_new_tokens, dtype_itemsize=dtype_itemsize, opts=opts)
        return mesh_lib.device_plan(one, cfg, devices, budget, dtype_itemsize, policy)
    if policy not in POLICIES:
        raise budget_lib.BudgetError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if "auto" in (opts.lo_bits, opts.hi_dtype):
        raise ValueError("plan_for needs concrete tiers; resolve lo_bits/hi_dtype 'auto' with auto_tiers first")
    hi_bits = budget_lib.HI_BITS.get(opts.hi_dtype)
    lo_bits = 4 if opts.lo_bits == budget_lib.MXFP4 else opts.lo_bits
    # Equal widths are allowed: residency then cannot change a token, which tests of the swap path use.
    if policy == "dynaexq" and hi_bits and lo_bits > hi_bits:
        raise UserError(f"{opts.hi_dtype} slots over an {budget_lib.format_name(opts.lo_bits)} fallback would lose "
                        f"precision on promotion; pass a --lo-bits of at most {hi_bits} or a wider --hi-dtype")
    prompt = prompt_bucket(longest_prompt)
    return budget_lib.policy_plan(
        cfg, policy, budget=budget, batch=batch, prompt=prompt, context=cache_bucket(prompt + max_new_tokens),
        dtype_itemsize=dtype_itemsize, lo_bits=opts.lo_bits, hi_dtype=opts.hi_dtype, max_slots=opts.max_slots,
        mid_bits=opts.mid_bits, mid_experts=len(opts.mid_experts),
        group_size=budget_lib.expert_group_size(cfg, opts.group_size),
        floe_up_bits=floe.up_bits, floe_group=floe.group_size,
    )


def fixed_tiers(opts: DynaExqOptions) -> DynaExqOptions:
    """`opts` with "auto" replaced by today's fixed tiers (int4 fallback, bf16 slots): what the
    policies other than dynaexq use (static's budgeted width comes from its plan)."""
    return dataclasses.replace(opts, lo_bits=4 if opts.lo_bits == "auto" else opts.lo_bits,
                               hi_dtype="bfloat16" if opts.hi_dtype == "auto" else opts.hi_dtype)


def auto_start(cfg, opts: DynaExqOptions, *, budget: int | None, batch: int, longest_prompt: int, max_new_tokens: int,
               dtype_itemsize: int) -> DynaExqOptions:
    """Config-only stand-in for `auto_tiers` (a dry run reads no weights, so no errors): the
    widest fallback whose plan fits, with bf16 slots unless given; where auto tiers start. A
    budget below even the narrowest fallback is the narrowest's BudgetError."""
    lo_choices = autotier.LO_WIDTHS if opts.lo_bits == "auto" else (opts.lo_bits,)
    fixed = fixed_tiers(opts)
    for i, lo in enumerate(lo_choices):
        cand = dataclasses.replace(fixed, lo_bits=lo)
        shape = dict(budget=budget, batch=batch, longest_prompt=longest_prompt, max_new_tokens=max_new_tokens,
                     dtype_itemsize=dtype_itemsize)
        try:
            plan_for(cfg, "dynaexq", opts=cand, hint=False, **shape)
        except budget_lib.BudgetError as e:
            if i + 1 < len(lo_choices):
                continue
            raise budget_lib.BudgetError(str(e) + mesh_hint(cfg, "dynaexq", opts, **shape)) from None
        return cand


def auto_tiers(ckpt, opts: DynaExqOptions, *, budget: int | None, batch: int, longest_prompt: int,
               max_new_tokens: int, hotness_profile=None) -> tuple[DynaExqOptions, autotier.TierChoice | None]:
    """`opts` with an "auto" `lo_bits` / `hi_dtype` replaced by the budget's best tiers
    (`policies.autotier`), weighting each expert by the warm-start profile the policy will use
    (uniform without one); a concrete value restricts the choice to itself. Unchanged, with no
    choice, when neither is "auto"; an MXFP4 fallback gets bf16 slots for an "auto" hi_dtype."""
    if "auto" not in (opts.lo_bits, opts.hi_dtype):
        return opts, None
    if budget is None:  # room for every expert in a slot: the output is full's whatever the tiers
        return fixed_tiers(opts), None
    if opts.lo_bits == budget_lib.MXFP4:  # the choice weighs integer widths: an MXFP4 fallback takes bf16 slots
        return fixed_tiers(opts), None
    if opts.lo_bits == "auto" and ckpt.experts.mxfp4 is not None:
        # A checkpoint shipped in MXFP4 is served as it ships where that fits: its blocks are the
        # model's own weights (no error) at 4.25 bits, which no integer width of that size matches.
        shipped = fixed_tiers(dataclasses.replace(opts, lo_bits=budget_lib.MXFP4))
        try:
            plan_for(ckpt.config, "dynaexq", budget=budget, batch=batch, longest_prompt=longest_prompt,
                     max_new_tokens=max_new_tokens, dtype_itemsize=ckpt.dtype.itemsize, opts=shipped)
            return shipped, None
        except UserError:  # below its minimum: the narrower integer widths may still fit
            pass
    cfg = ckpt.config
    lo_choices = autotier.LO_WIDTHS if opts.lo_bits == "auto" else (opts.lo_bits,)
    group = budget_lib.expert_group_size(cfg, opts.group_size)
    hi_choices = autotier.HI_DTYPES if opts.hi_dtype == "auto" else (opts.hi_dtype,)
    # A mixed fallback only when the width is the plan's to pick: an explicit --lo-bits is kept as given.
    mixed = opts.lo_bits == "auto"
    widths = set(autotier.LO_WIDTHS if mixed else lo_choices) | {budget_lib.HI_BITS[h] for h in hi_choices
                                                                  if h in budget_lib.HI_BITS}
    errors = quant_errors(ckpt.experts, widths, group, opts.quant_method, source=ckpt.source)
    tracker, _ = warm_tracker(ckpt, opts, hotness_profile)
    gu, dn = budget_lib.expert_shapes(cfg)
    expert_bytes = lambda bits: (budget_lib.quantized_nbytes(gu, bits, group)
                                 + budget_lib.quantized_nbytes(dn, bits, group))
    plan_fn = lambda lo, hi, max_slots: plan_for(
        cfg, "dynaexq", budget=budget, batch=batch, longest_prompt=longest_prompt, max_new_tokens=max_new_tokens,
        dtype_itemsize=ckpt.dtype.itemsize,
        opts=dataclasses.replace(opts, lo_bits=lo, hi_dtype=hi, max_slots=max_slots))
    choice = autotier.choose(plan_fn, errors, tracker.scores, lo_choices=lo_choices, hi_choices=hi_choices,
                             allocation=opts.allocation, expert_bytes=expert_bytes if mixed else None)
    return dataclasses.replace(opts, lo_bits=choice.lo_bits, hi_dtype=choice.hi_dtype, max_slots=choice.slots,
                               mid_bits=choice.mid_bits, mid_experts=choice.mid_experts), choice


def available_host_memory() -> int | None:
    """Bytes the kernel says a process can still allocate without swapping (MemAvailable), or
    None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(plan: budget_lib.MemoryPlan, cached: bool = True) -> None:
    """Refuse, before any expert is converted, a run whose host memory (what it holds, and one
    layer of experts while converting) exceeds what this machine has available. What it maps
    is page cache, which the kernel evicts and reads again as needed: not counted, but for a
    bank the converted-expert cache would map when there is no cache (`cached` False)."""
    unmapped = not cached and plan.host_mapped_from.endswith("cache")
    held = plan.host_held + (plan.host_mapped if unmapped else 0)
    need = held + plan.host_transient
    have = available_host_memory()
    if have is not None and need > have:
        fix = ("turn the converted-expert cache on (DYNAEXQ_CACHE=1) so the int8 bank is mapped, not held, or "
               "free host memory") if unmapped else "free host memory, or run on a machine with more"
        raise budget_lib.BudgetError(
            f"this run needs {budget_lib.format_size(need)} of host memory ({budget_lib.format_size(held)} "
            f"held, {budget_lib.format_size(plan.host_transient)} for one layer of experts while converting) and "
            f"{budget_lib.format_size(have)} is available; {fix}")


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
    floe: FloeOptions = FloeOptions(),
    mesh=None,
    placement=None,
    request: Request | None = None,
):
    """An engine for `policy` sized for `batch` prompts of up to `longest_prompt` tokens plus
    `max_new_tokens`, routing big-little if `big_little` is given. Returns (engine, memory
    plan); the plan's `total` is the accounted device bytes. `mesh`: a one-axis `expert` mesh
    (`runtime.mesh.expert_mesh`) to spread each layer's experts over (`placement`: a
    `runtime.mesh.Placement`, default contiguous blocks); `budget` and the plan are then per
    device. `request`: the generation the run will ask for first (`runtime.engine.Request`); its
    steps compile in the background while the experts convert."""
    cfg = ckpt.config
    if mesh is not None:
        return _build_mesh_engine(ckpt, policy, mesh, placement, budget=budget, batch=batch,
                                  longest_prompt=longest_prompt, max_new_tokens=max_new_tokens, opts=opts,
                                  hotness_profile=hotness_profile, transfer=transfer, progress=progress,
                                  big_little=big_little)
    if policy == "dynaexq":
        opts, _ = auto_tiers(ckpt, opts, budget=budget, batch=batch, longest_prompt=longest_prompt,
                             max_new_tokens=max_new_tokens, hotness_profile=hotness_profile)
    else:  # the other policies' widths come from the plan (static) or are fixed
        opts = fixed_tiers(opts)
    plan = plan_for(cfg, policy, budget=budget, batch=batch, longest_prompt=longest_prompt,
                    max_new_tokens=max_new_tokens, dtype_itemsize=ckpt.dtype.itemsize, opts=opts, floe=floe)
    check_host_memory(plan, cached=store.has_cache(ckpt.source))
    opts = dataclasses.replace(opts, group_size=budget_lib.expert_group_size(cfg, opts.group_size))
    floe = dataclasses.replace(floe, group_size=budget_lib.floe_up_group(cfg, floe.group_size))
    shape = abstract_state(ckpt.experts, policy, plan, opts) if request is not None else None
    ahead = Ahead(ckpt, shape, request, big_little) if shape is not None else None
    pol = build_policy(policy, ckpt, plan, opts, batch=batch, hotness_profile=hotness_profile, transfer=transfer,
                       progress=progress, floe_opts=floe)
    engine = LayerwiseEngine(ckpt, pol, big_little) if pol.layerwise else Engine(ckpt, pol, big_little, ahead=ahead)
    return engine, plan


def _build_mesh_engine(ckpt, policy, mesh, placement, *, budget, batch, longest_prompt, max_new_tokens, opts,
                       hotness_profile, transfer, progress, big_little):
    """`build_engine` on an expert mesh. Tiers "auto" resolve to the fixed ones there (auto
    tiers weigh every expert's error against one device's budget; not yet per device)."""
    cfg = ckpt.config
    D = mesh.size
    mesh_lib.check_policy(policy)
    mesh_lib.check_split(cfg.num_experts, D)
    placement = placement or mesh_lib.Placement.contiguous(len(cfg.moe_layers), cfg.num_experts, D)
    opts = fixed_tiers(dataclasses.replace(opts, mid_bits=None, mid_experts=()))
    plan = plan_for(cfg, policy, budget=budget, batch=batch, longest_prompt=longest_prompt,
                    max_new_tokens=max_new_tokens, dtype_itemsize=ckpt.dtype.itemsize, opts=opts, devices=D)
    opts = dataclasses.replace(opts, group_size=budget_lib.expert_group_size(cfg, opts.group_size))
    pol = mesh_lib.build_policy(policy, ckpt, plan, opts, mesh, placement, batch=batch,
                                hotness_profile=hotness_profile, transfer=transfer, progress=progress)
    return mesh_lib.MeshEngine(ckpt, pol, big_little), plan


__all__ = ["DynaExqOptions", "FloeOptions", "auto_start", "auto_tiers", "build_engine", "fixed_tiers", "plan_for"]
