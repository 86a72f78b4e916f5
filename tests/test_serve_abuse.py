"""The server under load and abuse, against a live server on loopback (uvicorn on a thread, the
shipped tiny model, float32, greedy, an API key): bad requests are 4xx OpenAI error objects and
the server keeps serving; clients that hang up leak nothing; a full queue is 429; strangers get
401; stop strings and stop ids are each request's own. SIGTERM's drain runs scripts/serve.py in
its own process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import http.client as http_client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

import jax.numpy as jnp
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from dynaexq_jax import serve  # noqa: E402
from dynaexq_jax.cli import serve as serve_cli  # noqa: E402
from dynaexq_jax.errors import UserError  # noqa: E402
from dynaexq_jax.io import loader  # noqa: E402
from dynaexq_jax.runtime.build import build_engine  # noqa: E402
from dynaexq_jax.runtime.scheduler import Sequence  # noqa: E402

from conftest import ROOT, SHIPPED, free_port  # noqa: E402

MAX_BATCH, CONTEXT, CHUNK, MAX_BODY = 16, 256, 16, 64_000
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = "the quick brown fox jumps over the lazy dog def f ( x ) : return x + 1".split()


@pytest.fixture(scope="module")
def live(shipped_chat_checkpoint):
    """(base url, Served) of a server on a thread, behind an API key."""
    ckpt = loader.load(shipped_chat_checkpoint, jnp.float32)
    eng, _ = build_engine(ckpt, "full", budget=None,
                          **serve.engine_shape(max_batch=MAX_BATCH, context=CONTEXT, max_chunk=CHUNK))
    s = serve.served(eng, max_batch=MAX_BATCH, context=CONTEXT, max_chunk=CHUNK, max_queue=32, api_key=KEY,
                     max_body=MAX_BODY)
    sock = serve.bind("127.0.0.1", 0)
    server = serve.server.Server(uvicorn.Config(serve.make_app(s), log_level="warning"), s, drain_timeout_s=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", s
    server.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def http(live):
    """One keep-alive connection for the whole module: a dropped connection fails the next request."""
    with httpx.Client(base_url=live[0], headers=AUTH, timeout=120) as client:
        yield client


def metrics(http) -> dict[str, float]:
    lines = [line.rsplit(" ", 1) for line in http.get("/metrics").text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in lines}


def wait_idle(http, within_s: float = 5.0) -> dict[str, float]:
    """/metrics once no sequence runs and none is queued (fails after `within_s`)."""
    deadline = time.time() + within_s
    while True:
        m = metrics(http)
        if m["dynaexq_running_sequences"] == 0 and m["dynaexq_queue_depth"] == 0:
            return m
        assert time.time() < deadline, f"still {m['dynaexq_running_sequences']} running, " \
                                       f"{m['dynaexq_queue_depth']} queued after {within_s} s"
        time.sleep(0.02)


def complete(http, prompt, max_tokens, **kw) -> dict:
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def events(lines) -> list:
    """A stream's events (dicts, and "[DONE]")."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


CHAT = "/v1/chat/completions"
BAD = [  # (endpoint, body: bytes or JSON, status, words of the message)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "surrogate"),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400, "nests too deeply"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "' + b"x" * MAX_BODY + b'"}', 413, "exceeds this server's limit"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt must be"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt must be"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens must be >= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, 400, "exceed the server's context"),
    ("/v1/completions", {"prompt": "x " * 300}, 400, "exceed the server's context"),
    ("/v1/completions", {"prompt": [1, 2, 4096]}, 400, "token ids must be in [0, 4096)"),
    ("/v1/completions", {"prompt": [-1]}, 400, "token ids must be in"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**40}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop must be"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n must be 1"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias is not supported"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, 400, "no alternatives"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    (CHAT, {}, 400, "messages must be"),
    (CHAT, {"messages": []}, 400, "messages must be"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "content must be"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "only text content parts"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {}}}]}, 400, "tools"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("endpoint, body, status, needle", BAD, ids=range(len(BAD)))
