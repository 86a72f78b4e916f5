"""Generate text with a Mixture-of-Experts checkpoint (any family `models.registry` lists).

    python scripts/generate.py --prompt "def fibonacci(n):" --max-new-tokens 64
    python scripts/generate.py --model DIR --prompt a --prompt b --temperature 0.7 --top-p 0.9 --json
    python scripts/generate.py --model DIR --budget 20GB --dry-run        # does it fit? reads config.json only
    python scripts/generate.py --model DIR --system "Be brief." --interactive
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import jax

from dynaexq_jax.cli import show_warning
from dynaexq_jax.errors import UserError
from dynaexq_jax.launch.engine import Loaded, check_hotness, check_vocab, load_engine, read_model
from dynaexq_jax.launch.flags import FlagError, command_parser
from dynaexq_jax.launch.options import EngineOptions, add_engine_flags
from dynaexq_jax.launch.plan import index_check, memory_plan, plan_shape
from dynaexq_jax.launch.prompts import Conversation, Prompter, stdin_lines
from dynaexq_jax.launch.report import run_stats, summary_line, timings_line


def parser():
    p = command_parser(__doc__)
    add_engine_flags(p)  # every flag is the library's: this command adds none of its own
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def check(opts: EngineOptions) -> None:
    """The library's checks, and which flags make sense together for this command."""
    if opts.plan.context is not None and not (opts.plan.dry_run or opts.prompts.interactive):
        raise FlagError("--context applies to --dry-run and --interactive; a run plans what its prompts need")
    if opts.plan.batch is not None and not opts.plan.dry_run:
        raise FlagError("--batch applies to --dry-run; a run's batch is its number of --prompt")
    if opts.prompts.interactive and (opts.output.json or opts.prompts.prompt):
        raise FlagError("--interactive reads messages from stdin; drop --json and --prompt")
    if opts.prompts.interactive and opts.plan.batch not in (None, 1):
        raise FlagError("--interactive holds one conversation; drop --batch")
    opts.check()
    if opts.mesh.size() is not None and opts.prompts.interactive:
        raise FlagError("--interactive does not run on --mesh yet; drop one of them")


def start_processes(opts: EngineOptions) -> None:
    """--coordinator: join the other processes before any backend starts, under a parent process
    that makes the mesh's breaking (another process died) one error line; only process 0 writes
    stdout."""
    from dynaexq_jax.runtime import mesh, supervise

    m = opts.mesh
    if m.coordinator is None:
        if m.num_processes != 1 or m.process_id != 0:
            raise FlagError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if m.mesh is None:
        raise FlagError("--coordinator joins processes into one --mesh; pass --mesh expert=N over all their devices")
    if opts.policy.save_hotness:  # each process learns only its own devices' experts
        raise FlagError("--save-hotness does not run across processes yet; drop it or --coordinator")
    supervise.supervise(m.process_id, m.num_processes, m.coordinator)
    mesh.start_distributed(m.coordinator, m.num_processes, m.process_id, m.distributed_timeout)
    if m.process_id != 0:
        silence_stdout()
    else:  # gloo's C++ logs to file descriptor 1: send those to stderr, keep stdout for the output
        sys.stdout.flush()
        out = os.dup(sys.stdout.fileno())
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = os.fdopen(out, "w")


def dry_run(opts: EngineOptions, budget_bytes) -> dict:
    from dynaexq_jax.models import registry

    cfg = registry.read_config(opts.model.model)  # a missing directory is a one-line ConfigError
    check = index_check(Path(opts.model.model), cfg)
    plan, text = memory_plan(opts, cfg, plan_shape(opts, cfg), budget_bytes)
    if opts.output.json:
        print(json.dumps({"memory_plan": plan.as_dict()}))
    else:
        print(text)
        if check:
            print(check)
    return {"memory_plan": plan.as_dict()}


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


def load(opts: EngineOptions, budget_bytes, cfg, shape, request=None) -> Loaded:
    log = (lambda line: print(line, file=sys.stderr)) if opts.output.verbose else None
    return load_engine(opts, budget_bytes, cfg, shape, progress=opts.output.progress(), log=log, request=request)


def report(opts: EngineOptions, stats: dict, suffix: str = "") -> None:
    if not opts.output.quiet:
        print(summary_line(stats) + suffix, file=sys.stderr)
    if opts.output.verbose:
        print(timings_line(stats), file=sys.stderr)


