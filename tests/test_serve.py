"""The OpenAI-compatible server with continuous batching, through the official `openai` client
against a live server (uvicorn on a thread) on the shipped tiny model, float32, greedy."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from dynaexq_jax import serve  # noqa: E402
from dynaexq_jax.cli import generate  # noqa: E402
from dynaexq_jax.cli import serve as serve_cli  # noqa: E402
from dynaexq_jax.io import loader  # noqa: E402
from dynaexq_jax.runtime.build import build_engine  # noqa: E402
from dynaexq_jax.runtime.sampling import SamplingParams  # noqa: E402
from dynaexq_jax.runtime.scheduler import Sequence, plan_chunks  # noqa: E402

from conftest import SHIPPED, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

MAX_BATCH, CONTEXT, CHUNK = 16, 256, 16


@pytest.fixture(scope="module")
def model_dir(shipped_chat_checkpoint):
    return shipped_chat_checkpoint


@pytest.fixture(scope="module")
def live(model_dir):
    """(base url, Served, engine, uvicorn server) of a server on a thread."""
    ckpt = loader.load(model_dir, jnp.float32)
    eng, _ = build_engine(ckpt, "full", budget=None,
                          **serve.engine_shape(max_batch=MAX_BATCH, context=CONTEXT, max_chunk=CHUNK))
    s = serve.served(eng, max_batch=MAX_BATCH, context=CONTEXT, max_chunk=CHUNK, max_queue=32)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(serve.make_app(s), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", s, eng, server
    server.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name with labels: value}."""
    lines = [line.rsplit(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in lines}


def run_generate(capsys, model_dir, prompt, n, chat):
    argv = ["--model", str(model_dir), "--dtype", "float32", "--policy", "full", "--prompt", prompt,
            "--max-new-tokens", str(n), "--json", "--quiet", "--no-compile-cache", "--chat" if chat else "--no-chat"]
    assert generate.main(argv) == 0
    return json.loads(capsys.readouterr().out)["outputs"][0]


def test_completion_and_chat_equal_generate_py_streamed_and_not(capsys, live, client, model_dir):
    _, s, _, _ = live
    name = s.model
    ref = run_generate(capsys, model_dir, "def fibonacci(n):", 24, chat=False)
    out = client.completions.create(model=name, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    assert out.choices[0].text == ref["text"]
    assert out.usage.completion_tokens == len(ref["token_ids"])
    assert out.usage.prompt_tokens == len(s.tokenizer.encode("def fibonacci(n):").ids)
    assert out.choices[0].finish_reason == ("stop" if ref["token_ids"][-1] == 0 else "length")
    chunks = list(client.completions.create(model=name, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == len(ref["token_ids"])

    ref = run_generate(capsys, model_dir, "the quick brown fox", 20, chat=True)
    messages = [{"role": "user", "content": "the quick brown fox"}]
    out = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.content == ref["text"] and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == len(ref["token_ids"])
    stream = list(client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref["text"]
    assert stream[-1].usage.completion_tokens == len(ref["token_ids"]) and not stream[-1].choices


def test_stop_strings_logprobs_and_models(live, client):
    _, s, _, _ = live
    full = client.completions.create(model=s.model, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                     logprobs=0)
    text = full.choices[0].text
    lp = full.choices[0].logprobs
    assert len(lp.token_logprobs) == full.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    stop = text[5:8]
    cut = client.completions.create(model=s.model, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=s.model, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:text.index(stop)]
    assert [m.id for m in client.models.list().data] == [s.model]
    chat = client.chat.completions.create(model=s.model, messages=[{"role": "user", "content": "def f"}], max_tokens=6,
                                          temperature=0, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens == 6
    # Without max_tokens a long prompt gets what is left of the context, not an error.
    long = list(range(1, CONTEXT - 3))
    assert client.completions.create(model=s.model, prompt=long, temperature=0).usage.completion_tokens <= 4


def test_16_concurrent_requests_equal_their_solo_outputs_and_share_decode_steps(live, client):
    url, s, eng, _ = live
    tok = s.tokenizer
    words = "the quick brown fox jumps over the lazy dog def f ( x ) : return x + 1".split()
    rng = np.random.default_rng(1)
    prompts = [" ".join(words[: 1 + i]) for i in range(16)]  # 1..16 words: several chunks for the longest
    max_tokens = [int(m) for m in rng.integers(4, 40, size=16)]
    solo = [eng.generate([tok.encode(p).ids], m).tokens[0] for p, m in zip(prompts, max_tokens)]
    before, compiled = metrics(url), len(eng._compiled)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda pm: client.completions.create(model=s.model, prompt=pm[0], max_tokens=pm[1],
                                                                  temperature=0), zip(prompts, max_tokens)))
    after = metrics(url)
    assert len(eng._compiled) == compiled  # joining and leaving compiled nothing (the steps ran before)
    for out, ref in zip(outs, solo):
        assert out.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        assert out.usage.completion_tokens == len(ref)
    steps = after["dynaexq_decode_steps_total"] - before["dynaexq_decode_steps_total"]
    shared = after["dynaexq_decode_steps_shared_total"] - before["dynaexq_decode_steps_shared_total"]
    rows = after["dynaexq_decode_sequence_steps_total"] - before["dynaexq_decode_sequence_steps_total"]
    assert shared >= steps / 2 and rows / steps > 4  # far fewer steps than the 16 requests' tokens
    assert steps < sum(len(r) for r in solo) / 3
    assert after['dynaexq_requests_finished_total{reason="length"}'] >= 1
    ttft = "dynaexq_time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 16


def test_a_long_prompt_is_prefilled_between_the_others_decode_steps(live):
    _, s, _, _ = live
    sch = s.scheduler
    short = sch.submit(Sequence([5, 6, 7], 60))
    deadline = time.time() + 30
    while not short.tokens:
        assert time.time() < deadline
        time.sleep(0.005)
    seen = []  # the short sequence's length when the long one's first token arrived
    long = Sequence(list(range(1, 201)), 2, on_update=lambda seq: seen.append(len(short.tokens)) or False)
    at_submit = len(short.tokens)
    sch.submit(long)
    assert long.done.wait(60) and short.done.wait(60)
    # 200 prompt tokens are 13 chunks of 16, one per step beside the short sequence's decode step
    assert seen[0] - at_submit >= 12 and len(short.tokens) == 60


def test_disconnect_mid_stream_frees_the_slot(live, client):
    url, s, _, _ = live
    before = metrics(url)
    body = {"model": s.model, "prompt": "def f(x):", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 30
    while metrics(url)['dynaexq_requests_finished_total{reason="cancelled"}'] < 1 + before.get(
            'dynaexq_requests_finished_total{reason="cancelled"}', 0):
        assert time.time() < deadline, "the abandoned request kept its slot"
        time.sleep(0.05)
    after = metrics(url)
    assert after["dynaexq_running_sequences"] == 0
    assert after["dynaexq_generation_tokens_total"] - before["dynaexq_generation_tokens_total"] < 200
    out = client.completions.create(model=s.model, prompt="def f(x):", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


def test_a_seeded_sampled_request_draws_what_the_engine_draws_alone(live, client):
    _, s, eng, _ = live
    ids = s.tokenizer.encode("def f(x):").ids
    alone = eng.generate([ids], 12, SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)).tokens[0]
    out = client.completions.create(model=s.model, prompt=ids, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234,
                                    extra_body={"top_k": 40})
    assert out.choices[0].text == s.tokenizer.decode(alone, skip_special_tokens=True)


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", "x"], "--prompt does not apply"),
    (["--policy", "offload"], "cannot batch continuously"),
    (["--prefill-chunk", "24"], "power of two >= 16"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--context", "99999"], "exceeds the model's context"),
])
def test_serve_py_bad_flags_are_one_line_errors(capsys, extra, needle):
    assert serve_cli.main(["--model", str(SHIPPED), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_serve_py_dry_run_plans_max_batch_sequences_of_context(capsys):
    assert serve_cli.main(["--model", str(SHIPPED), "--dry-run", "--max-batch", "8", "--context", "512",
                           "--prefill-chunk", "32", "--budget", "1GB"]) == 0
    assert "batch 8 x context 640 tokens (prefill up to 32)" in capsys.readouterr().out


def test_prompt_chunks_put_the_padding_first_and_fill_the_rest():
    chunks = plan_chunks(37, 16)
    assert [(c.start, c.stop, c.slot, c.lead) for c in chunks] == [(0, 5, 0, 11), (5, 21, 16, 0), (21, 37, 32, 0)]
    assert [(c.start, c.stop, c.lead) for c in plan_chunks(3, 64)] == [(0, 3, 13)]


def test_shutdown_lets_running_requests_finish(live, client):
    """SIGTERM in uvicorn sets `should_exit`: running requests still get every token."""
    url, s, _, server = live
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.completions.create, model=s.model, prompt="def f(x):", max_tokens=60,
                              temperature=0)
        deadline = time.time() + 30
        while metrics(url)["dynaexq_running_sequences"] < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        server.should_exit = True
        out = pending.result(60)
    assert out.usage.completion_tokens == 60 or out.choices[0].finish_reason == "stop"
    deadline = time.time() + 30
    while s.scheduler._thread.is_alive():
        assert time.time() < deadline, "the scheduler did not stop after the drain"
        time.sleep(0.05)
