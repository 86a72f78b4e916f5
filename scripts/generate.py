#!/usr/bin/env python
"""Generate text with a Qwen3-MoE checkpoint.

    python scripts/generate.py --prompt "def fibonacci(n):" --max-new-tokens 64
    python scripts/generate.py --model DIR --prompt a --prompt b --temperature 0.7 --top-p 0.9 --json
    python scripts/generate.py --model DIR --budget 20GB --dry-run        # does it fit? reads config.json only
    python scripts/generate.py --model DIR --system "Be brief." --interactive
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-qwen3-moe"
DEFAULT_CONTEXT = 1024  # tokens planned for --dry-run and --interactive when --context is not given
CHAT_CHUNK = 256  # longest prefill chunk of an --interactive turn: bounds its workspace


def parse_args(argv=None):
    return parser().parse_args(argv)


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The flags; scripts/serve.py adds its own to them."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: 'def ')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--budget", help="device memory budget, e.g. 20GB, 20GiB, 5.5GB, 512MiB or plain bytes")
    p.add_argument("--policy", choices=["dynaexq", "full", "static", "offload", "prefetch", "floe"], default="dynaexq",
                   help="dynaexq: low-bit fallbacks + hot experts in high-precision slots; full: every expert at "
                        "high precision; static: every expert at one bit width (the widest the budget holds); "
                        "offload: experts on the host, an LRU cache of device slots loaded on demand; "
                        "prefetch: offload + asynchronous prefetch of the next layer's predicted experts; "
                        "floe: compressed up projections resident, only active gate/down channels streamed (FloE)")
    floe = p.add_argument_group("floe")
    floe.add_argument("--floe-sparsity", type=float, default=0.9,
                      help="share of up-projection channels dropped (calibrated by scripts/calibrate.py); 0 keeps all")
    floe.add_argument("--floe-up-bits", type=lambda t: None if t == "none" else int(t), choices=[2, 3, 4, 8, None],
                      default=2, help="width of the resident up projections (HQQ), or none (the checkpoint's dtype)")
    floe.add_argument("--floe-calibration", help="calibration folder written by scripts/calibrate.py --out "
                                                 "(default: the one saved for the checkpoint)")
    p.add_argument("--hi-dtype", choices=["auto", "bfloat16", "int8", "int4"], default="auto",
                   help="dynaexq slot dtype (int4: over an int2/int3 fallback, DynaExq's 80B setting); auto: the one "
                        "of least expected error in the budget among bfloat16 and int8")
    p.add_argument("--lo-bits", type=lo_bits_flag, choices=["auto", 8, 4, 3, 2, "mxfp4"], default="auto",
                   help="dynaexq (and static) fallback width; auto (with --budget): the plan picks it, a share of "
                        "experts at the next wider width, and the slots, never below the widest static width that "
                        "fits; mxfp4: OCP MXFP4 (4.25 bits), the checkpoint's own bytes when it ships MXFP4 "
                        "(gpt-oss), else quantized from its weights")
    p.add_argument("--group-size", type=int, default=128, help="quantization group (largest power of two <= this dividing the expert dims)")
    p.add_argument("--quant-method", choices=["rtn", "mse"], default="rtn")
    p.add_argument("--rebalance-every", type=int, default=16, help="decode steps between residency decisions")
    p.add_argument("--half-life", type=float, default=256.0,
                   help="hotness half-life in decode steps (a prompt counts as one step per token)")
    p.add_argument("--allocation", choices=["per_layer", "global"], default="per_layer")
    p.add_argument("--hotness", help="warm-start hotness profile (JSON written by --save-hotness)")
    p.add_argument("--save-hotness", help="write the run's hotness profile here")
    chat = p.add_argument_group("chat")
    chat.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                      help="render each prompt as a user message with the model's chat template "
                           "(default: on when the checkpoint has one)")
    chat.add_argument("--system", help="system message for --chat")
    chat.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                      help="Qwen3's enable_thinking switch of the chat template (default: the template's)")
    chat.add_argument("--interactive", action="store_true",
                      help="converse on stdin, one message a line, reusing the KV cache across turns (EOF ends)")
    plan = p.add_argument_group("memory plan")
    plan.add_argument("--dry-run", action="store_true",
                      help="print the memory plan from config.json (and the index) and exit without loading weights")
    plan.add_argument("--context", type=int,
                      help=f"tokens per sequence (prompt + new) planned by --dry-run and held by --interactive "
                           f"(default {DEFAULT_CONTEXT}); a plain run plans exactly what its prompts need")
    plan.add_argument("--batch", type=int, help="sequences planned by --dry-run (default: the number of --prompt)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats on stdout")
    out.add_argument("--verbose", action="store_true",
                     help="print the memory plan, backend and device on stderr before loading, and the load, "
                          "convert, fill and compile times after the run")
    out.add_argument("--quiet", action="store_true", help="no progress bar and no closing summary on stderr")
    p.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse compiled steps from JAX's persistent cache (default on, in $XDG_CACHE_HOME/dynaexq/jax "
                        "or ~/.cache/dynaexq/jax; DYNAEXQ_COMPILE_CACHE=DIR moves it, =0 turns it off; deleting "
                        "the directory is always safe)")
    from dynaexq_jax.eval import big_little

    big_little.add_arguments(p, sweep=False)
    add_mesh_arguments(p)
    return p


def add_mesh_arguments(p) -> None:
    """--mesh: expert parallelism over several devices (`runtime.mesh`)."""
    g = p.add_argument_group("mesh (expert parallel)")
    g.add_argument("--mesh", help="spread each layer's experts over N devices, e.g. expert=4 (everything else is "
                                  "replicated); --budget is then per device, and --dry-run plans one device")
    g.add_argument("--placement", choices=["contiguous", "balanced"], default="contiguous",
                   help="which device owns which experts: contiguous blocks of expert ids, or balanced by the "
                        "expected load in the --hotness profile (greedy, as DeepSeek's EPLB without replicas)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0: join --num-processes processes into one mesh "
                                         "(jax.distributed; CPU collectives through gloo)")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument("--distributed-timeout", type=int, default=60, help="seconds to wait for the coordinator")


def start_processes(args) -> None:
    """--coordinator: join the other processes before any backend starts; only process 0 writes stdout."""
    from dynaexq_jax.runtime import mesh

    if args.coordinator is None:
        if args.num_processes != 1 or args.process_id != 0:
            raise FlagError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if args.mesh is None:
        raise FlagError("--coordinator joins processes into one --mesh; pass --mesh expert=N over all their devices")
    if args.save_hotness:  # each process learns only its own devices' experts
        raise FlagError("--save-hotness does not run across processes yet; drop it or --coordinator")
    mesh.start_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)
    if args.process_id != 0:
        silence_stdout()
    else:  # gloo's C++ logs to file descriptor 1: send those to stderr, keep stdout for the output
        sys.stdout.flush()
        out = os.dup(sys.stdout.fileno())
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = os.fdopen(out, "w")


def mesh_size(args) -> int | None:
    """--mesh expert=N -> N (checked), None without --mesh."""
    from dynaexq_jax.runtime import mesh

    return None if args.mesh is None else mesh.parse_mesh(args.mesh)


class FlagError(UserError):
    """Flags that do not go together, or a value a flag cannot take."""


def check_flags(args) -> None:
    if args.max_new_tokens < 1:
        raise FlagError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.context is not None and not (args.dry_run or args.interactive):
        raise FlagError("--context applies to --dry-run and --interactive; a run plans what its prompts need")
    if args.batch is not None and not args.dry_run:
        raise FlagError("--batch applies to --dry-run; a run's batch is its number of --prompt")
    if args.batch is not None and args.batch < 1:
        raise FlagError(f"--batch must be >= 1, got {args.batch}")
    if args.interactive and (args.json or args.prompt):
        raise FlagError("--interactive reads messages from stdin; drop --json and --prompt")
    if args.interactive and args.batch not in (None, 1):
        raise FlagError("--interactive holds one conversation; drop --batch")
    if args.chat is False and (args.system is not None or args.thinking is not None):
        raise FlagError("--system and --thinking need the chat template; drop them or --no-chat")
    if args.context is not None and args.context < 2:
        raise FlagError(f"--context must be >= 2 tokens (a prompt token and a new one), got {args.context}")
    for flag, value in (("--group-size", args.group_size), ("--rebalance-every", args.rebalance_every)):
        if value < 1:
            raise FlagError(f"{flag} must be >= 1, got {value}")
    if not (math.isfinite(args.half_life) and args.half_life > 0):
        raise FlagError(f"--half-life must be a number of decode steps > 0, got {args.half_life}")
    if (args.hotness or args.save_hotness) and args.policy != "dynaexq":
        raise FlagError("--hotness and --save-hotness apply to --policy dynaexq; drop them or the --policy")
    for flag, texts in (("--prompt", args.prompt or []), ("--system", [args.system or ""])):
        if not all(map(is_utf8, texts)):
            raise FlagError(f"{flag} holds bytes that are not UTF-8 text; pass it in UTF-8")
    from dynaexq_jax.eval import big_little

    big_little.check_knobs(args)
    if mesh_size(args) is not None:
        from dynaexq_jax.runtime import mesh

        mesh.check_policy(args.policy)
    if args.placement == "balanced" and (mesh_size(args) is None or not args.hotness):
        raise FlagError("--placement balanced spreads the load of a --hotness profile over --mesh devices; "
                        "pass both, or drop --placement")
    if mesh_size(args) is not None and args.interactive:
        raise FlagError("--interactive does not run on --mesh yet; drop one of them")
    if args.save_hotness and not args.dry_run:
        files.check_writable(args.save_hotness, "--save-hotness")


def is_utf8(text: str) -> bool:
    """Whether `text` is valid Unicode: Python passes non-UTF-8 bytes of argv on as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_vocab(ids: list[list[int]], cfg, model: Path) -> None:
    """Token ids past the embedding table would be read as NaN: the tokenizer is not the model's."""
    worst = max(max(i) for i in ids)
    if worst >= cfg.vocab_size:
        raise FlagError(f"{model / 'tokenizer.json'} gives token id {worst}, but config.json's vocab_size is "
                        f"{cfg.vocab_size}; the tokenizer does not belong to this model, restore the model's own")


