"""`static`: every expert at one bit width (static post-training quantization), the widest
the memory plan holds."""

from __future__ import annotations

import jax

from dynaexq_jax.experts.expert_state import single_tier
from dynaexq_jax.policies.full import FixedPolicy
from dynaexq_jax.policies.tiers import Stopwatch, packed_tier


def build(ckpt, plan, opts, *, progress: bool = False, device=None) -> FixedPolicy:
    """`opts`: a `DynaExqOptions` (group size, quantization method); the width is the plan's."""
    host = ckpt.experts
    device = device or jax.devices()[0]  # committed arrays: every published state has one placement
    clock = Stopwatch()
    tier = packed_tier(host, plan.lo_bits, opts.group_size, opts.quant_method, source=ckpt.source, device=device,
                       room=plan.unallocated, progress=progress, clock=clock)
    return FixedPolicy("static", single_tier(tier, host.num_layers, host.num_experts, device, host),
                       lo_bits=plan.lo_bits, convert_s=clock.seconds)
