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
    stop_token_ids: frozenset[int]
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(f"the request body is not UTF-8 ({e.reason} at byte {e.start}); send JSON in UTF-8") from None
    try:
        body = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer past Python's 4300 digits
        raise ApiError(f"the request body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise ApiError("the request body nests too deeply; send a plain JSON object") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def _text(value: str, param: str) -> str:
    """A string of the request, checked to be text: JSON's escapes can write lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{param} holds a lone UTF-16 surrogate escape, which is not text; send UTF-8 text",
                       param=param) from None
    return value


# Fields of OpenAI's API this server does not implement: the values that ask for nothing (accepted)
# and what to do instead. Any other value is refused in words, never ignored.
UNSUPPORTED = {
    "logit_bias": (({},), "logit_bias is not supported; leave it out"),
    "tools": (([],), "tools (function calling) are not supported; leave tools out"),
    "functions": (([],), "functions (function calling) are not supported; leave functions out"),
    "tool_choice": (("none", "auto"), "tool_choice: tools are not supported; leave it out"),
    "function_call": (("none", "auto"), "function_call: functions are not supported; leave it out"),
    "presence_penalty": ((0,), "presence_penalty is not supported; leave it out or send 0"),
    "frequency_penalty": ((0,), "frequency_penalty is not supported; leave it out or send 0"),
    "repetition_penalty": ((1,), "repetition_penalty is not supported; leave it out or send 1"),
    "best_of": ((1,), "best_of must be 1 (one sequence per request)"),
    "echo": ((False,), "echo is not supported; leave it out or send false"),
    "suffix": (("",), "suffix (insertion) is not supported; leave it out"),
    "response_format": (({"type": "text"},), 'response_format: only {"type": "text"} is supported'),
    "audio": (({},), "audio output is not supported; leave it out"),
    "modalities": ((["text"],), 'modalities: only ["text"] is supported'),
}


def check_unsupported(body: dict) -> None:
    for name, (nothing, message) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                         for v in nothing):
            raise ApiError(message, param=name, code="unsupported_parameter")


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (kind is int and isinstance(value, float) and not value.is_integer())):
        raise ApiError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=name)
    try:
        value = kind(value)
    except OverflowError:  # an integer past any float, or a float past any integer: out of every range
        value = math.inf
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(f"{name} must be {bounds}, got {value!r}", param=name)
    return value


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(f"the model {model!r} does not exist here; this server serves {served!r}", 404, param="model",
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
    top_k = _number(body, "top_k", defaults.sampling.top_k, int, low=-1, high=2**31 - 1)
    seed = _number(body, "seed", defaults.sampling.seed, int, low=-(2**63), high=2**63 - 1)
    try:
        sampling = SamplingParams(temperature, max(top_k, 0), top_p, seed)  # -1 = off, as vLLM takes it
    except UserError as e:
        raise ApiError(str(e)) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a non-empty string or a list of at most 4 of them", param="stop")
    stop = [_text(s, "stop") for s in stop]
    stop_ids = body.get("stop_token_ids") or []  # vLLM's field: ids that end this request only
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in stop_ids):
        raise ApiError("stop_token_ids must be a list of token ids (integers >= 0)", param="stop_token_ids")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    return Params(ids, max_tokens, sampling, stop, frozenset(stop_ids), stream, bool(options.get("include_usage")),
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
        return _text(prompt, "prompt")
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
            raise ApiError("each message needs a role of system, user or assistant (tool messages are not "
                           "supported)", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                               param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError("a message's content must be a string or a list of text parts", param="messages")
        if m.get("tool_calls"):
            raise ApiError("tool_calls are not supported (no tools)", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _text(content, "messages")})
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


def response(chat: bool, rid: str, model: str, text: str, finish: str, stop_reason, use: dict, logprobs) -> dict:
    """`stop_reason` (as vLLM names it): the stop string or stop id that ended it, else None."""
    choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, created: int, text: str | None, finish: str | None, use=None,
          logprobs=None, role: bool = False, stop_reason=None) -> dict:
    """One stream event; `text` None: a chunk with no choice (the usage one)."""
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": []}
    if text is not None:
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        if chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        else:
            choice["text"] = text
        out["choices"].append(choice)
    if use is not None:
        out["usage"] = use
    return out