def check_hotness(args, cfg) -> None:
    """A --hotness profile is read in full before any weight is: corrupt, empty or foreign is an error now."""
    from dynaexq_jax.policies.hotness import HotnessTracker

    if args.hotness:
        HotnessTracker.load(args.hotness, expect_shape=(len(cfg.moe_layers), cfg.num_experts))


# ----------------------------------------------------------------------------- memory plan


def plan_shape(args, cfg, prompt_lengths=None) -> tuple[int, int, int]:
    """(batch, longest prompt, new tokens) to size a run for, as `build_engine` takes them.

    An --interactive session holds `--context` tokens and prefills a turn in chunks of at most
    CHAT_CHUNK, so it is planned as a CHAT_CHUNK prompt followed by the rest of the context.
    """
    if prompt_lengths is not None:
        return len(prompt_lengths), max(prompt_lengths), args.max_new_tokens
    context = args.context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if context > cfg.max_position_embeddings:
        raise FlagError(f"--context {context} exceeds the model's context of {cfg.max_position_embeddings}")
    if args.interactive:
        if context <= args.max_new_tokens:
            raise FlagError(f"--context {context} leaves no room for a message before --max-new-tokens "
                            f"{args.max_new_tokens}; raise --context or lower --max-new-tokens")
        chunk = chat_chunk(context)
        return 1, chunk, context - chunk
    if context <= args.max_new_tokens:
        raise FlagError(f"--context {context} leaves no room for a prompt before {args.max_new_tokens} new tokens")
    return args.batch or len(args.prompt or [None]), context - args.max_new_tokens, args.max_new_tokens


