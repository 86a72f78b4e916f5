"""Expert-residency policies: what each step computes with, and what changes between steps.

Every policy offers the engine the same small interface (`Policy`); the engine never knows
which one it runs. One file per policy:

    full      every expert at the checkpoint's precision
    static    every expert at one bit width (static PTQ), the widest the budget holds
    dynaexq   low-bit fallbacks + hot experts in high-precision slots, learned online
    offload   experts on the host, an LRU cache of device slots (and `prefetch`)
    floe      compressed up projections resident, active gate/down channels streamed (FloE)

`build_policy` makes one from a loaded checkpoint and its memory plan (`registry`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from dynaexq_jax.experts.expert_state import ExpertState

POLICIES = ("dynaexq", "full", "static", "offload", "prefetch", "floe")


class Policy(Protocol):
    name: str
    layerwise: bool  # True: experts are chosen inside a step, layer by layer (offload)
    observe_every: int | None  # decode steps between `observe` calls; None: never

    @property
    def experts(self) -> ExpertState:
        """The expert state the next step computes with (a new value after any change)."""

    def prepare(self, routing_pass: Callable[[], tuple[np.ndarray, int, int]]) -> None:
        """Before a request's first step: fill what must be resident. `routing_pass()` runs the
        request's prefill on the current experts and returns (router mass [L, E], tokens,
        steps), for a policy with nothing better to go on."""

    def between_steps(self) -> None:
        """Between two dispatched steps: land finished copies, flip handles. Never waits."""

    def observe(self, mass: np.ndarray, tokens: int, steps: float) -> None:
        """Routing since the last call: router mass [L, E] over `tokens` tokens in `steps` steps."""

    def after_request(self) -> None:
        """A request has ended (e.g. save what was learned)."""

    def stats(self) -> dict:
        """Counters since the policy was made: promotions, demotions, h2d_bytes, ..."""


class NoBetweenStepWork:
    """The `Policy` methods of a policy whose residency changes never (full, static) or only
    inside a step (offload, prefetch, floe): nothing to fill, land, learn or save between steps."""

    def prepare(self, routing_pass) -> None:
        pass

    def between_steps(self) -> None:
        pass

    def observe(self, mass, tokens, steps) -> None:
        pass

    def after_request(self) -> None:
        pass


def build_policy(name: str, ckpt, plan, opts=None, *, batch: int = 1, hotness_profile=None, transfer=None,
                 progress: bool = False, floe_opts=None) -> Policy:
    """The policy `name` for a checkpoint loaded by `io.loader.load`, sized by `plan`
    (`budget.policy_plan`'s plan for it) and `batch` sequences per step (`registry.BUILDERS`)."""
    from dynaexq_jax.policies import registry  # it imports every policy, and they import this module

    if name not in registry.BUILDERS:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    given = {k: v for k, v in (("opts", opts), ("floe_opts", floe_opts)) if v is not None}
    setup = registry.Setup(batch=batch, hotness_profile=hotness_profile, transfer=transfer, progress=progress, **given)
    return registry.BUILDERS[name](ckpt, plan, setup)
