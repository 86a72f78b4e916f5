"""The OpenAI-compatible HTTP app over a running `Scheduler` (Starlette; uvicorn serves it).

    POST /v1/completions  POST /v1/chat/completions  GET /v1/models  GET /health  GET /metrics

Each request becomes a `Sequence` in the scheduler's queue; its tokens come back on the
scheduler's thread, are turned into text there (stop strings end the sequence at once) and
handed to the request's asyncio queue, which never blocks the scheduler: a client that reads
slowly holds only its own tokens. A client that goes away cancels its sequence, which frees its
row at the next step. Whatever a request gets wrong is an OpenAI error object with a 4xx status
(413 past `Served.max_body` bytes, 401 without the API key when one is set); a full queue is 429
and a draining server 503, both with Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
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
    api_key: str | None = None  # requests must carry `Authorization: Bearer <api_key>` (all but /health)
    max_body: int = 4_000_000  # bytes of a request body; past it: 413
    retry_after_s: int = 1  # the Retry-After of a 429 or 503
    rejected: dict = dataclasses.field(default_factory=lambda: {"bad_request": 0, "queue_full": 0, "closed": 0,
                                                                "unauthorized": 0, "too_large": 0})
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


async def _read(request: Request, limit: int) -> bytes:
    """The body, read up to `limit` bytes (an ApiError 413 past it, before more is held)."""
    too_large = ApiError(f"the request body exceeds this server's limit of {limit} bytes; send a shorter prompt",
                         413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _body(request: Request, served: Served) -> dict:
    body = protocol.parse_json(await _read(request, served.max_body))
    protocol.check_model(body, served.model)
    protocol.check_unsupported(body)
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


def _error(e: ApiError, served: Served) -> JSONResponse:
    retry = {"Retry-After": str(served.retry_after_s)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=retry)


async def _handle(request: Request, chat: bool) -> Response:
    served: Served = request.app.state.served
    try:
        body = await _body(request, served)
        ids = _encode_chat(served, body) if chat else _encode_completion(served, body)
        params = protocol.parse_params(body, ids, served.defaults, chat, served.scheduler.limit)
        events = _Events(served, params)
        seq = Sequence(ids, params.max_tokens, params.sampling, events.on_update, params.stop_token_ids)
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
    except ClientDisconnect:  # gone before its body arrived: nobody to answer
        return Response(status_code=499)
    except ApiError as e:
        if e.status in (400, 404):
            served.rejected["bad_request"] += 1
        elif e.status == 413:
            served.rejected["too_large"] += 1
        return _error(e, served)
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
                                          _stop_reason(seq, events), protocol.usage(len(seq.ids), len(seq.tokens)),
                                          lp))


def _finish(reason: str) -> str:
    """OpenAI's finish_reason: "stop" or "length"; "abort" (vLLM's word) when a drain's deadline ended it."""
    return reason if reason in ("length", "abort") else "stop"


def _stop_reason(seq: Sequence, events: _Events):
    """What stopped it, as vLLM reports it: the stop string, the request's stop id, or None
    (an end-of-sequence id, or not stopped)."""
    return events.text.matched if events.text.matched is not None else seq.stop_token


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
                yield _sse(protocol.chunk(chat, rid, served.model, created, "", _finish(finish), use=use,
                                          stop_reason=_stop_reason(seq, events)))
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


class _ApiKey:
    """Every request but /health must carry `Authorization: Bearer <key>` (else 401, as OpenAI's)."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served
        self.expected = f"Bearer {served.api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.served.rejected["unauthorized"] += 1
                e = ApiError("a valid API key is needed: send the header Authorization: Bearer <key>", 401,
                             code="invalid_api_key")
                await JSONResponse(e.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such path, a method the path does not take) as error objects too."""
    e = ApiError(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code)
    return JSONResponse(e.body(), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A bug's 500, still an OpenAI error object (the traceback goes to the server's log)."""
    return JSONResponse(ApiError(f"internal error: {exc!r}", 500, kind="server_error").body(), status_code=500)


async def drain(served: Served, timeout_s: float) -> None:
    """Take no new request (503 with Retry-After), let the queued and running ones finish for up to
    `timeout_s` seconds, then end the rest ("abort"): their streams still end with a chunk that
    carries the finish_reason, then [DONE]. Returns when the scheduler holds none."""
    sch = served.scheduler
    sch.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while sch.running or sch.queued:
        if loop.time() >= deadline:
            sch.abort("abort")
            deadline = float("inf")
        await asyncio.sleep(0.02)


def make_app(served: Served) -> Starlette:
    """The app; its lifespan starts the scheduler's loop, and on shutdown (after the server has
    drained, `drain`) stops it."""
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
    ], lifespan=lifespan, middleware=[Middleware(_ApiKey, served=served)] if served.api_key else [],
        exception_handlers={HTTPException: _http_error, Exception: _unexpected})
    app.state.served = served
    return app