def chat_chunk(context: int) -> int:
    """The largest power of two <= CHAT_CHUNK that leaves room for a reply in `context`."""
    chunk = CHAT_CHUNK
    while chunk > 1 and chunk >= context:
        chunk //= 2
    return chunk


def lo_bits_flag(text: str):
    """--lo-bits: "auto", "mxfp4" or a width (argparse then checks it against the choices)."""
    return int(text) if text.isdigit() else text


def options(args):
    from dynaexq_jax.policies.dynaexq import DynaExqOptions

    return DynaExqOptions(
        lo_bits=args.lo_bits, hi_dtype=args.hi_dtype, group_size=args.group_size, quant_method=args.quant_method,
        rebalance_every=args.rebalance_every, half_life_steps=args.half_life, allocation=args.allocation,
    )


def floe_options(args):
    from dynaexq_jax.policies.floe import FloeOptions

    return FloeOptions(up_bits=args.floe_up_bits, sparsity=args.floe_sparsity, calibration=args.floe_calibration)


def model_name(args, cfg) -> str:
    """The model as plan headers name it: its directory and its parameter count."""
    from dynaexq_jax import budget as budget_lib

    return f"{Path(args.model).name} ({budget_lib.parameter_count(cfg) / 1e9:.2f}B parameters)"


