#!/usr/bin/env python
"""This project against Hugging Face transformers on the CPU, side by side in one run.

    python scripts/bench_cpu.py                       # the shipped model, float32, one core
    python scripts/bench_cpu.py --batch-sizes 1,8 --new-tokens 128 --repeats 3 --markdown

Both sides run the same checkpoint in float32, greedy, EOS off, pinned to one core (torch at
one thread, XLA's CPU client at one thread), on the same prompts (held-out text of the shipped
task data). Per batch size: prefill time (the prompt's forward pass to the first token) and
decode tokens/s (the rest of `--new-tokens`); then perplexity-eval throughput over held-out
windows (log-probabilities of every token). Systems are interleaved and each figure is the best
of `--repeats`, so drift on a shared machine hurts every system alike. Greedy tokens are
compared: the table says whether both sides produced the same ones.

Our rows: `full` (every expert at full precision) and `dynaexq` without a budget (every expert
resident in a slot: the same numbers through the two-tier machinery). transformers' rows: its
eager experts, and its default experts implementation when that differs on this machine.
Absolute times on a CPU say little about a GPU; the ratios are the point.
"""

from __future__ import annotations

import os
import sys

from dynaexq_jax.cli import refusals_as_errors  # imports jax, but starts no backend: _pin still works


def _pin(core: int) -> None:
    """One core for everything, before jax or torch start their thread pools."""
    os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def parse_args(argv=None):
    from dynaexq_jax.launch.flags import command_parser

    p = command_parser(__doc__)
    p.add_argument("--model", help="checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --eval-len tokens to score")
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--json", help="write the figures here (a new file, or one this script wrote)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (else plain text)")
    return p.parse_args(argv)


def held_out_ids(tok, path, n: int, length: int) -> list[list[int]]:
    """`n` token windows of `length` from the held-out documents (shortest documents skipped)."""
    import json

    out = []
    for line in open(path):
        ids = tok.encode(json.loads(line)["text"]).ids
        out.extend(ids[i:i + length] for i in range(0, len(ids) - length + 1, length))
        if len(out) >= n:
            return out[:n]
    if len(out) < n:
        raise SystemExit(f"error: {path} holds only {len(out)} windows of {length} tokens")
    return out


class Ours:
    def __init__(self, name, engine):
        self.name, self.engine = name, engine

    def generate(self, prompts, new_tokens):
        g = self.engine.generate(prompts, new_tokens, eos_token_ids=())
        return g.tokens, g.stats["prefill_s"], g.stats["decode_s"]

    def score(self, windows, batch):
        import time

        t0 = time.perf_counter()
        for i in range(0, len(windows), batch):
            self.engine.score(windows[i:i + batch])
        return time.perf_counter() - t0


