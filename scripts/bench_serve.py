#!/usr/bin/env python
"""Continuous batching, measured: N concurrent clients against a live server versus the same
requests served one after another.

    python scripts/bench_serve.py --clients 1,4,16,32 --max-tokens 32 -- --dtype float32 --max-batch 16
    python scripts/bench_serve.py --url http://127.0.0.1:8000      # a server already running

Without --url it starts scripts/serve.py on a free port (the flags after `--` are its own) and
stops it with SIGTERM at the end. Each request streams; per request it records the time to the
first token (TTFT) and the mean time per token after it. For each N: the N requests at once, then
the same N one at a time; aggregate tokens/s, TTFT and per-token latency p50/p99 of each, and the
speed-up (sequential wall time / concurrent wall time). Prompts: lines of the shipped model's
held-out code, of different lengths.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dynaexq_jax.cli import refusals_as_errors
from dynaexq_jax.launch.flags import at_least_each, comma_list, command_parser

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "checkpoints" / "tiny-qwen3-moe" / "tasks" / "heldout.jsonl"


def parse_args(argv=None):
    p = command_parser(__doc__)
    p.add_argument("--url", help="a running server (default: start scripts/serve.py with the flags after --)")
    p.add_argument("--clients", default="1,4,16,32", help="numbers of concurrent clients, comma-separated")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each request asks for")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    p.add_argument("serve_args", nargs="*", help="scripts/serve.py's flags (after --)")
    args = p.parse_args(argv)
    args.clients = comma_list("--clients", args.clients, convert=int, low=1)
    at_least_each(args, max_tokens=1)
    return args


def prompts(n: int) -> list[str]:
    """`n` prompts of 4..60 words from the held-out files."""
    words = " ".join(json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()).split(" ")
    return [" ".join(words[i * 97 % len(words):][: 4 + (i * 13) % 57]) for i in range(n)]


def request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: {tokens, ttft, per_token, done} (seconds from its start)."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter() - t0
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = now
            last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    first = last if first is None else first
    return {"tokens": tokens, "ttft": first, "per_token": (last - first) / max(tokens - 1, 1), "done": last}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_level(url: str, model: str, batch: list[str], max_tokens: int, at_once: bool) -> dict:
    t0 = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            results = list(pool.map(lambda p: request(url, model, p, max_tokens), batch))
    else:
        results = [request(url, model, p, max_tokens) for p in batch]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft, per_token = [r["ttft"] for r in results], [r["per_token"] for r in results]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "tpot_p50": pct(per_token, 50), "tpot_p99": pct(per_token, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--port", str(port), "--quiet", *serve_args]
    print("server:", " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            sys.exit("error: the server did not answer /health within 600 s")
        time.sleep(0.5)


@refusals_as_errors
def main(argv=None) -> int:
    import httpx

    args = parse_args(argv)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.serve_args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        request(url, model, "warm up", 4)
        rows = []
        for n in args.clients:
            batch = prompts(n)
            seq = run_level(url, model, batch, args.max_tokens, at_once=False)
            con = run_level(url, model, batch, args.max_tokens, at_once=True)
            rows.append({"clients": n, "concurrent": con, "sequential": seq, "speedup": seq["wall_s"] / con["wall_s"]})
        print("| clients | mode | wall s | tokens | tok/s | TTFT p50 / p99 ms | per-token p50 / p99 ms | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            for mode in ("concurrent", "sequential"):
                m = r[mode]
                speed = f"{r['speedup']:.2f}x" if mode == "concurrent" else ""
                print(f"| {r['clients']} | {mode} | {m['wall_s']:.2f} | {m['tokens']} | {m['tok_s']:.1f} | "
                      f"{m['ttft_p50'] * 1e3:.0f} / {m['ttft_p99'] * 1e3:.0f} | "
                      f"{m['tpot_p50'] * 1e3:.1f} / {m['tpot_p99'] * 1e3:.1f} | {speed} |")
        if args.json:
            print(json.dumps(rows))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