def test_a_bad_request_is_a_4xx_error_object_and_the_server_keeps_serving(live, http, endpoint, body, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = http.post(endpoint, headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert complete(http, "x", 2)["usage"]["completion_tokens"] == 2


def test_a_wrong_path_or_method_is_an_error_object_too(http):
    for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/embeddings", 404)):
        r = http.request(method, path)
        assert r.status_code == status and path in r.json()["error"]["message"]


def test_fields_that_ask_for_nothing_are_accepted(http):
    out = complete(http, "def f", 3, logit_bias={}, tools=[], presence_penalty=0, n=1, best_of=1, echo=False,
                   response_format={"type": "text"}, user="someone")
    assert out["usage"]["completion_tokens"] == 3


def stream_lines(url, body, hang_up: bool, first: threading.Event | None = None):
    """One streamed completion's lines (all, or up to the first chunk when `hang_up`) and its
    status; `first` is set at its first chunk."""
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data: ") and first is not None:
                first.set()
            if hang_up and line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream
        return r.status_code, lines


async def _stream_async(client, body, hang_up: bool):
    async with client.stream("POST", "/v1/completions", json=body) as r:
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if hang_up and line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream
        return r.status_code, lines


def test_32_streams_a_third_hanging_up_leak_nothing_and_the_rest_equal_their_solo_outputs(live, http, monkeypatch):
    url, s = live
    alive = weakref.WeakSet()  # every request's Sequence, while anything holds it

    class Tracked(Sequence):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            alive.add(self)

    monkeypatch.setattr(serve.app, "Sequence", Tracked)
    rows = [(" ".join(WORDS[: 2 + 2 * i]), 12 + 2 * i) for i in range(8)]  # (prompt, max_tokens)
    solo = [complete(http, p, n)["choices"][0]["text"] for p, n in rows]
    clients = [(rows[i % 8], i % 3 == 0) for i in range(32)]  # a third hang up after their first chunk
    before = metrics(http).get('dynaexq_requests_finished_total{reason="cancelled"}', 0)

    async def rounds(n):
        """`n` rounds of the 32 clients at once (one event loop, one connection pool: the client's
        own memory settles), and after each (resident bytes, compiled steps, live sequences)."""
        seen = []
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120, limits=limits) as client:
            for _ in range(n):
                results = await asyncio.gather(*(_stream_async(client, {
                    "prompt": p, "max_tokens": m, "temperature": 0, "stream": True}, hang_up)
                    for (p, m), hang_up in clients))
                m = wait_idle(http)  # within seconds of the last stream: nothing running, nothing queued
                gc.collect()
                seen.append((m["process_resident_memory_bytes"], m["dynaexq_compiled_steps"], len(alive)))
                for ((prompt, n), hung_up), (status, lines) in zip(clients, results):
                    assert status == 200
                    if hung_up:
                        continue
                    ev = events(lines)
                    assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] in ("stop", "length")
                    text = "".join(e["choices"][0]["text"] for e in ev[:-1] if e["choices"])
                    assert text == solo[rows.index((prompt, n))]
        return seen

    seen = asyncio.run(rounds(3))
    rss = [r for r, _, _ in seen]
    cancelled = metrics(http)['dynaexq_requests_finished_total{reason="cancelled"}'] - before
    assert [c for _, c, _ in seen] == [seen[0][1]] * 3  # no step compiled after the first round
    assert [n for _, _, n in seen] == [0] * 3  # no sequence outlives its request
    assert cancelled >= 3 * 11 / 2  # most hang-ups came before their sequence's end, and freed its row
    # Flat after the first round (scripts/bench_serve_abuse.py holds it over minutes of this traffic).
    assert max(rss[1:]) - rss[1] < 8e6, f"resident memory grew over the rounds: {[round(r / 1e6) for r in rss]} MB"


