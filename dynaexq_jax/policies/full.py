"""`full`: every expert at the checkpoint's precision, resident, unchanging."""

from __future__ import annotations

import jax

from dynaexq_jax.experts.expert_state import ExpertState, single_tier
from dynaexq_jax.policies import NoBetweenStepWork
from dynaexq_jax.policies.tiers import dense_tier


class FixedPolicy(NoBetweenStepWork):
    """Experts that never move: one tier holding every expert (full, static)."""

    layerwise = False
    observe_every = None

    def __init__(self, name: str, experts: ExpertState, lo_bits: int | None = None, convert_s: float = 0.0):
        self.name = name
        self.experts = experts
        self.lo_bits = lo_bits
        self.convert_s = convert_s  # quantizing the tier at build (static); 0 for full

    def stats(self) -> dict:
        return {"slots": None, "lo_bits": self.lo_bits, "promotions": 0, "demotions": 0, "h2d_bytes": 0,
                "transfer_wait_s": 0.0, "fill_s": 0.0, "convert_s": self.convert_s}


def build(ckpt, device=None) -> FixedPolicy:
    host = ckpt.experts
    device = device or jax.devices()[0]  # committed arrays: every published state has one placement
    return FixedPolicy("full", single_tier(dense_tier(host, device), host.num_layers, host.num_experts, device, host))
