#!/usr/bin/env python
"""FloE's streaming path alone: gather the active channels' gate columns and down rows on the
host, copy them to the device; achieved GB/s at a real model's shapes.

    python scripts/bench_floe_stream.py                                  # Qwen3-30B-A3B shapes, 32 experts
    python scripts/bench_floe_stream.py --hidden 4096 --intermediate 14336 --experts 8 --top-k 2   # Mixtral-8x7B

One MoE layer's host arrays (random bf16, channel-major [E, I, H] as `policies.floe` keeps them),
one decode round of `--top-k` experts x `capacity` channels (FloE's: the expected active channels
at `--sparsity` times `--margin`, rounded up to 8). Three paths, best of `--repeats`:

  gather          `policies.floe.gather_channels` into reused staging arrays (what the policy does)
  copy            `policies.floe.to_device` of those arrays, waited for (what the policy does; on
                  the CPU a copy that aliases the staging buffer is copied once more)
  copy pinned     the same arrays first put in `pinned_host` memory, then to the device
                  (where the backend offers it; the step NOTES.md says to try on a GPU)

On a CPU "device" memory is host memory: the copy figures are memcpy speeds, not PCIe. Run the
same command on the GPU machine for the figures that matter there.
"""

from __future__ import annotations

import sys
import time


def parse_args(argv=None):
    from dynaexq_jax.launch.flags import command_parser

    p = command_parser(__doc__)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=32,
                   help="experts in the host layer (128 in Qwen3-30B; fewer saves RAM)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--margin", type=float, default=1.25)
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    from dynaexq_jax.cli import refusals_as_errors

    return refusals_as_errors(run)(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.launch.flags import at_least_each

    at_least_each(args, hidden=8, intermediate=1, experts=1, top_k=1, repeats=1, margin=1)
    if args.top_k > args.experts or not 0 <= args.sparsity < 1:
        raise UserError(f"--top-k must be at most --experts ({args.experts}) and --sparsity in [0, 1), got "
                        f"{args.top_k} and {args.sparsity}")
    import jax
    import ml_dtypes
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.experts.swap import host_memory_kind
    from dynaexq_jax.policies.floe import capacity, gather_channels, to_device

    E, I, H, k = args.experts, args.intermediate, args.hidden, args.top_k
    rng = np.random.default_rng(0)
    gate_t = rng.standard_normal((E, I, H), np.float32).astype(ml_dtypes.bfloat16)
    down = rng.standard_normal((E, I, H), np.float32).astype(ml_dtypes.bfloat16)
    C = capacity(I, args.sparsity, 1, args.margin)
    experts = rng.choice(E, k, replace=False)
    idx = np.sort(np.stack([rng.choice(I, C, replace=False) for _ in range(k)]), axis=-1)
    dev = jax.devices()[0]
    nbytes = 2 * k * C * H * 2

    bufs = [np.empty((k, C, H), ml_dtypes.bfloat16) for _ in range(2)]

    def gather():
        return gather_channels(gate_t, experts, idx, bufs[0]), gather_channels(down, experts, idx, bufs[1])

    staged = gather()
    rows = [("gather", best_of(gather, args.repeats))]
    rows.append(("copy", best_of(lambda: to_device(staged, dev), args.repeats)))
    kind = host_memory_kind(dev)
    if kind is not None:
        pinned = jax.block_until_ready(jax.device_put(staged, SingleDeviceSharding(dev, memory_kind=kind)))
        to_device = SingleDeviceSharding(dev, memory_kind="device")
        rows.append(("copy pinned", best_of(lambda: jax.block_until_ready(jax.device_put(pinned, to_device)),
                                            args.repeats)))
    whole = 3 * k * I * H * 2  # offload moves gate, up and down
    print(f"device {dev.device_kind}; one round: {k} experts x {C} of {I} channels x H {H}, gate + down bf16 = "
          f"{nbytes / 1e6:.2f} MB ({nbytes / whole:.3f} of the {whole / 1e6:.1f} MB offload moves for them)")
    print("| path | seconds | GB/s |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2e} | {nbytes / s / 1e9:.2f} |")
    g, c = rows[0][1], rows[1][1]
    print(f"| gather + copy | {g + c:.2e} | {nbytes / (g + c) / 1e9:.2f} |")
    # Per expert: bf16 gate, up and down against FloE's resident up projection plus the rows one
    # token moves (the capacity's, and the exact 1 - sparsity share of channels).
    expert = 3 * I * H * 2
    up = budget_lib.quantized_nbytes((H, I), 2, budget_lib.FLOE_UP_GROUP)
    exact = round((1 - args.sparsity) * I) * 2 * H * 2
    print(f"per expert: bf16 {expert / 1e6:.3f} MB; resident int2 up {up / 1e6:.3f} MB "
          f"({expert / up:.1f}x smaller on the device); up + one token's rows at capacity {C}: "
          f"{(up + nbytes / k) / 1e6:.3f} MB ({expert / (up + nbytes / k):.1f}x), at exactly "
          f"{1 - args.sparsity:.0%} of channels: {(up + exact) / 1e6:.3f} MB ({expert / (up + exact):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
