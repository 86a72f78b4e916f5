#!/usr/bin/env python
"""Serve a checkpoint over the OpenAI API, with continuous batching under the memory budget.

    python scripts/serve.py --model DIR --budget 20GB --port 8000 --max-batch 16
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "def fibonacci(n):", "max_tokens": 32}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat template),
GET /v1/models, /health, /metrics (Prometheus). The memory plan holds --max-batch sequences of
--context tokens; generate.py's model, policy and chat flags apply, and its sampling flags and
--max-new-tokens are the defaults of requests that leave them out. SIGTERM (or Ctrl-C) lets
running requests finish, then exits.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402

from dynaexq_jax.errors import UserError  # noqa: E402


def parse_args(argv=None):
    p = generate.parser(__doc__)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-batch", type=int, default=16, help="sequence slots: requests generating together")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; past it: 429")
    g.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens prefilled per step (a power of two >= 16), between the others' decode steps")
    g.add_argument("--served-model-name", help="the model's name in the API (default: the directory's name)")
    g.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step before listening, so no request waits on a compile")
    return p.parse_args(argv)


def check_flags(args) -> None:
    for flag, value in (("--prompt", args.prompt), ("--json", args.json), ("--interactive", args.interactive),
                        ("--batch", args.batch), ("--save-hotness", args.save_hotness),
                        ("--coordinator", args.coordinator)):
        if value:
            raise generate.FlagError(f"{flag} does not apply to the server; requests bring prompts "
                                     "(use --max-batch for the sequences planned)")
    if args.policy in ("offload", "prefetch", "floe"):
        raise generate.FlagError(f"--policy {args.policy} runs layer by layer and cannot batch continuously; "
                                 "serve with --policy dynaexq, static or full")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise generate.FlagError(f"{flag} must be >= 1, got {value}")
    chunk = args.prefill_chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise generate.FlagError(f"--prefill-chunk must be a power of two >= 16, got {chunk}")
    if not 0 < args.port < 65536:
        raise generate.FlagError(f"--port must be in 1..65535, got {args.port}")
    # generate.py's own checks, with --context (here: every sequence's) set aside
    generate.check_flags(argparse.Namespace(**{**vars(args), "context": None}))


def shape(args, cfg) -> tuple[int, int, int]:
    """(batch, longest prompt, new tokens) as build_engine sizes a server (`serve.engine_shape`)."""
    from dynaexq_jax import serve

    context = args.context or min(generate.DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if context > cfg.max_position_embeddings:
        raise generate.FlagError(f"--context {context} exceeds the model's context of {cfg.max_position_embeddings}")
    if context < 2:
        raise generate.FlagError(f"--context must be >= 2 tokens, got {context}")
    s = serve.engine_shape(max_batch=args.max_batch, context=context, max_chunk=args.prefill_chunk)
    return s["batch"], s["longest_prompt"], s["max_new_tokens"]


def run(args, budget_bytes) -> None:
    from dynaexq_jax import serve
    from dynaexq_jax.serve.protocol import Defaults

    model, cfg, _ = generate.read_tokenizer(args)
    generate.check_hotness(args, cfg)
    sizes = shape(args, cfg)
    if args.dry_run:
        plan, header = generate.make_plan(args, cfg, sizes, budget_bytes)
        print(generate.plan_text(args, cfg, plan, header))
        return
    eng, plan, ckpt, load_s = generate.load_engine(args, budget_bytes, cfg, sizes)
    batch, _, context = sizes
    defaults = Defaults(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    kwargs = {} if args.thinking is None else {"enable_thinking": args.thinking}
    s = serve.served(eng, max_batch=batch, context=context, max_chunk=args.prefill_chunk, max_queue=args.max_queue,
                     model_name=args.served_model_name, chat=args.chat is not False, system=args.system,
                     template_kwargs=kwargs, defaults=defaults)
    if args.chat and s.template is None:
        raise generate.FlagError(f"{model} has no chat template (tokenizer_config.json or chat_template.jinja); "
                                 "drop --chat")
    if not args.quiet:
        print(f"serving {s.model} ({args.policy}, {args.dtype}): {batch} sequences x {context} tokens, "
              f"{plan.total / 1e9:.3f} GB accounted; loaded in {load_s:.1f} s", file=sys.stderr)
    if args.warm_up:
        s.scheduler.warm_up()
        if not args.quiet:
            print(f"compiled in {eng.compile_s:.1f} s", file=sys.stderr)
    import uvicorn

    uvicorn.run(serve.make_app(s), host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax import budget
    from dynaexq_jax.runtime import compile_cache

    compile_cache.enable(args.compile_cache)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = generate.show_warning
            check_flags(args)
            run(args, budget.parse_size(args.budget) if args.budget is not None else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
