#!/usr/bin/env python
"""How much of a decode step the host costs: the engine's decode loop against a bare loop of
the same compiled step with nothing else in it.

    python scripts/bench_host.py                      # the shipped model, every policy
    python scripts/bench_host.py --steps 256 --batch 1 --markdown

Per policy: steps/s of `Engine.generate`'s decode loop (lagged token reads, the policy's work
between steps, statistics read every `rebalance_every` steps), steps/s of the bare loop (the
compiled decode step called back to back on its own outputs, one wait at the end), their ratio
(goal: >= 0.9) and the host overhead per step, (loop time - bare time) / steps. The dynaexq
rows run with a budget that forces swaps (`--budget`) and without (every expert resident).
Best of `--repeats`, systems interleaved. CPU times say little about a GPU; the ratio is the
figure that carries over (on a GPU the bare step is shorter, so the same host work weighs more).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def parse_args(argv=None):
    from dynaexq_jax.launch.flags import command_parser

    p = command_parser(__doc__)
    p.add_argument("--model", help="checkpoint directory (default: the shipped tiny model)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--budget", default="26MB", help="dynaexq's budget that forces swaps")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    return p.parse_args(argv)


def bare_steps_per_s(eng, batch: int, prompt_len: int, steps: int) -> float:
    """The compiled decode step run `steps` times on its own outputs: no reads, no policy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax.runtime.engine import DecodeState, cache_bucket, prompt_bucket, stop_array

    decode = next(v for k, v in eng._compiled.items() if k[0] == "decode")
    rows = batch
    cache = eng._empty_cache(rows, cache_bucket(prompt_bucket(prompt_len) + steps + 1))
    state = DecodeState(jnp.zeros(rows, jnp.int32), jnp.full(rows, 16, jnp.int32), jnp.ones(rows, bool),
                        jnp.zeros((), jnp.int32))
    knobs = tuple(jax.device_put(v) for v in (np.float32(0), np.int32(0), np.float32(1))) + (stop_array(set()),)
    key, stats = jax.random.key(0), eng._stats0()
    experts = eng.policy.experts
    cache, stats, state = decode(eng.params, experts, cache, stats, state, key, knobs)  # warm
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        cache, stats, state = decode(eng.params, experts, cache, stats, state, key, knobs)
    jax.block_until_ready(state)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from dynaexq_jax.cli import refusals_as_errors

    return refusals_as_errors(run)(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.io import loader
    from dynaexq_jax.launch.flags import at_least_each
    from dynaexq_jax.runtime.build import build_engine

    at_least_each(args, batch=1, prompt_len=1, steps=1, repeats=1)
    budget_lib.parse_size(args.budget)

    path = Path(args.model) if args.model else Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-qwen3-moe"
    ckpt = loader.load(path, jnp.dtype(args.dtype))
    prompts = np.random.default_rng(0).integers(1, ckpt.config.vocab_size, (args.batch, args.prompt_len)).tolist()
    shape = dict(batch=args.batch, longest_prompt=args.prompt_len, max_new_tokens=args.steps + 1)
    systems = {}
    for name, policy, budget in (("full", "full", None), ("static", "static", None),
                                 ("dynaexq (all resident)", "dynaexq", None),
                                 (f"dynaexq ({args.budget}, swapping)", "dynaexq", budget_lib.parse_size(args.budget)),
                                 ("offload", "offload", None)):
        systems[name], _ = build_engine(ckpt, policy, budget=budget, **shape)
    best = {n: [0.0, 0.0] for n in systems}
    for n, eng in systems.items():  # warm-up: compiles, fills slots
        eng.generate(prompts, args.steps + 1, eos_token_ids=())
    for _ in range(args.repeats):
        for n, eng in systems.items():
            g = eng.generate(prompts, args.steps + 1, eos_token_ids=())
            best[n][0] = max(best[n][0], args.steps / g.stats["decode_s"])
            if not eng.policy.layerwise:
                best[n][1] = max(best[n][1], bare_steps_per_s(eng, args.batch, args.prompt_len, args.steps))
    rows = [["policy", "loop steps/s", "bare steps/s", "loop / bare", "host overhead per step"]]
    for n, (loop, bare) in best.items():
        if bare:
            overhead_us = (1 / loop - 1 / bare) * 1e6
            rows.append([n, f"{loop:.0f}", f"{bare:.0f}", f"{loop / bare:.2f}", f"{overhead_us:.0f} us"])
        else:
            rows.append([n, f"{loop:.0f}", "-", "-", "runs layer by layer from the host"])
    if args.markdown:
        print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        print("\n".join("| " + " | ".join(r) + " |" for r in rows[1:]))
    else:
        print("\n".join("  ".join(f"{c:>24}" for c in r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