def test_past_max_queue_a_request_gets_429_with_retry_after(live, http):
    _, s = live
    sch = s.scheduler
    bound = sch.max_queue
    held = [sch.submit(Sequence([5, 6, 7], CONTEXT - 8)) for _ in range(MAX_BATCH)]  # every row
    try:
        deadline = time.time() + 30
        while sch.running < MAX_BATCH or sch.queued:
            assert time.time() < deadline
            time.sleep(0.01)
        sch.max_queue = 2
        held += [sch.submit(Sequence([5, 6, 7], CONTEXT - 8)) for _ in range(2)]  # and a full queue
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "retry later" in r.json()["error"]["message"]
    finally:
        sch.max_queue = bound
        for seq in held:
            seq.cancel()
    wait_idle(http)
    assert all(seq.finish_reason in ("cancelled", "length") for seq in held)


def test_a_client_that_does_not_read_stalls_no_other_row(live, http):
    url, _ = live
    n = CONTEXT // 2
    body = json.dumps({"prompt": "def f(x):", "max_tokens": n, "temperature": 0, "stream": True,
                       "logprobs": 0}).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes back up
    slow.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while metrics(http)["dynaexq_running_sequences"] < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: complete(http, " ".join(WORDS[:i + 1]), 16), range(8)))
        assert all(o["usage"]["completion_tokens"] == 16 for o in outs)
        wait_idle(http, 30)  # the unread stream's sequence ended too: its tokens wait for the client, not a row
        reply = http_client.HTTPResponse(slow)  # now read it all
        reply.begin()
        lines = reply.read().decode().splitlines()
    finally:
        slow.close()
    ev = events(lines)
    assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] == n
    text = "".join(e["choices"][0]["text"] for e in ev[:-1] if e["choices"])
    assert text == complete(http, "def f(x):", n)["choices"][0]["text"]


def test_without_the_key_requests_get_401_and_health_stays_open(live):
    url, s = live
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/metrics", headers=headers).status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [s.model]


def test_stop_strings_and_stop_ids_are_each_requests_own(live, http):
    _, s = live
    tok = s.tokenizer
    prompt, n = "def fibonacci(n):", 32
    ids = tok.encode(prompt).ids
    ref = s.scheduler.submit(Sequence(ids, n))
    assert ref.done.wait(60)
    text = tok.decode(ref.tokens, skip_special_tokens=True)
    # A stop string from inside token t to inside token t + 2 (token t + 1 whole between).
    ends = [len(tok.decode(ref.tokens[:i], skip_special_tokens=True)) for i in range(len(ref.tokens) + 1)]
    t = next(t for t in range(2, len(ref.tokens) - 3) if ends[t + 1] - ends[t] >= 2 and ends[t + 3] - ends[t + 2] >= 2)
    across = text[ends[t + 1] - 1:ends[t + 2] + 1]
    stop_id = ref.tokens[5]
    asks = [{"stop": [across]}, {"stop_token_ids": [stop_id]}, {},
            {"stop": ["~" * 300, "\x00never", "@@@", across[1:]]}]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        outs = list(pool.map(lambda kw: complete(http, prompt, n, **kw)["choices"][0], asks))
    assert outs[0]["text"] == text[:text.index(across)]
    assert (outs[0]["finish_reason"], outs[0]["stop_reason"]) == ("stop", across)
    k = ref.tokens.index(stop_id)
    assert outs[1]["text"] == tok.decode(ref.tokens[:k + 1], skip_special_tokens=True)  # the stop id's own text kept
    assert (outs[1]["finish_reason"], outs[1]["stop_reason"]) == ("stop", stop_id)
    assert outs[2]["text"] == text and outs[2]["stop_reason"] is None
    assert outs[2]["finish_reason"] == ("stop" if ref.finish_reason == "stop" else "length")
    assert outs[3]["text"] == text[:text.index(across[1:])] and outs[3]["stop_reason"] == across[1:]
    streamed = events(stream_lines(live[0], {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                                             "stop": across}, hang_up=False)[1])
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1] if e["choices"]) == outs[0]["text"]
    last = streamed[-2]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", across) and streamed[-1] == "[DONE]"


# ---------------------------------------------------------------------------------------- the command


