"""An OpenAI-compatible server with continuous batching (`pip install -e ".[serve]"`).

    import dynaexq_jax as dx
    from dynaexq_jax import serve

    ckpt = dx.load("checkpoints/tiny-qwen3-moe")
    # The plan holds max_batch rows of `context` tokens, prefilled in chunks of max_chunk:
    eng, plan = dx.build_engine(ckpt, "dynaexq", budget=dx.parse_size("100MB"),
                                **serve.engine_shape(max_batch=16, context=1024, max_chunk=64))
    serve.serve(eng, port=8000, max_batch=16, context=1024, max_chunk=64)   # until SIGTERM / Ctrl-C

`make_app(served(eng, ...))` is the ASGI app itself, for one's own uvicorn or tests (`drain`
is its graceful stop); `bind` + `run` are `serve` in two steps (scripts/serve.py binds before it
loads the model).
"""

from __future__ import annotations

from dynaexq_jax.errors import UserError
from dynaexq_jax.runtime.scheduler import Scheduler, engine_shape
from dynaexq_jax.serve.app import Served, drain, make_app
from dynaexq_jax.serve.protocol import Defaults
from dynaexq_jax.serve.server import bind, run


def served(engine, *, max_batch: int, context: int, max_chunk: int = 64, max_queue: int = 64,
           model_name: str | None = None, chat: bool = True, system: str | None = None,
           template_kwargs: dict | None = None, defaults=None, api_key: str | None = None,
           max_body: int = Served.max_body):
    """The scheduler (not yet started) and what the app needs around it. `chat`: render chat
    requests with the checkpoint's template (its end-of-turn token stops every sequence).
    `api_key`: requests must carry it as a bearer token; `max_body`: bytes of a request body."""
    from pathlib import Path

    from dynaexq_jax.io import chat as chat_lib

    ckpt = engine.checkpoint
    tok = ckpt.tokenizer
    if tok is None:
        raise UserError(f"{ckpt.path} has no tokenizer.json, so requests' text cannot be encoded")
    template = chat_lib.load_chat_template(ckpt.path) if chat else None
    eos = set(ckpt.eos_token_ids)
    end = template.special_tokens.get("eos_token") if template is not None else None
    if end and tok.token_to_id(end) is not None:
        eos.add(tok.token_to_id(end))
    sch = Scheduler(engine, max_batch=max_batch, context=context, max_chunk=max_chunk, max_queue=max_queue,
                    eos_token_ids=eos)
    return Served(sch, tok, model_name or Path(ckpt.path).name, template, template_kwargs or {}, system,
                  defaults or Defaults(), api_key, max_body)


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, warm_up: bool = True, log_level: str = "info",
          drain_timeout_s: float = 30.0, **kw) -> None:
    """Serve `engine` until SIGTERM or Ctrl-C, which drain: new requests get 503, running ones
    finish within `drain_timeout_s` (the rest end with finish_reason "abort"), then it returns.
    `kw`: `served`'s."""
    sock = bind(host, port)
    s = served(engine, **kw)
    if warm_up:
        s.scheduler.warm_up()
    run(s, sock, drain_timeout_s=drain_timeout_s, log_level=log_level)


__all__ = ["Defaults", "Served", "bind", "drain", "engine_shape", "make_app", "run", "serve", "served"]
