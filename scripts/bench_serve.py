#!/usr/bin/env python
"""Continuous batching, measured: N concurrent clients against a live server versus the same
requests served one after another.

    python scripts/bench_serve.py --clients 1,4,16,32 --max-tokens 32 -- --dtype float32 --max-batch 16
    python scripts/bench_serve.py --url http://127.0.0.1:8000      # a server already running
    python scripts/bench_serve.py --churn 120 --clients 32 -- --dtype float32 --max-batch 16

Without --url it starts scripts/serve.py on a free port (the flags after `--` are its own) and
stops it with SIGTERM at the end. Each request streams; per request it records the time to the
first token (TTFT) and the mean time per token after it. For each N: the N requests at once, then
the same N one at a time; aggregate tokens/s, TTFT and per-token latency p50/p99 of each, and the
speed-up (sequential wall time / concurrent wall time). Prompts: lines of the shipped model's
held-out code, of different lengths.

--churn SECONDS: instead, rounds of N streaming clients at once (N: --clients) of which a third
hang up after their first chunk, after one warm-up round, for SECONDS. After each round: the
seconds until /metrics shows no running sequence and no queued request, the server's resident
memory and device memory (where the backend counts it), its compiled steps, 5xx answers, and
whether every completed stream equals the same request served alone. DYNAEXQ_API_KEY, when set,
is sent as the bearer token (and passed to the server it starts).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
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
    p.add_argument("--churn", type=float, metavar="SECONDS",
                   help="instead: rounds of --clients streams, a third hanging up, for SECONDS (see above)")
    p.add_argument("serve_args", nargs="*", help="scripts/serve.py's flags (after --)")
    args = p.parse_args(argv)
    args.clients = comma_list("--clients", args.clients, convert=int, low=1)
    at_least_each(args, max_tokens=1)
    return args


def prompts(n: int) -> list[str]:
    """`n` prompts of 4..60 words from the held-out files."""
    words = " ".join(json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()).split(" ")
    return [" ".join(words[i * 97 % len(words):][: 4 + (i * 13) % 57]) for i in range(n)]


def headers() -> dict:
    key = os.environ.get("DYNAEXQ_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: {tokens, ttft, per_token, done} (seconds from its start)."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers(), timeout=600) as r:
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


def stream_text(client, model: str, prompt: str, max_tokens: int, hang_up: bool) -> tuple[int, str | None]:
    """(status, the streamed text, or None when it hung up after the first chunk or did not end with [DONE])."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, None
        text, done = [], False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if hang_up:
                return r.status_code, None  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            text += [c["text"] for c in chunk["choices"]]
        return r.status_code, "".join(text) if done else None


def metrics(client) -> dict[str, float]:
    lines = [line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in lines}


def churn(url: str, model: str, n: int, max_tokens: int, seconds: float) -> list[dict]:
    """Rounds of `n` streams at once, a third hanging up, for `seconds` after a warm-up round."""
    import httpx

    client = httpx.Client(base_url=url, headers=headers(), timeout=600, limits=httpx.Limits(max_connections=2 * n))
    batch = prompts(n)
    solo = {p: stream_text(client, model, p, max_tokens, False)[1] for p in set(batch)}
    hang = [i % 3 == 0 for i in range(n)]
    rows, t0 = [], None
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        while t0 is None or time.perf_counter() - t0 < seconds:
            start = time.perf_counter()
            results = list(pool.map(lambda ph: stream_text(client, model, ph[0], max_tokens, ph[1]), zip(batch, hang)))
            ended = time.perf_counter()
            while (m := metrics(client))["dynaexq_running_sequences"] or m["dynaexq_queue_depth"]:
                time.sleep(0.01)
            row = {"round_s": ended - start, "idle_after_s": time.perf_counter() - ended,
                   "rss_mb": m.get("process_resident_memory_bytes", float("nan")) / 1e6,
                   "device_mb": m.get("dynaexq_device_memory_bytes_in_use", float("nan")) / 1e6,
                   "compiled": int(m["dynaexq_compiled_steps"]), "errors_5xx": sum(s >= 500 for s, _ in results),
                   "completed": sum(t is not None for _, t in results), "hung_up": sum(hang),
                   "mismatched": sum(t is not None and t != solo[p] for p, (_, t) in zip(batch, results))}
            if t0 is None:  # the warm-up round
                t0 = time.perf_counter()
                print(f"warm-up round: {row}", file=sys.stderr)
                continue
            row["t_s"] = time.perf_counter() - t0
            rows.append(row)
    return rows


def print_churn(rows: list[dict]) -> None:
    print("| t s | rounds | round s | idle after s | RSS MB | device MB | compiled steps | completed | hung up | "
          "mismatched | 5xx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    every = max(1, len(rows) // 12)
    for i, r in enumerate(rows):
        if i % every == 0 or i == len(rows) - 1:
            device = "n/a" if math.isnan(r["device_mb"]) else f"{r['device_mb']:.1f}"  # a CPU counts none
            print(f"| {r['t_s']:.0f} | {i + 1} | {r['round_s']:.2f} | {r['idle_after_s']:.2f} | {r['rss_mb']:.1f} | "
                  f"{device} | {r['compiled']} | {r['completed']} | {r['hung_up']} | {r['mismatched']} | "
                  f"{r['errors_5xx']} |")
    rss = [r["rss_mb"] for r in rows]
    print(f"\n{len(rows)} rounds of {rows[0]['completed'] + rows[0]['hung_up']} clients in {rows[-1]['t_s']:.0f} s: "
          f"RSS {rss[0]:.1f} -> {rss[-1]:.1f} MB (min {min(rss):.1f}, max {max(rss):.1f}), compiled steps "
          f"{rows[0]['compiled']} -> {rows[-1]['compiled']}, idle within {max(r['idle_after_s'] for r in rows):.2f} s "
          f"of each round's end, {sum(r['mismatched'] for r in rows)} completed streams unlike their solo output, "
          f"{sum(r['errors_5xx'] for r in rows)} 5xx")


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
        model = httpx.get(url + "/v1/models", headers=headers()).json()["data"][0]["id"]
        if args.churn is not None:
            rows = churn(url, model, args.clients[-1], args.max_tokens, args.churn)
            print_churn(rows)
            if args.json:
                print(json.dumps(rows))
            return 0
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
