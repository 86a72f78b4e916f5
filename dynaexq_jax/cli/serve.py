"""Serve a checkpoint over the OpenAI API, with continuous batching under the memory budget.

    python scripts/serve.py --model DIR --budget 20GB --port 8000 --max-batch 16
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "def fibonacci(n):", "max_tokens": 32}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat template),
GET /v1/models, /health, /metrics (Prometheus). The memory plan holds --max-batch sequences of
--context tokens; generate.py's model, policy and chat flags apply, and its sampling flags and
--max-new-tokens are the defaults of requests that leave them out. The address is bound before
the model loads. With --api-key (or DYNAEXQ_API_KEY) every request but /health needs the header
`Authorization: Bearer KEY`. SIGTERM (or Ctrl-C) drains: new requests get 503, running ones
finish within --drain-timeout seconds (the rest end with finish_reason "abort"), then it exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from dynaexq_jax.cli import show_warning
from dynaexq_jax.errors import UserError
from dynaexq_jax.launch.engine import check_hotness, load_engine, read_model
from dynaexq_jax.launch.flags import FlagError, command_parser
from dynaexq_jax.launch.options import DEFAULT_CONTEXT, EngineOptions, add_engine_flags
from dynaexq_jax.launch.plan import memory_plan


def parser():
    p = command_parser(__doc__)
    add_engine_flags(p)
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
    g.add_argument("--api-key", default=os.environ.get("DYNAEXQ_API_KEY") or None,
                   help="requests must send `Authorization: Bearer KEY` (all but /health; default: $DYNAEXQ_API_KEY, "
                        "which keeps the key out of the process list)")
    g.add_argument("--max-request-size", default="4MB", help="largest request body (e.g. 4MB, 512KiB); past it: 413")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM lets running requests finish before ending them (finish_reason \"abort\")")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def check(args, opts: EngineOptions) -> None:
    for flag, value in (("--prompt", opts.prompts.prompt), ("--json", opts.output.json),
                        ("--interactive", opts.prompts.interactive), ("--batch", opts.plan.batch),
                        ("--save-hotness", opts.policy.save_hotness), ("--coordinator", opts.mesh.coordinator)):
        if value:
            raise FlagError(f"{flag} does not apply to the server; requests bring prompts "
                            "(use --max-batch for the sequences planned)")
    if opts.policy.policy in ("offload", "prefetch", "floe"):
        raise FlagError(f"--policy {opts.policy.policy} runs layer by layer and cannot batch continuously; "
                        "serve with --policy dynaexq, static or full")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise FlagError(f"{flag} must be >= 1, got {value}")
    chunk = args.prefill_chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise FlagError(f"--prefill-chunk must be a power of two >= 16, got {chunk}")
    if not 0 < args.port < 65536:
        raise FlagError(f"--port must be in 1..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise FlagError("--api-key is empty; pass a key, or leave the flag and DYNAEXQ_API_KEY out")
    if not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise FlagError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    max_body(args)
    opts.check()


def max_body(args) -> int:
    from dynaexq_jax import budget

    try:
        return budget.parse_size(args.max_request_size)
    except UserError as e:
        raise FlagError(f"--max-request-size: {e}") from None


def shape(args, opts: EngineOptions, cfg) -> tuple[int, int, int]:
    """(batch, longest prompt, new tokens) as build_engine sizes a server (`serve.engine_shape`)."""
    from dynaexq_jax import serve

    context = opts.plan.context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if context > cfg.max_position_embeddings:
        raise FlagError(f"--context {context} exceeds the model's context of {cfg.max_position_embeddings}")
    s = serve.engine_shape(max_batch=args.max_batch, context=context, max_chunk=args.prefill_chunk)
    return s["batch"], s["longest_prompt"], s["max_new_tokens"]


def run(args, opts: EngineOptions, budget_bytes) -> None:
    from dynaexq_jax import serve

    model, cfg, _ = read_model(opts.model)
    check_hotness(opts.policy, cfg)
    sizes = shape(args, opts, cfg)
    if opts.plan.dry_run:
        print(memory_plan(opts, cfg, sizes, budget_bytes)[1])
        return
    sock = serve.bind(args.host, args.port)  # a bad --host or a busy --port fails before any weight is read
    with sock:  # closed here too if the load fails
        if not args.api_key and not serve.server.is_loopback(sock):
            print(f"warning: listening on {args.host}:{args.port} without --api-key: anyone who can reach it can use "
                  "the server; set --api-key (or DYNAEXQ_API_KEY), or listen on 127.0.0.1", file=sys.stderr)
        load_and_serve(args, opts, budget_bytes, model, cfg, sizes, sock)


def load_and_serve(args, opts: EngineOptions, budget_bytes, model, cfg, sizes, sock) -> None:
    from dynaexq_jax import serve
    from dynaexq_jax.serve.protocol import Defaults

    log = (lambda line: print(line, file=sys.stderr)) if opts.output.verbose else None
    eng, plan, _, load_s = load_engine(opts, budget_bytes, cfg, sizes, progress=opts.output.progress(), log=log)
    batch, _, context = sizes
    defaults = Defaults(opts.sampling.max_new_tokens, opts.sampling.params())
    kwargs = {} if opts.prompts.thinking is None else {"enable_thinking": opts.prompts.thinking}
    s = serve.served(eng, max_batch=batch, context=context, max_chunk=args.prefill_chunk, max_queue=args.max_queue,
                     model_name=args.served_model_name, chat=opts.prompts.chat is not False,
                     system=opts.prompts.system, template_kwargs=kwargs, defaults=defaults, api_key=args.api_key,
                     max_body=max_body(args))
    if opts.prompts.chat and s.template is None:
        raise FlagError(f"{model} has no chat template (tokenizer_config.json or chat_template.jinja); drop --chat")
    quiet = opts.output.quiet
    if not quiet:
        print(f"serving {s.model} ({opts.policy.policy}, {opts.model.dtype}): {batch} sequences x {context} tokens, "
              f"{plan.total / 1e9:.3f} GB accounted; loaded in {load_s:.1f} s", file=sys.stderr)
    if args.warm_up:
        s.scheduler.warm_up()
        if not quiet:
            print(f"compiled in {eng.compile_s:.1f} s", file=sys.stderr)
    if not quiet:
        host, port = sock.getsockname()[:2]
        print(f"listening on http://{f'[{host}]' if ':' in host else host}:{port}", file=sys.stderr)
    serve.run(s, sock, drain_timeout_s=args.drain_timeout, log_level="warning" if quiet else "info")


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = EngineOptions.from_args(args)
    from dynaexq_jax.runtime import compile_cache, host_memory

    host_memory.reuse_freed_memory()
    compile_cache.enable(opts.model.compile_cache)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            check(args, opts)
            run(args, opts, opts.plan.budget_bytes())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
