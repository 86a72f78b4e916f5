"""The OpenAI-compatible HTTP app over a running `Scheduler` (Starlette; uvicorn serves it).

    POST /v1/completions  POST /v1/chat/completions  GET /v1/models  GET /health  GET /metrics

Each request becomes a `Sequence` in the scheduler's queue; its tokens come back on the
scheduler's thread, are turned into text there (stop strings end the sequence at once) and
handed to the request's asyncio queue. A client that goes away cancels its sequence, which
frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from dynaexq_jax.errors import UserError
from dynaexq_jax.runtime.scheduler import Closed, QueueFull, Scheduler, Sequence
from dynaexq_jax.serve import metrics, protocol
from dynaexq_jax.serve.protocol import ApiError
from dynaexq_jax.serve.text import TextStream


@dataclasses.dataclass
class Served:
    """What the app serves: the scheduler, the model's tokenizer and chat template, its name."""

    scheduler: Scheduler
    tokenizer: object  # tokenizers.Tokenizer
    model: str
    template: object | None = None  # io.chat.ChatTemplate
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. enable_thinking
    system: str | None = None  # a system message for chats that bring none
    defaults: protocol.Defaults = protocol.Defaults()
    rejected: dict = dataclasses.field(default_factory=lambda: {"bad_request": 0, "queue_full": 0, "closed": 0})
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class _Events:
    """A sequence's updates, from the scheduler's thread into the request's event loop."""

    def __init__(self, served: Served, params: protocol.Params):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(served.tokenizer, params.stop)
        self.tokenizer = served.tokenizer
        self.sent_tokens = 0  # tokens whose log-probabilities were handed out

    def on_update(self, seq: Sequence) -> bool:
        """Scheduler thread: turn the tokens into text; True ends the sequence (a stop string)."""
        delta = self.text.update(seq.tokens)
        if seq.finish_reason:
            delta += self.text.flush()
        n = len(seq.tokens)
        new = seq.tokens[self.sent_tokens:n], seq.logprobs[self.sent_tokens:n]
        self.sent_tokens = n
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (delta, new, seq.finish_reason))
        except RuntimeError:  # the event loop is gone (the server stopped): nobody reads this sequence
            seq.cancel()
        return self.text.stopped


async def _body(request: Request, served: Served) -> dict:
    body = protocol.parse_json(await request.body())
    protocol.check_model(body, served.model)
    return body


def _encode_chat(served: Served, body: dict) -> list[int]:
    if served.template is None:
        raise ApiError(f"{served.model} has no chat template; use /v1/completions", code="no_chat_template")
    messages = protocol.chat_messages(body)
    if served.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": served.system}] + messages
    text = served.template.render(messages, add_generation_prompt=True, **served.template_kwargs)
    # The template writes the special tokens itself, as apply_chat_template(tokenize=True).
    return served.tokenizer.encode(text, add_special_tokens=False).ids


def _encode_completion(served: Served, body: dict) -> list[int]:
    prompt = protocol.completion_prompt(body)
    return served.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt


async def _handle(request: Request, chat: bool) -> Response:
    served: Served = request.app.state.served
    try:
        body = await _body(request, served)
        ids = _encode_chat(served, body) if chat else _encode_completion(served, body)
        params = protocol.parse_params(body, ids, served.defaults, chat, served.scheduler.limit)
        events = _Events(served, params)
        seq = Sequence(ids, params.max_tokens, params.sampling, events.on_update)
        try:
            served.scheduler.submit(seq)
        except QueueFull as e:
            served.rejected["queue_full"] += 1
            raise ApiError(str(e), 429, code="queue_full", kind="rate_limit_error") from None
        except Closed as e:
            served.rejected["closed"] += 1
            raise ApiError(str(e), 503, code="shutting_down", kind="server_error") from None
        except UserError as e:  # a prompt over the context, a token id past the vocabulary
            raise ApiError(str(e), code="context_length_exceeded" if "context" in str(e) else None) from None
    except ApiError as e:
        if e.status == 400:
            served.rejected["bad_request"] += 1
        return JSONResponse(e.body(), status_code=e.status)
    rid = protocol.new_id(chat)
    if params.stream:
        return StreamingResponse(_stream(served, seq, events, params, rid, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _complete(request, served, seq, events, params, rid, chat)


async def _complete(request, served, seq, events, params, rid, chat) -> Response:
    texts, tokens, logprobs = [], [], []
    try:
        while True:
            try:
                delta, (new, lps), finish = await asyncio.wait_for(events.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    seq.cancel()
                    return Response(status_code=499)
                continue
            texts.append(delta)
            tokens += new
            logprobs += lps
            if finish:
                break
    except asyncio.CancelledError:
        seq.cancel()
        raise
    if finish == "error":
        return JSONResponse(ApiError(str(seq.error), 500, kind="server_error").body(), status_code=500)
    lp = _logprobs(served, tokens, logprobs, 0, chat) if params.logprobs else None
    return JSONResponse(protocol.response(chat, rid, served.model, "".join(texts), _finish(finish),
                                          protocol.usage(len(seq.ids), len(seq.tokens)), lp))


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _logprobs(served, tokens, logprobs, offset, chat):
    texts = [served.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    return protocol.logprobs_object(texts, logprobs, offset, chat)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(served, seq, events, params, rid, chat):
    created, offset = int(time.time()), 0
    try:
        if chat:  # the role first, as OpenAI sends it
            yield _sse(protocol.chunk(chat, rid, served.model, created, "", None, role=True))
        while True:
            delta, (new, lps), finish = await events.queue.get()
            if finish == "error":
                yield _sse(ApiError(str(seq.error), 500, kind="server_error").body())
                break
            lp = _logprobs(served, new, lps, offset, chat) if params.logprobs and new else None
            offset += len(delta)
            if delta or lp:
                yield _sse(protocol.chunk(chat, rid, served.model, created, delta, None, logprobs=lp))
            if finish:
                use = protocol.usage(len(seq.ids), len(seq.tokens))
                yield _sse(protocol.chunk(chat, rid, served.model, created, "", _finish(finish), use=use))
                if params.include_usage:
                    yield _sse(protocol.chunk(chat, rid, served.model, created, None, None, use=use))
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): its row is freed at the next step
        seq.cancel()


async def completions(request: Request) -> Response:
    return await _handle(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _handle(request, chat=True)


async def models(request: Request) -> Response:
    served: Served = request.app.state.served
    return JSONResponse({"object": "list", "data": [
        {"id": served.model, "object": "model", "created": served.created, "owned_by": "dynaexq"}]})


async def health(request: Request) -> Response:
    sch: Scheduler = request.app.state.served.scheduler
    if sch.error is not None:
        return JSONResponse({"status": "error", "error": repr(sch.error)}, status_code=503)
    if sch.closing:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok", "running": sch.running, "queued": sch.queued})


async def prometheus(request: Request) -> Response:
    served: Served = request.app.state.served
    return PlainTextResponse(metrics.render(served.scheduler, served.rejected),
                             media_type="text/plain; version=0.0.4")


def make_app(served: Served) -> Starlette:
    """The app; its lifespan starts the scheduler's loop, and on shutdown (after uvicorn has let
    running requests finish: SIGTERM drains) stops it."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not served.scheduler.started:
            served.scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, served.scheduler.close)

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.served = served
    return app
