"""The memory plan of a run, from config.json alone: the shape it is sized for, the plan
`build_engine` will make for the options, and the plan as text (what --dry-run prints)."""

from __future__ import annotations

from pathlib import Path

from dynaexq_jax import budget as budget_lib
from dynaexq_jax import inputs
from dynaexq_jax.launch.flags import FlagError
from dynaexq_jax.launch.options import DEFAULT_CONTEXT, EngineOptions

CHAT_CHUNK = 256  # longest prefill chunk of an --interactive turn: bounds its workspace


def plan_shape(opts: EngineOptions, cfg, prompt_lengths=None) -> tuple[int, int, int]:
    """(batch, longest prompt, new tokens) to size a run for, as `build_engine` takes them: the
    prompts' own when given, else `--context` tokens per sequence (a dry run, or a session).

    An --interactive session holds `--context` tokens and prefills a turn in chunks of at most
    CHAT_CHUNK, so it is planned as a CHAT_CHUNK prompt followed by the rest of the context.
    """
    new = opts.sampling.max_new_tokens
    if prompt_lengths is not None:
        return len(prompt_lengths), max(prompt_lengths), new
    context = opts.plan.context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if context > cfg.max_position_embeddings:
        raise FlagError(f"--context {context} exceeds the model's context of {cfg.max_position_embeddings}")
    if opts.prompts.interactive:
        if context <= new:
            raise FlagError(f"--context {context} leaves no room for a message before --max-new-tokens "
                            f"{new}; raise --context or lower --max-new-tokens")
        chunk = chat_chunk(context)
        return 1, chunk, context - chunk
    if context <= new:
        raise FlagError(f"--context {context} leaves no room for a prompt before {new} new tokens")
    return opts.plan.batch or len(opts.prompts.prompt or [None]), context - new, new


def chat_chunk(context: int) -> int:
    """The largest power of two <= CHAT_CHUNK that leaves room for a reply in `context`."""
    chunk = CHAT_CHUNK
    while chunk > 1 and chunk >= context:
        chunk //= 2
    return chunk


def memory_plan(opts: EngineOptions, cfg, shape, budget_bytes: int | None, tiers=None):
    """(the memory plan `build_engine` will make for these options, the plan as text), from the
    config alone. `tiers`: the policy's options with auto tiers resolved (`build.auto_tiers`);
    without, a dynaexq plan with auto tiers is the one they start from."""
    import jax.numpy as jnp

    from dynaexq_jax.runtime import build, engine, mesh

    batch, longest, new = shape
    prompt = engine.prompt_bucket(longest)
    kw = dict(budget=budget_bytes, batch=batch, longest_prompt=longest, max_new_tokens=new,
              dtype_itemsize=jnp.dtype(opts.model.dtype).itemsize)
    policy, tiers, auto = opts.policy.policy, tiers or opts.policy.dynaexq(), ""
    count = budget_lib.parameter_count(cfg)
    count = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"
    name = f"{Path(opts.model.model).name} ({count} parameters)"
    devices = opts.mesh.size() or 1
    context = f"batch {batch} x context {engine.cache_bucket(prompt + new)} tokens (prefill up to {prompt})"
    if devices > 1:  # the mesh's per-device plans take fixed tiers (`build_engine` with a mesh)
        mesh.check_split(cfg.num_experts, devices)
        tiers = build.fixed_tiers(tiers)
        plan = build.plan_for(cfg, policy, opts=tiers, devices=devices, **kw)
        header = (
            f"memory plan per device (each of {devices} on --mesh expert={devices}, {cfg.num_experts // devices} of "
            f"{cfg.num_experts} experts per layer each): {name}, policy {policy}, {context}, {opts.model.dtype}, "
            f"{budget_lib.format_name(tiers.lo_bits)} fallback, {tiers.hi_dtype} slots"
        )
        return plan, plan_text(opts, cfg, plan, header)
    if policy != "dynaexq":
        tiers = build.fixed_tiers(tiers)
    elif "auto" in (tiers.lo_bits, tiers.hi_dtype):  # no weights read yet: the plan auto tiers start from
        tiers = build.auto_start(cfg, tiers, **kw)
        auto = " (auto tiers start here; the run picks them from each expert's measured error)"
    plan = build.plan_for(cfg, policy, opts=tiers, floe=opts.policy.floe(), **kw)
    header = f"memory plan: {name}, policy {policy}, {context}, {opts.model.dtype}, "
    if policy == "floe":
        header += f"FloE sparsity {opts.policy.floe_sparsity}"
    else:
        header += f"{budget_lib.format_name(tiers.lo_bits)} fallback, {tiers.hi_dtype} slots{auto}"
    return plan, plan_text(opts, cfg, plan, header)


def plan_text(opts: EngineOptions, cfg, plan, header: str) -> str:
    """The header, the plan's table and, for dynaexq per layer, how many experts hold a slot."""
    from dynaexq_jax.policies import hotness

    lines = [header, plan.table()]
    if opts.policy.policy == "dynaexq" and opts.policy.allocation == "per_layer" and plan.moe_layers:
        devices = opts.mesh.size()
        experts = cfg.num_experts // (devices or 1)  # a device's slots serve only its own experts
        cap = hotness.per_layer_capacity(plan.slots, plan.moe_layers, experts)
        span = f"{cap.min()}" if cap.min() == cap.max() else f"{cap.min()} to {cap.max()}"
        lines.append(f"per MoE layer: {span} of {experts} experts hold a high-precision slot"
                     + (" on each device" if devices else ""))
    return "\n".join(lines)


def index_check(model: Path, cfg) -> str | None:
    """A line comparing the checkpoint index's `total_size` with what config.json implies."""
    from dynaexq_jax.io import loader

    index = loader.read_index(model)  # checked: a damaged index is an error, not a traceback after the plan
    total = None if index is None else (index.get("metadata") or {}).get("total_size")
    if total is None:
        return None
    stored = inputs.read_json(model / "config.json", "restore it from the model's original release")
    dtype = str(stored.get("dtype") or stored.get("torch_dtype") or "bfloat16")
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    params = budget_lib.parameter_count(cfg)
    verdict = "as config.json implies" if int(total) == params * itemsize else (
        f"but config.json implies {budget_lib.format_size(params * itemsize)}; the plan follows config.json"
    )
    return (f"checkpoint index: {budget_lib.format_size(int(total))} stored, {params / 1e9:.2f} B parameters "
            f"as {dtype}, {verdict}")