def test_the_default_bind_is_loopback_and_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DYNAEXQ_API_KEY", raising=False)
    assert serve_cli.parse_args([]).host == "127.0.0.1" and serve_cli.parse_args([]).api_key is None
    monkeypatch.setenv("DYNAEXQ_API_KEY", "from-env")
    assert serve_cli.parse_args([]).api_key == "from-env"
    assert serve_cli.parse_args(["--api-key", "flag"]).api_key == "flag"


def _no_load(*args, **kw):
    raise UserError("the model would load now")


def test_listening_beyond_loopback_without_a_key_warns(monkeypatch, capsys):
    monkeypatch.delenv("DYNAEXQ_API_KEY", raising=False)
    monkeypatch.setattr(serve_cli, "load_and_serve", _no_load)
    assert serve_cli.main(["--model", str(SHIPPED), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: listening on 0.0.0.0:") and "without --api-key" in err[0]
    assert err[1:] == ["error: the model would load now"]
    for argv in (["--host", "127.0.0.1"], ["--host", "0.0.0.0", "--api-key", "k"]):
        assert serve_cli.main(["--model", str(SHIPPED), "--port", str(free_port()), *argv]) == 2
        assert capsys.readouterr().err == "error: the model would load now\n"


@pytest.mark.parametrize("where, needle", [
    (["--host", "no-such-host.invalid"], "does not resolve"),
    (["--host", "192.0.2.1"], "not an address of this machine"),
    (["--port", "busy"], "is in use"),
])
def test_a_bad_host_or_a_busy_port_is_one_error_line_before_any_weight_is_read(monkeypatch, capsys, where, needle):
    monkeypatch.setattr(serve_cli, "load_and_serve", _no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = [str(taken.getsockname()[1]) if w == "busy" else w for w in where]
        rc = serve_cli.main(["--model", str(SHIPPED), "--port", str(free_port()), *where])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_sigterm_drains_streams_in_flight_then_exits_0():
    """scripts/serve.py in its own process: SIGTERM while two streams run. New requests get 503;
    the short stream finishes, the long one is ended at --drain-timeout; both end with a chunk that
    carries the finish_reason, then [DONE]; the process exits 0."""
    port, context, drain_s = free_port(), 1024, 2
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(SHIPPED), "--dtype", "float32",
         "--policy", "full", "--max-batch", "2", "--context", str(context), "--prefill-chunk", "16", "--port",
         str(port), "--no-warm-up", "--no-compile-cache", "--quiet", "--drain-timeout", str(drain_s)],
        env=dict(os.environ, PYTHONPATH=str(ROOT), DYNAEXQ_API_KEY=KEY), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            complete(http, "def f", 2)  # compiles the steps
            # The long one would run ~1000 decode steps, far past the drain; the short one 12, well within it.
            bodies = [{"prompt": "def f(x):", "max_tokens": n, "temperature": 0, "stream": True} for n in (1000, 12)]
            started = [threading.Event(), threading.Event()]
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                pending = []
                for body, first in zip(bodies, started):
                    pending.append(pool.submit(stream_lines, url, body, False, first))
                    assert first.wait(60), "no first chunk"
                proc.send_signal(signal.SIGTERM)
                t0 = time.time()
                while httpx.get(url + "/health").status_code != 503:
                    assert time.time() - t0 < 10, "SIGTERM did not start the drain"
                    time.sleep(0.01)
                refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers["Retry-After"]
                assert refused.json()["error"]["code"] == "shutting_down"
                (l_status, l_lines), (s_status, s_lines) = (p.result(60) for p in pending)
        assert proc.wait(30) == 0, proc.stderr.read()
        assert time.time() - t0 < drain_s + 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    short_ev, long_ev = events(s_lines), events(l_lines)
    assert s_status == l_status == 200 and short_ev[-1] == long_ev[-1] == "[DONE]"
    assert short_ev[-2]["choices"][0]["finish_reason"] == "length" and short_ev[-2]["usage"]["completion_tokens"] == 12
    assert long_ev[-2]["choices"][0]["finish_reason"] == "abort"
    assert 1 < long_ev[-2]["usage"]["completion_tokens"] < 1000