def make_plan(args, cfg, shape, budget_bytes, opts=None):
    """The memory plan `build_engine` will make for these flags (or for `opts`, tiers resolved),
    from the config alone."""
    import jax.numpy as jnp

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.runtime import build, engine, mesh

    batch, longest, new = shape
    prompt = engine.prompt_bucket(longest)
    kw = dict(budget=budget_bytes, batch=batch, longest_prompt=longest, max_new_tokens=new,
              dtype_itemsize=jnp.dtype(args.dtype).itemsize)
    opts, auto = opts or options(args), ""
    devices = mesh_size(args) or 1
    if devices > 1:  # the mesh's per-device plans take fixed tiers (`build_engine` with a mesh)
        mesh.check_split(cfg.num_experts, devices)
        opts = build.fixed_tiers(opts)
        plan = build.plan_for(cfg, args.policy, opts=opts, devices=devices, **kw)
        header = (
            f"memory plan per device (each of {devices} on --mesh expert={devices}, {cfg.num_experts // devices} of "
            f"{cfg.num_experts} experts per layer each): {model_name(args, cfg)}, policy {args.policy}, batch {batch} "
            f"x context {engine.cache_bucket(prompt + new)} tokens (prefill up to {prompt}), {args.dtype}, "
            f"{budget_lib.format_name(opts.lo_bits)} fallback, {opts.hi_dtype} slots"
        )
        return plan, header
    if args.policy != "dynaexq":
        opts = build.fixed_tiers(opts)
    elif "auto" in (opts.lo_bits, opts.hi_dtype):  # no weights read yet: the plan auto tiers start from
        opts = build.auto_start(cfg, opts, **kw)
        auto = " (auto tiers start here; the run picks them from each expert's measured error)"
    plan = build.plan_for(cfg, args.policy, opts=opts, floe=floe_options(args), **kw)
    header = (
        f"memory plan: {model_name(args, cfg)}, policy {args.policy}, batch {batch} x context "
        f"{engine.cache_bucket(prompt + new)} tokens (prefill up to {prompt}), {args.dtype}, "
        f"{budget_lib.format_name(opts.lo_bits)} fallback, {opts.hi_dtype} slots{auto}"
    )
    if args.policy == "floe":
        header = header.split(f", {budget_lib.format_name(opts.lo_bits)} fallback")[0] + (
            f", FloE sparsity {args.floe_sparsity}")
    return plan, header


def plan_text(args, cfg, plan, header) -> str:
    from dynaexq_jax.policies import hotness

    lines = [header, plan.table()]
    if args.policy == "dynaexq" and args.allocation == "per_layer" and plan.moe_layers:
        experts = cfg.num_experts // (mesh_size(args) or 1)  # a device's slots serve only its own experts
        cap = hotness.per_layer_capacity(plan.slots, plan.moe_layers, experts)
        span = f"{cap.min()}" if cap.min() == cap.max() else f"{cap.min()} to {cap.max()}"
        lines.append(f"per MoE layer: {span} of {experts} experts hold a high-precision slot"
                     + (" on each device" if mesh_size(args) else ""))
    return "\n".join(lines)


def index_check(model: Path, cfg) -> str | None:
    """A line comparing the checkpoint index's `total_size` with what config.json implies."""
    from dynaexq_jax import budget
    from dynaexq_jax.io import loader

    index = loader.read_index(model)  # checked: a damaged index is an error, not a traceback after the plan
    total = None if index is None else (index.get("metadata") or {}).get("total_size")
    if total is None:
        return None
    stored = json.loads((model / "config.json").read_text())
    dtype = str(stored.get("dtype") or stored.get("torch_dtype") or "bfloat16")
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    params = budget.parameter_count(cfg)
    verdict = "as config.json implies" if int(total) == params * itemsize else (
        f"but config.json implies {budget.format_size(params * itemsize)}; the plan follows config.json"
    )
    return (f"checkpoint index: {budget.format_size(int(total))} stored, {params / 1e9:.2f} B parameters "
            f"as {dtype}, {verdict}")


