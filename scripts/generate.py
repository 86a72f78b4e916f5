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
    p.add_argument("--policy", choices=["dynaexq", "full", "static"], default="dynaexq",
                   help="dynaexq: low-bit fallbacks + hot experts in high-precision slots; full: every expert at "
                        "high precision; static: every expert at one bit width (the widest the budget holds)")
    p.add_argument("--hi-dtype", choices=["bfloat16", "int8"], default="bfloat16")
    p.add_argument("--lo-bits", type=int, choices=[4, 3, 2], default=4)
    p.add_argument("--group-size", type=int, default=128, help="quantization group (largest power of two <= this dividing the expert dims)")
    p.add_argument("--quant-method", choices=["rtn", "mse"], default="rtn")
    p.add_argument("--rebalance-every", type=int, default=16, help="decode steps between residency decisions")
    p.add_argument("--half-life", type=float, default=256.0, help="hotness half-life in tokens")
    p.add_argument("--allocation", choices=["per_layer", "global"], default="per_layer")
    p.add_argument("--hotness", help="warm-start hotness profile (JSON written by --save-hotness)")
    p.add_argument("--save-hotness", help="write the run's hotness profile here")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats on stdout")
    return p.parse_args(argv)


def run(args) -> dict:
    import jax.numpy as jnp

    from dynaexq_jax import budget, engine, loader, policies, sampling

    budget_bytes = budget.parse_size(args.budget) if args.budget is not None else None
    knobs = sampling.SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    prompts = args.prompt or ["def "]
    dtype = jnp.dtype(args.dtype)
    ckpt = loader.load(args.model, dtype, experts_on_device=False)
    tok = ckpt.tokenizer
    if tok is None:
        raise loader.CheckpointError(f"{args.model} has no tokenizer.json, so text prompts cannot be encoded")
    ids = [tok.encode(p).ids for p in prompts]
    eng, plan = policies.build_engine(
        ckpt, args.policy, budget=budget_bytes, batch=len(ids), longest_prompt=max(map(len, ids)),
        max_new_tokens=args.max_new_tokens, hotness_profile=args.hotness,
        opts=policies.DynaExqOptions(
            lo_bits=args.lo_bits, hi_dtype=args.hi_dtype, group_size=args.group_size,
            quant_method=args.quant_method, rebalance_every=args.rebalance_every,
            half_life_tokens=args.half_life, allocation=args.allocation,
        ),
    )

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
    stats = dict(gen.stats, budget_bytes=budget_bytes, model=str(args.model), dtype=args.dtype, policy=args.policy)
    stats["accounted_device_bytes"] = plan.total
    stats["memory_plan"] = plan.as_dict()
    if args.save_hotness and args.policy == "dynaexq":
        eng.runtime.tracker.save(args.save_hotness)
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
            f"decode {dtps if dtps is None else f'{dtps:.1f}'} tok/s | compile {stats['compile_s']:.1f} s | "
            f"device {budget.format_size(stats['accounted_device_bytes'])} accounted"
            + (f" of {budget.format_size(budget_bytes)}" if budget_bytes else "")
            + (f", hi hit {stats['hi_hit_rate']:.1%}" if stats["hi_hit_rate"] is not None else "")
            + f", {stats['promotions']} promotions, {budget.format_size(stats['h2d_bytes'])} host->device",
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
