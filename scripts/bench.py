#!/usr/bin/env python
"""Side-by-side benchmark of expert-residency policies on one model, budget and prompts.

    python scripts/bench.py --preset qwen3-30b-a3b --budget 20GB --routing-skew 1.0 \\
        --policies static,offload,prefetch,dynaexq --batch-sizes 1,8,32 --json bench.json
    python scripts/bench.py --preset qwen3-moe-smoke --budget 64MB --batch-sizes 1,4 --gen-len 8   # CPU smoke

Every policy runs in this one process on the same prompts. Per (policy, batch): one warm-up
generation (compilation, residency warm-up) is excluded, then the medians of `--repeats`
generations are reported. Quality: each policy's next-token distributions on fixed token
sequences are compared with a reference: `full` without a budget (it only needs to fit the
device, not the budget) or, if `--reference static8`, every expert at int8.

`peak_device_bytes` is the allocator's peak since the process started (null on CPU); policies
run in the order given, so list them from the smallest footprint up.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face checkpoint directory")
    src.add_argument("--preset", default="qwen3-moe-smoke", help="preset name or config.json path (random weights)")
    p.add_argument("--policies", default="static,offload,prefetch,dynaexq,full")
    p.add_argument("--budget", help="device memory budget, e.g. 20GB")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--lo-bits", type=int, choices=[4, 3, 2], default=4)
    p.add_argument("--rebalance-every", type=int, default=16)
    p.add_argument("--routing-skew", type=float, default=0.0, help="presets: Zipf-like expert popularity (0 = uniform)")
    p.add_argument("--routing-shift-every", type=int, default=0, help="presets: new hot set every N decode steps (0 = never)")
    p.add_argument("--reference", choices=["full", "static8"], default="full")
    p.add_argument("--quality-seqs", type=int, default=2, help="sequences for KL / top-1 agreement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results here")
    p.add_argument("--plot", help="write a PNG of decode tokens/s by batch size per policy")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.errors import UserError

    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Mean KL(ref || got) of next-token distributions, and top-1 agreement."""
    kl, agree, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        lr, lg = log_softmax(r.astype(np.float64)), log_softmax(g.astype(np.float64))
        kl += float((np.exp(lr) * (lr - lg)).sum())
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return kl / n, agree / n


