"""Policy name -> builder: the one table that makes each residency policy.

Every builder takes the same three things, a checkpoint loaded by `io.loader.load`, its memory
plan (`budget.policy_plan`'s for that policy) and a `Setup`, and returns a `Policy`;
`policies.build_policy` looks the name up. A new policy: its module, a row here, its name in
`policies.POLICIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dynaexq_jax.policies import POLICIES, Policy, dynaexq, floe, full, offload, static


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a builder may read besides the checkpoint and the plan; each reads what it uses."""

    opts: dynaexq.DynaExqOptions = dynaexq.DynaExqOptions()  # tiers and quantization (static, dynaexq)
    floe_opts: floe.FloeOptions = floe.FloeOptions()
    batch: int = 1  # sequences per step: the per-step buffers of offload, prefetch and floe
    hotness_profile: str | None = None  # dynaexq's warm start
    transfer: Callable | None = None  # dynaexq's host->device copy (tests slow it down)
    progress: bool = False  # a progress bar while experts are quantized


BUILDERS: dict[str, Callable[..., Policy]] = {
    "dynaexq": lambda ckpt, plan, s: dynaexq.build(ckpt, plan, s.opts, hotness_profile=s.hotness_profile,
                                                   transfer=s.transfer, progress=s.progress),
    "full": lambda ckpt, plan, s: full.build(ckpt),
    "static": lambda ckpt, plan, s: static.build(ckpt, plan, s.opts, progress=s.progress),
    "offload": lambda ckpt, plan, s: offload.build(ckpt, plan, prefetch=False, batch=s.batch),
    "prefetch": lambda ckpt, plan, s: offload.build(ckpt, plan, prefetch=True, batch=s.batch),
    "floe": lambda ckpt, plan, s: floe.build(ckpt, plan, s.floe_opts, batch=s.batch),
}
if tuple(BUILDERS) != POLICIES:
    raise TypeError(f"policies.POLICIES {POLICIES} and the builders {tuple(BUILDERS)} disagree")