def dry_run(args, budget_bytes) -> dict:
    from dynaexq_jax.models.config import ModelConfig

    model = Path(args.model)
    cfg = ModelConfig.from_file(model)  # a missing directory is a one-line ConfigError
    check = index_check(model, cfg)
    plan, header = make_plan(args, cfg, plan_shape(args, cfg), budget_bytes)
    if args.json:
        print(json.dumps({"memory_plan": plan.as_dict()}))
    else:
        print(plan_text(args, cfg, plan, header))
        if check:
            print(check)
    return {"memory_plan": plan.as_dict()}


# ----------------------------------------------------------------------------- reports


def summary_line(stats: dict) -> str:
    """The closing line: throughput, memory, cache behaviour; every figure is in `stats`."""
    from dynaexq_jax.budget import format_size

    def rate(x):
        return "n/a" if x is None else f"{x:.1f}"

    peak, budget = stats["peak_device_bytes"], stats["budget_bytes"]
    memory = (f"peak {format_size(peak)}" if peak is not None
              else f"accounted {format_size(stats['accounted_device_bytes'])} (no allocator peak on this backend)")
    if budget is not None:
        memory += f" of {format_size(budget)} budget"
    hit = stats["hi_hit_rate"]
    return " | ".join([
        f"prompt {stats['prompt_tokens']} tok, {rate(stats['prefill_tokens_per_s'])} tok/s",
        f"generated {stats['generated_tokens']} tok, {rate(stats['decode_tokens_per_s'])} tok/s",
        memory,
        f"hi-precision hits {'n/a' if hit is None else f'{hit:.1%}'}",
        f"host->device {stats['h2d_bytes'] / 1e9:.3f} GB",
    ] + ([f"read {format_size(stats['checkpoint_bytes_read'])} of the checkpoint"]
         if "checkpoint_bytes_read" in stats else []) + ([f"little {bl['little_share']:.1%} of token-layers, {bl['pairs_saved']} pairs "
          f"({bl['bytes_saved'] / 1e9:.3f} GB of expert reads) saved, {bl['fallbacks']} fallbacks"]
         if (bl := stats.get("big_little")) and bl["little_share"] is not None else []))


# ----------------------------------------------------------------------------- runs