def run(opts: EngineOptions, budget_bytes) -> dict:
    from dynaexq_jax.io import loader
    from dynaexq_jax.runtime import engine

    model, cfg, tok = read_model(opts.model)
    check_hotness(opts.policy, cfg)
    prompter = Prompter(opts.prompts, model, tok)
    prompts = opts.prompts.prompt or ["def "]
    ids = [prompter.encode(p) for p in prompts]
    if min(map(len, ids)) == 0:
        raise FlagError("every prompt needs at least one token; pass a non-empty --prompt")
    check_vocab(ids, cfg, model)
    new = opts.sampling.max_new_tokens
    engine.check_request(cfg, ids, new)  # a prompt over the context, before any budget message
    shape = plan_shape(opts, cfg, [len(i) for i in ids])
    # The request's steps compile from shapes while the experts convert.
    request = engine.Request(*shape, opts.sampling.params(), prompter.stop_ids(loader.read_eos(model)))
    eng, plan, ckpt, load_s = load(opts, budget_bytes, cfg, shape, request)

    streaming = not opts.output.json and len(prompts) == 1
    # A chat reply is printed alone; raw completions continue the echoed prompt.
    on_tokens = Streamer(tok, "" if prompter.template else prompts[0]) if streaming else None
    try:
        gen = eng.generate(ids, new, opts.sampling.params(), prompter.stop_ids(ckpt.eos_token_ids),
                           on_tokens=on_tokens)
    except KeyboardInterrupt:
        if streaming and on_tokens.started:
            print(flush=True)  # what was streamed stays, ended by a newline
        raise
    outputs = [{"prompt": p, "token_ids": t, "text": tok.decode(t, skip_special_tokens=True)}
               for p, t in zip(prompts, gen.tokens)]
    stats = run_stats(opts, gen.stats, plan, budget_bytes, load_s)
    if opts.mesh.coordinator:  # each process's own figure in its closing line
        stats["checkpoint_bytes_read"] = ckpt.bytes_read
    if opts.policy.save_hotness:
        try:
            eng.policy.tracker.save(opts.policy.save_hotness)
        except OSError as e:  # checked writable at the start; the disk may have filled since
            raise FlagError(f"--save-hotness {opts.policy.save_hotness}: {e.strerror}; free space there") from None
    if opts.output.json:
        print(json.dumps({"outputs": outputs, "stats": stats}))
    elif streaming:
        on_tokens.finish()
    else:
        for i, o in enumerate(outputs):
            print(f"--- [{i}] {o['prompt']}{o['text']}")
    report(opts, stats)
    return {"outputs": outputs, "stats": stats}


def interactive(opts: EngineOptions, budget_bytes, stdin=None) -> list[dict]:
    """Converse on stdin: each line is a user message; the reply streams to stdout and one
    summary line per turn goes to stderr. Ctrl-C stops a reply and drops its turn; a turn over
    the context drops the oldest turns (or, alone too long, is not sent). Returns the turns' stats."""
    stdin = stdin or sys.stdin
    knobs = opts.sampling.params()
    model, cfg, tok = read_model(opts.model)
    check_hotness(opts.policy, cfg)
    prompter = Prompter(opts.prompts, model, tok)
    shape = plan_shape(opts, cfg)
    eng, plan, ckpt, load_s = load(opts, budget_bytes, cfg, shape)
    _, chunk, rest = shape
    context, new = chunk + rest, opts.sampling.max_new_tokens
    session = eng.new_session(context, chunk)
    stop = prompter.stop_ids(ckpt.eos_token_ids)
    convo = Conversation(prompter)
    turns = []
    for line in stdin_lines(stdin):
        user = line.rstrip("\r\n")
        if not user.strip():
            continue
        fitted = convo.fit(user, context - new)  # the messages' share of the context
        if fitted is None:
            print(f"note: this message is over the context ({context} tokens, {new} of them for "
                  "the reply) on its own; not sent (shorten it, or raise --context)", file=sys.stderr)
            continue
        ids, dropped = fitted
        check_vocab([ids], cfg, model)
        if dropped:
            print(f"note: the context ({context} tokens) is full; dropped the {dropped} oldest turn(s)",
                  file=sys.stderr)
        try:
            streamer = Streamer(tok)
            gen = eng.chat_turn(session, ids, new, knobs, stop, on_tokens=streamer)
        except KeyboardInterrupt:
            print(flush=True)
            print("note: interrupted; the turn is dropped", file=sys.stderr)
            continue
        streamer.finish()
        convo.turns.append((user, gen.tokens[0]))
        stats = run_stats(opts, gen.stats, plan, budget_bytes, load_s)
        turns.append(stats)
        report(opts, stats, f" | reused {stats['reused_tokens']} cached tok")
    return turns


def main(argv=None) -> int:
    opts = EngineOptions.from_args(parse_args(argv))
    from dynaexq_jax.runtime import compile_cache, host_memory

    host_memory.reuse_freed_memory()
    compile_cache.enable(opts.model.compile_cache)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            check(opts)
            budget_bytes = opts.plan.budget_bytes()
            if opts.plan.dry_run:
                dry_run(opts, budget_bytes)
                return 0
            start_processes(opts)
            if opts.prompts.interactive:
                interactive(opts, budget_bytes)
            else:
                run(opts, budget_bytes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        if opts.mesh.coordinator:  # a collective failed: another process is gone (the parent prints why)
            from dynaexq_jax.runtime import supervise

            supervise.lose(e)
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a reply of --interactive
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `generate.py ... | head`: the reader is gone; leave quietly
        silence_stdout()
        return 141
    return 0


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush raises no second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (captured in tests)
        pass
