#!/usr/bin/env python
"""Generate text with a Qwen3-MoE checkpoint.

    python scripts/generate.py --prompt "def fibonacci(n):" --max-new-tokens 64
    python scripts/generate.py --model DIR --prompt a --prompt b --temperature 0.7 --top-p 0.9 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-qwen3-moe"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: 'def ')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--budget", help="device memory budget, e.g. 20GB, 20GiB, 512MiB or plain bytes")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats on stdout")
    return p.parse_args(argv)


def run(args) -> dict:
    import jax.numpy as jnp

    from dynaexq_jax import budget, engine, loader, sampling

    budget_bytes = budget.parse_size(args.budget) if args.budget is not None else None
    knobs = sampling.SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    prompts = args.prompt or ["def "]
    ckpt = loader.load(args.model, jnp.dtype(args.dtype))
    tok = ckpt.tokenizer
    if tok is None:
        raise loader.CheckpointError(f"{args.model} has no tokenizer.json, so text prompts cannot be encoded")
    ids = [tok.encode(p).ids for p in prompts]
    eng = engine.Engine(ckpt)

    on_tokens = None
    if not args.json and len(prompts) == 1:
        # Stream: decode everything so far and print the new suffix (keeps multi-byte
        # characters whole). The prompt is echoed once the request has been accepted.
        state = {"ids": [], "shown": ""}

        def on_tokens(step_ids):
            if not state["ids"]:
                sys.stdout.write(prompts[0])
            state["ids"].append(int(step_ids[0]))
            text = tok.decode(state["ids"], skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(state["shown"]) :])
                sys.stdout.flush()
                state["shown"] = text

    gen = eng.generate(ids, args.max_new_tokens, knobs, on_tokens=on_tokens)
    outputs = [
        {"prompt": p, "token_ids": t, "text": tok.decode(t, skip_special_tokens=True)}
        for p, t in zip(prompts, gen.tokens)
    ]
    stats = dict(gen.stats, budget_bytes=budget_bytes, model=str(args.model), dtype=args.dtype)
    if args.json:
        print(json.dumps({"outputs": outputs, "stats": stats}))
    else:
        if on_tokens is None:
            for i, o in enumerate(outputs):
                print(f"--- [{i}] {o['prompt']}{o['text']}")
        else:
            print()
        dtps = stats["decode_tokens_per_s"]
        print(
            f"prompt {stats['prompt_tokens']} tok, prefill {stats['prefill_s']:.3f} s "
            f"({stats['prefill_tokens_per_s']:.1f} tok/s) | generated {stats['generated_tokens']} tok, "
            f"decode {dtps if dtps is None else f'{dtps:.1f}'} tok/s | compile {stats['compile_s']:.1f} s",
            file=sys.stderr,
        )
    return {"outputs": outputs, "stats": stats}


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.errors import UserError

    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
