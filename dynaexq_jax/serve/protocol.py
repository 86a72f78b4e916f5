"""The OpenAI API's request fields, checked, and its response objects.

A request's JSON becomes a `Params` (or an `ApiError`, the OpenAI-style error object with its
HTTP status); the scheduler's `Sequence` becomes a completion or chat completion object, or
the chunks of its stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

from dynaexq_jax.errors import UserError
from dynaexq_jax.runtime.sampling import SamplingParams


class ApiError(Exception):
    """An error the client gets as {"error": {...}} with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
    """What a request asks for, checked."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The server's values for fields a request leaves out (from its flags)."""

    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams()  # temperature, top_k, top_p, seed


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (kind is int and not float(value).is_integer())):
        raise ApiError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=name)
    value = kind(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(f"{name} must be {bounds}, got {value!r}", param=name)
    return value


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(f"the model {model!r} does not exist here; this server serves {served!r}", param="model",
                       code="model_not_found")


def parse_params(body: dict, ids: list[int], defaults: Defaults, chat: bool, limit: int) -> Params:
    """The generation fields shared by both endpoints. `limit`: a sequence's tokens, prompt and
    reply; a request without max_tokens gets the default or what is left of it, if less."""
    n = _number(body, "n", 1, int)
    if n != 1:
        raise ApiError(f"n must be 1 (one choice per request), got {n}", param="n")
    # OpenAI's max_tokens; chat's newer name is max_completion_tokens.
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, max(1, min(defaults.max_tokens, limit - len(ids))), int, low=1)
    temperature = _number(body, "temperature", defaults.sampling.temperature, float, low=0.0, high=2.0)
    top_p = _number(body, "top_p", defaults.sampling.top_p, float, low=0.0, high=1.0)
    if top_p == 0.0:
        raise ApiError("top_p must be in (0, 1], got 0", param="top_p")
    top_k = _number(body, "top_k", defaults.sampling.top_k, int, low=-1)
    seed = _number(body, "seed", defaults.sampling.seed, int, low=-(2**63), high=2**63 - 1)
    try:
        sampling = SamplingParams(temperature, max(top_k, 0), top_p, seed)  # -1 = off, as vLLM takes it
    except UserError as e:
        raise ApiError(str(e)) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a non-empty string or a list of at most 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    return Params(ids, max_tokens, sampling, stop, stream, bool(options.get("include_usage")),
                  _parse_logprobs(body, chat))


def _parse_logprobs(body: dict, chat: bool) -> bool:
    """Only the chosen token's log-probability is computed (no alternatives)."""
    if chat:
        want = body.get("logprobs") or False
        if not isinstance(want, bool):
            raise ApiError("logprobs must be true or false", param="logprobs")
        top = body.get("top_logprobs")
        if top not in (None, 0):
            raise ApiError("top_logprobs must be 0: this server returns the chosen token's log-probability only",
                           param="top_logprobs")
        return want
    want = body.get("logprobs")
    if want is None:
        return False
    if isinstance(want, bool) or not isinstance(want, int) or want != 0:
        raise ApiError("logprobs must be 0 (the chosen token's log-probability; no alternatives), or absent",
                       param="logprobs")
    return True


def completion_prompt(body: dict) -> str | list[int]:
    """A completion's prompt: one string, or one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError("prompt must be a non-empty string or list of token ids (one prompt per request)", param="prompt")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError("each message needs a role of system, user or assistant", param="messages")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError("only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError("a message's content must be a string or a list of text parts", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def logprobs_object(tokens: list[str], logprobs: list[float], offset: int, chat: bool) -> dict:
    """The chosen tokens' log-probabilities as each endpoint shapes them."""
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)]}
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def response(chat: bool, rid: str, model: str, text: str, finish: str, use: dict, logprobs) -> dict:
    choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, created: int, text: str | None, finish: str | None, use=None,
          logprobs=None, role: bool = False) -> dict:
    """One stream event; `text` None: a chunk with no choice (the usage one)."""
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": []}
    if text is not None:
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        else:
            choice["text"] = text
        out["choices"].append(choice)
    if use is not None:
        out["usage"] = use
    return out