def run(args):
    import jax
    import jax.numpy as jnp

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax import policies
    from dynaexq_jax.runtime import costmodel
    from dynaexq_jax.io import loader
    from dynaexq_jax.io import preset
    from dynaexq_jax.errors import UserError

    dtype = jnp.dtype(args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    for n in names:
        if n not in policies.POLICIES:
            raise UserError(f"unknown policy {n!r}; choose from {', '.join(policies.POLICIES)}")
    budget = budget_lib.parse_size(args.budget) if args.budget else None
    if args.model:
        ckpt = loader.load(args.model, dtype, experts_on_device=False)
    else:
        cfg = preset.preset_config(args.preset)
        ckpt = preset.random_checkpoint(cfg, dtype, seed=args.seed, routing_skew=args.routing_skew)
    cfg = ckpt.config
    shift = preset.RouterShift(ckpt, args.routing_skew or 1.0) if args.routing_shift_every else None
    rng = np.random.default_rng(args.seed)
    vocab = cfg.vocab_size
    prompts = rng.integers(1, vocab, (max(batch_sizes), args.prompt_len)).tolist()
    quality = rng.integers(1, vocab, (args.quality_seqs, args.prompt_len + args.gen_len)).tolist()
    bw = costmodel.measure_bandwidth(64 * 2**20)
    device = str(jax.devices()[0].device_kind)
    print(f"device: {device}; measured copy {bw.hbm / 1e9:.1f} GB/s, host->device {bw.h2d / 1e9:.1f} GB/s", file=sys.stderr)
    opts = policies.DynaExqOptions(lo_bits=args.lo_bits, rebalance_every=args.rebalance_every)

    def build(policy, budget_bytes, o=opts):
        return policies.build_engine(
            ckpt, policy, budget=budget_bytes, batch=max(batch_sizes),
            longest_prompt=args.prompt_len + args.gen_len, max_new_tokens=args.gen_len, opts=o,
        )

    results, costs, logits = [], [], {}
    for policy in names:
        try:
            eng, plan = build(policy, budget)
        except UserError as e:
            print(f"{policy}: skipped ({e})", file=sys.stderr)
            continue
        for B in batch_sizes:
            on_tokens = None
            if shift is not None:
                state = {"step": 0}

                def on_tokens(_ids, eng=eng, state=state):
                    state["step"] += 1
                    if state["step"] % args.routing_shift_every == 0:
                        eng.params = shift.params(eng.params, state["step"] // args.routing_shift_every)

            eng.generate(prompts[:B], args.gen_len, eos_token_ids=(), on_tokens=on_tokens)  # warm-up
            runs = [eng.generate(prompts[:B], args.gen_len, eos_token_ids=(), on_tokens=on_tokens).stats for _ in range(args.repeats)]
            med = lambda k: statistics.median(r[k] for r in runs) if runs[0].get(k) is not None else None
            steps = args.gen_len - 1
            h2d = med("h2d_bytes")
            cost = costmodel.decode_step_cost(
                policy, cfg=cfg, batch=B, weights_bytes=plan.weights, kv_bytes=plan.kv_cache * B // max(batch_sizes),
                hi_expert_bytes=plan.slot_bytes,
                lo_expert_bytes=plan.fallback // max(plan.num_experts_total, 1) if plan.fallback else plan.slot_bytes,
                hi_hit_rate=med("hi_hit_rate") or 0.0, h2d_bytes_per_step=(h2d or 0) / steps, bw=bw,
            )
            costs.append(cost)
            decode_tps = med("decode_tokens_per_s")
            results.append({
                "policy": policy, "batch_size": B,
                "decode_tokens_per_s": decode_tps,
                "prefill_tokens_per_s": med("prefill_tokens_per_s"),
                "ttft_s": med("prefill_s"),
                "tpot_s": med("decode_s") / steps,
                "h2d_bytes_per_token": (h2d or 0) / (B * args.gen_len),
                "transfer_wait_s": med("transfer_wait_s"),
                "peak_device_bytes": runs[-1]["peak_device_bytes"],
                "accounted_device_bytes": plan.total,
                "hi_hit_rate": med("hi_hit_rate"),
                "predicted_tpot_s": cost.seconds,
                "kl_vs_full": None, "top1_agreement": None,
            })
            print(f"{policy:>9} B={B:<3} decode {decode_tps or 0:9.1f} tok/s  tpot {results[-1]['tpot_s'] * 1e3:8.2f} ms "
                  f"(model {cost.seconds * 1e3:8.2f} ms)", file=sys.stderr)
        logits[policy] = eng.logits(quality)
        del eng
        gc.collect()

    ref_name = "full" if args.reference == "full" else "static8"
    if ref_name in names and budget is None:
        ref = logits[ref_name]
    else:
        try:
            o = opts if args.reference == "full" else policies.DynaExqOptions(lo_bits=8)
            eng, _ = build("full" if args.reference == "full" else "static", None, o)
            ref = eng.logits(quality)
            del eng
        except UserError as e:
            ref = None
            print(f"reference {ref_name} skipped ({e})", file=sys.stderr)
    if ref is not None:
        for r in results:
            r["kl_vs_full"], r["top1_agreement"] = compare(ref, logits[r["policy"]])

    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "reference": ref_name, "bandwidth": {"hbm": bw.hbm, "h2d": bw.h2d},
                       "args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot, device)
    project(results, costs)
    return results


def print_table(results):
    cols = ["policy", "batch_size", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "tpot_s", "predicted_tpot_s",
            "h2d_bytes_per_token", "transfer_wait_s", "hi_hit_rate", "kl_vs_full", "top1_agreement", "accounted_device_bytes",
            "peak_device_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = []
        for c in cols:
            v = r[c]
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def project(results, costs):
    """Where the measured mix of bytes would land on other GPUs (the cost model alone)."""
    from dynaexq_jax.runtime import costmodel

    print("\nprojected decode tokens/s from the cost model (measured hit rates and h2d bytes):", file=sys.stderr)
    for r, cost in zip(results, costs):
        proj = costmodel.project(r["policy"], cost)
        cells = ", ".join(f"{name} {r['batch_size'] / s:.0f}" for name, s in proj.items())
        print(f"  {r['policy']:>9} B={r['batch_size']:<3} {cells}", file=sys.stderr)


def plot(results, path, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from dynaexq_jax.errors import UserError

        raise UserError("--plot needs matplotlib; pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in results):
        rs = [r for r in results if r["policy"] == policy]
        ax.plot([r["batch_size"] for r in rs], [r["decode_tokens_per_s"] or 0 for r in rs], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput by policy ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