class Prompter:
    """Turns user text into token ids: through the chat template when chatting, else as is."""

    def __init__(self, args, model: Path, tok):
        from dynaexq_jax.io import chat

        template = chat.load_chat_template(model)
        if args.chat and template is None:
            raise FlagError(f"{model} has no chat template (tokenizer_config.json or chat_template.jinja); drop --chat")
        self.template = template if args.chat is not False else None
        if self.template is None and (args.system is not None or args.thinking is not None):
            raise FlagError(f"--system and --thinking need a chat template, and {model} has none")
        self.tok = tok
        self.system = args.system
        self.kwargs = {} if args.thinking is None else {"enable_thinking": args.thinking}

    def messages(self, user: str) -> list[dict]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + [{"role": "user", "content": user}]

    def render(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True, **self.kwargs)
        # The template writes the special tokens itself, as apply_chat_template(tokenize=True).
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, user: str) -> list[int]:
        return self.render(self.messages(user)) if self.template else self.tok.encode(user).ids

    def stop_ids(self, eos: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint's EOS ids, and the template's end of turn (tokenizer_config eos_token)."""
        if self.template is None:
            return eos
        end = self.template.special_tokens.get("eos_token")
        end_id = self.tok.token_to_id(end) if end else None
        return tuple(eos) + ((end_id,) if end_id is not None and end_id not in eos else ())


class Streamer:
    """Prints one sequence's text as it is generated: decode everything so far and print the new
    suffix (keeps multi-byte characters whole)."""

    def __init__(self, tok, echo: str = ""):
        self.tok, self.echo = tok, echo
        self.ids, self.shown = [], ""
        self.started = False  # set before the first write: an interrupt then still ends the line

    def __call__(self, step_ids):
        if not self.started:  # echo the prompt once the request has been accepted
            self.started = True
            sys.stdout.write(self.echo)
        self.ids.append(int(step_ids[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.show(text)

    def show(self, text: str) -> None:
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text

    def finish(self) -> None:
        """End the reply: what the tokens decode to, an unfinished character included, and a newline."""
        self.show(self.tok.decode(self.ids, skip_special_tokens=True))
        print()


def check_slots_for_hotness(args, plan) -> None:
    if args.save_hotness and plan.slots == 0:  # dynaexq without slots runs static: it learns no hotness
        raise FlagError("--save-hotness: the budget leaves no high-precision slot, so no hotness is learned; "
                        "raise --budget or drop --save-hotness")


def load_engine(args, budget_bytes, cfg, shape):
    """Load, convert and place the model for `shape`; -> (engine, plan, checkpoint, load seconds)."""
    import time

    import jax.numpy as jnp

    from dynaexq_jax.eval import big_little
    from dynaexq_jax.io import loader
    from dynaexq_jax.runtime import mesh as mesh_lib
    from dynaexq_jax.runtime.build import auto_tiers, build_engine

    bl = big_little.from_args(args, cfg.experts_per_token)  # bad knobs fail before any weight is read
    start, _ = make_plan(args, cfg, shape, budget_bytes)  # refuses a budget before any weight is read
    devices = mesh_size(args)
    mesh = None if devices is None else mesh_lib.expert_mesh(devices)
    placement = None
    if args.placement == "balanced":
        from dynaexq_jax.policies.hotness import HotnessTracker

        load = HotnessTracker.load(args.hotness, expect_shape=(len(cfg.moe_layers), cfg.num_experts)).scores
        placement = mesh_lib.Placement.balanced(load, devices)
    elif mesh is not None:
        placement = mesh_lib.Placement.contiguous(len(cfg.moe_layers), cfg.num_experts, devices)
    # Several processes: each reads only the experts its own devices hold.
    owned = mesh_lib.process_experts(mesh, placement) if mesh is not None and args.coordinator else None
    auto = args.policy == "dynaexq" and "auto" in (args.lo_bits, args.hi_dtype) and mesh is None
    if not auto:  # explicit tiers: the run's plan is this one
        check_slots_for_hotness(args, start)
    t0 = time.perf_counter()
    ckpt = loader.load(args.model, jnp.dtype(args.dtype), progress=show_progress(args), experts=owned)
    batch, longest, new = shape
    opts, choice = options(args), None
    if auto:  # auto tiers need the experts' errors, so they are picked once the weights are in
        opts, choice = auto_tiers(ckpt, opts, budget=budget_bytes, batch=batch, longest_prompt=longest,
                                  max_new_tokens=new, hotness_profile=args.hotness)
    plan, header = make_plan(args, cfg, shape, budget_bytes, opts)
    check_slots_for_hotness(args, plan)
    if args.verbose:
        print(plan_text(args, cfg, plan, header), file=sys.stderr)
        if choice is not None:
            print(choice.describe(), file=sys.stderr)
        info = runtime_info()
        print(f"backend {info['backend']}, device {info['device']}, compile cache {info['compile_cache'] or 'off'}",
              file=sys.stderr)
    eng, plan = build_engine(
        ckpt, args.policy, budget=budget_bytes, batch=batch, longest_prompt=longest, max_new_tokens=new,
        hotness_profile=args.hotness, opts=opts, progress=show_progress(args),
        big_little=bl, floe=floe_options(args), mesh=mesh, placement=placement,
    )
    # The engine's checkpoint: on a mesh, the one whose weights are the replicated copy (the loaded
    # one's single-device copy is freed with it).
    return eng, plan, eng.checkpoint, time.perf_counter() - t0


def show_progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def read_tokenizer(args):
    from dynaexq_jax.io import loader
    from dynaexq_jax.models.config import ModelConfig

    model = Path(args.model)
    if not model.is_dir():
        raise loader.CheckpointError(f"model directory {model} does not exist; pass --model DIR of a Hugging Face checkpoint")
    cfg = ModelConfig.from_file(model)
    tok = loader.load_tokenizer(model)
    if tok is None:
        raise loader.CheckpointError(f"{model} has no tokenizer.json, so text prompts cannot be encoded")
    return model, cfg, tok


def runtime_info() -> dict:
    """Where the run computes: JAX's backend, the device's kind, and the compilation cache in use."""
    import jax

    from dynaexq_jax.runtime import compile_cache

    cache = compile_cache.active_dir()
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "compile_cache": None if cache is None else str(cache)}


def run_stats(args, gen_stats, plan, budget_bytes, load_s: float) -> dict:
    """`load_s`: loading and building the engine; the quantization inside it is reported as
    convert_s (the policy's), the rest as load_s."""
    stats = dict(gen_stats, budget_bytes=budget_bytes, model=str(args.model), dtype=args.dtype, policy=args.policy)
    stats["load_s"] = load_s - stats["convert_s"]
    stats["accounted_device_bytes"] = plan.total
    stats["memory_plan"] = plan.as_dict()
    stats.update(runtime_info())
    return stats


def timings_line(stats: dict) -> str:
    """--verbose: where the time before the first token went."""
    return ("load {load_s:.2f} s | convert {convert_s:.2f} s | fill {fill_s:.2f} s | compile {compile_s:.2f} s"
            .format(**stats))


def run(args, budget_bytes) -> dict:
    from dynaexq_jax.runtime import engine, sampling

    knobs = sampling.SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    model, cfg, tok = read_tokenizer(args)
    check_hotness(args, cfg)
    prompter = Prompter(args, model, tok)
    prompts = args.prompt or ["def "]
    ids = [prompter.encode(p) for p in prompts]
    if min(map(len, ids)) == 0:
        raise FlagError("every prompt needs at least one token; pass a non-empty --prompt")
    check_vocab(ids, cfg, model)
    engine.check_request(cfg, ids, args.max_new_tokens)  # a prompt over the context, before any budget message
    eng, plan, ckpt, load_s = load_engine(args, budget_bytes, cfg, plan_shape(args, cfg, [len(i) for i in ids]))

    streaming = not args.json and len(prompts) == 1
    # A chat reply is printed alone; raw completions continue the echoed prompt.
    on_tokens = Streamer(tok, "" if prompter.template else prompts[0]) if streaming else None
    try:
        gen = eng.generate(ids, args.max_new_tokens, knobs, prompter.stop_ids(ckpt.eos_token_ids), on_tokens=on_tokens)
    except KeyboardInterrupt:
        if streaming and on_tokens.started:
            print(flush=True)  # what was streamed stays, ended by a newline
        raise
    outputs = [
        {"prompt": p, "token_ids": t, "text": tok.decode(t, skip_special_tokens=True)}
        for p, t in zip(prompts, gen.tokens)
    ]
    stats = run_stats(args, gen.stats, plan, budget_bytes, load_s)
    if args.coordinator:  # each process's own figure in its closing line
        stats["checkpoint_bytes_read"] = ckpt.bytes_read
    if args.save_hotness:
        try:
            eng.policy.tracker.save(args.save_hotness)
        except OSError as e:  # checked writable at the start; the disk may have filled since
            raise FlagError(f"--save-hotness {args.save_hotness}: {e.strerror}; free space there") from None
    if args.json:
        print(json.dumps({"outputs": outputs, "stats": stats}))
    elif streaming:
        on_tokens.finish()
    else:
        for i, o in enumerate(outputs):
            print(f"--- [{i}] {o['prompt']}{o['text']}")
    if not args.quiet:
        print(summary_line(stats), file=sys.stderr)
    if args.verbose:
        print(timings_line(stats), file=sys.stderr)
    return {"outputs": outputs, "stats": stats}


class Conversation:
    """The finished turns of an --interactive session, as the model sees them: through the chat
    template, or as the raw token stream continued. When the next turn does not fit the
    session, its oldest turns are dropped."""

    def __init__(self, prompter: Prompter):
        self.prompter = prompter
        self.turns: list[tuple[str, list[int]]] = []  # (user text, reply ids)

    def ids(self, user: str, turns) -> list[int]:
        p = self.prompter
        if p.template:
            history = [{"role": r, "content": c} for u, reply in turns
                       for r, c in (("user", u), ("assistant", p.tok.decode(reply, skip_special_tokens=True)))]
            system_and_user = p.messages(user)
            return p.render(system_and_user[:-1] + history + system_and_user[-1:])
        return [t for u, reply in turns for t in p.tok.encode(u).ids + reply] + p.tok.encode(user).ids

    def fit(self, user: str, limit: int) -> tuple[list[int], int] | None:
        """(ids of the next turn, oldest turns dropped) within `limit` tokens; None if it does
        not fit even alone."""
        for dropped in range(len(self.turns) + 1):
            ids = self.ids(user, self.turns[dropped:])
            if len(ids) <= limit:
                self.turns = self.turns[dropped:]
                return ids, dropped
        return None


def stdin_lines(stdin):
    """Lines of stdin as text; bytes that are not UTF-8 are an error naming the line."""
    for n, line in enumerate(getattr(stdin, "buffer", stdin), 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FlagError(f"line {n} of stdin is not UTF-8 text (byte {line[e.start]:#04x} at {e.start}); "
                                "send UTF-8") from None
        yield line


def interactive(args, budget_bytes, stdin=None) -> list[dict]:
    """Converse on stdin: each line is a user message; the reply streams to stdout and one
    summary line per turn goes to stderr. Ctrl-C stops a reply and drops its turn; a turn over
    the context drops the oldest turns (or, alone too long, is not sent). Returns the turns' stats."""
    from dynaexq_jax.runtime import sampling

    stdin = stdin or sys.stdin
    knobs = sampling.SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    model, cfg, tok = read_tokenizer(args)
    check_hotness(args, cfg)
    prompter = Prompter(args, model, tok)
    shape = plan_shape(args, cfg)
    eng, plan, ckpt, load_s = load_engine(args, budget_bytes, cfg, shape)
    batch, chunk, rest = shape
    session = eng.new_session(chunk + rest, chunk)
    stop = prompter.stop_ids(ckpt.eos_token_ids)
    convo = Conversation(prompter)
    context = chunk + rest
    limit = context - args.max_new_tokens  # the messages' share of the context
    turns = []
    for line in stdin_lines(stdin):
        user = line.rstrip("\r\n")
        if not user.strip():
            continue
        fitted = convo.fit(user, limit)
        if fitted is None:
            print(f"note: this message is over the context ({context} tokens, {args.max_new_tokens} of them for "
                  "the reply) on its own; not sent (shorten it, or raise --context)", file=sys.stderr)
            continue
        ids, dropped = fitted
        check_vocab([ids], cfg, model)
        if dropped:
            print(f"note: the context ({context} tokens) is full; dropped the {dropped} oldest turn(s)",
                  file=sys.stderr)
        try:
            streamer = Streamer(tok)
            gen = eng.chat_turn(session, ids, args.max_new_tokens, knobs, stop, on_tokens=streamer)
        except KeyboardInterrupt:
            print(flush=True)
            print("note: interrupted; the turn is dropped", file=sys.stderr)
            continue
        streamer.finish()
        reply = gen.tokens[0]
        convo.turns.append((user, reply))
        stats = run_stats(args, gen.stats, plan, budget_bytes, load_s)
        turns.append(stats)
        if not args.quiet:
            print(summary_line(stats) + f" | reused {stats['reused_tokens']} cached tok", file=sys.stderr)
        if args.verbose:
            print(timings_line(stats), file=sys.stderr)
    return turns


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax import budget
    from dynaexq_jax.runtime import compile_cache

    compile_cache.enable(args.compile_cache)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            check_flags(args)
            budget_bytes = budget.parse_size(args.budget) if args.budget is not None else None
            if not args.dry_run:
                start_processes(args)
            if args.dry_run:
                dry_run(args, budget_bytes)
            elif args.interactive:
                interactive(args, budget_bytes)
            else:
                run(args, budget_bytes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a reply of --interactive
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `generate.py ... | head`: the reader is gone; leave quietly
        silence_stdout()
        return 141
    return 0


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (an unusable cache, say) as one line, like errors."""
    print(f"warning: {message}", file=sys.stderr)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush raises no second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