class Transformers:
    def __init__(self, name, model):
        self.name, self.model = name, model

    def generate(self, prompts, new_tokens):
        import time

        import torch

        ids = torch.tensor(prompts)
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model(ids, use_cache=True)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
            total = time.perf_counter() - t0
        return out[:, ids.shape[1]:].tolist(), prefill, max(total - prefill, 1e-9)

    def score(self, windows, batch):
        import time

        import torch

        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                ids = torch.tensor(windows[i:i + batch])
                torch.log_softmax(self.model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
        return time.perf_counter() - t0


def systems(path):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from dynaexq_jax.io import loader
    from dynaexq_jax.runtime.build import build_engine
    from dynaexq_jax.runtime.engine import Engine

    torch.set_num_threads(1)
    ckpt = loader.load(path, jnp.float32)
    dyn, _ = build_engine(ckpt, "dynaexq", budget=None, batch=8, longest_prompt=64, max_new_tokens=128)
    out = [Ours("ours full", Engine(ckpt)), Ours("ours dynaexq (all resident)", dyn)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    out.append(Transformers("transformers (eager experts)", hf))
    default = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    impl = default.get_experts_implementation()
    if set(impl.values()) != {"eager"}:
        out.append(Transformers(f"transformers ({'/'.join(sorted(set(impl.values())))} experts)", default))
    return ckpt, out


def run(args) -> dict:
    from pathlib import Path

    path = Path(args.model) if args.model else Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-qwen3-moe"
    batch_sizes = args.batch_sizes
    ckpt, sys_list = systems(path)
    tasks = path / "tasks" / "heldout.jsonl"
    prompts = held_out_ids(ckpt.tokenizer, tasks, max(batch_sizes), args.prompt_len)
    windows = held_out_ids(ckpt.tokenizer, tasks, args.eval_windows, args.eval_len)
    results = {s.name: {} for s in sys_list}
    tokens = {}
    for b in batch_sizes:
        for s in sys_list:  # warm-up: compiles and first-call costs stay out of the figures
            tokens[(s.name, b)] = s.generate(prompts[:b], args.new_tokens)[0]
        for _ in range(args.repeats):
            for s in sys_list:
                _, prefill, decode = s.generate(prompts[:b], args.new_tokens)
                r = results[s.name]
                r[f"prefill_ms_b{b}"] = min(r.get(f"prefill_ms_b{b}", 1e9), 1e3 * prefill)
                rate = b * (args.new_tokens - 1) / decode
                r[f"decode_tok_s_b{b}"] = max(r.get(f"decode_tok_s_b{b}", 0.0), rate)
    for s in sys_list:
        s.score(windows[:args.eval_batch], args.eval_batch)  # warm-up
    n_tokens = sum(len(w) for w in windows)
    for _ in range(args.repeats):
        for s in sys_list:
            r = results[s.name]
            r["eval_tok_s"] = max(r.get("eval_tok_s", 0.0), n_tokens / s.score(windows, args.eval_batch))
    ref = sys_list[2].name
    same = {f"b{b}": {s.name: tokens[(s.name, b)] == tokens[(ref, b)] for s in sys_list} for b in batch_sizes}
    return {"results": results, "same_tokens_as_transformers": same, "batch_sizes": batch_sizes,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "eval_tokens": n_tokens}


def table(doc, markdown: bool) -> str:
    names = list(doc["results"])
    rows = []
    for b in doc["batch_sizes"]:
        rows += [(f"decode tok/s, batch {b}", f"decode_tok_s_b{b}", True),
                 (f"prefill ms, batch {b}", f"prefill_ms_b{b}", False)]
    rows.append((f"perplexity eval tok/s ({doc['eval_tokens']} tokens)", "eval_tok_s", True))
    hf = [n for n in names if n.startswith("transformers")]
    head = ["figure"] + names + ["ours full / best transformers", "dynaexq / full"]
    lines = [head]
    for label, key, higher in rows:
        vals = [doc["results"][n][key] for n in names]
        best_hf = (max if higher else min)(doc["results"][n][key] for n in hf)
        ours = doc["results"][names[0]][key]
        ratio = ours / best_hf if higher else best_hf / ours  # > 1: ours is better
        dyn = doc["results"][names[1]][key] / ours if higher else ours / doc["results"][names[1]][key]
        lines.append([label] + [f"{v:.1f}" for v in vals] + [f"{ratio:.2f}x", f"{dyn:.2f}x"])
    same = "; ".join(f"{b}: " + ", ".join(n for n, ok in d.items() if ok)
                     for b, d in doc["same_tokens_as_transformers"].items())
    if markdown:
        out = ["| " + " | ".join(l) + " |" for l in lines]
        out.insert(1, "|" + "---|" * len(head))
        return "\n".join(out) + f"\n\nSame greedy tokens as transformers (eager) - {same}"
    return "\n".join("  ".join(f"{c:>14}" for c in l) for l in lines) + f"\nsame greedy tokens as transformers: {same}"


def check(args) -> None:
    """Every flag's value, before any work: a one-line error."""
    from dynaexq_jax.io import files
    from dynaexq_jax.launch.flags import at_least_each, comma_list, in_range

    args.batch_sizes = comma_list("--batch-sizes", args.batch_sizes, convert=int, low=1)
    at_least_each(args, prompt_len=1, new_tokens=2, eval_windows=1, eval_len=2, eval_batch=1, repeats=1)
    in_range(0, os.cpu_count() - 1, "this machine's cores")("--core", args.core)
    if args.json:
        files.check_output_file(args.json, "--json")


@refusals_as_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    check(args)
    _pin(args.core)
    doc = run(args)
    print(table(doc, args.markdown))
    if args.json:
        from dynaexq_jax.io import files

        files.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
