"""Budget-optimal tiers: the fallback width and the slot dtype that fit a budget best.

For each candidate (fallback width, slot dtype) whose memory plan fits the budget, the plan's
slots go to the experts the policy itself would fill them with (the hottest of each layer,
by the warm-start profile), and the candidate scores

    expected error = sum over experts of  traffic_share x quant_error(expert, its tier)

with `quant_error` each expert's relative weight error at that width (`tiers.quant_errors`,
measured once and cached with the converted experts; 0 for a slot in the checkpoint's own
dtype) and `traffic_share` its share of its layer's routed mass in the profile, layers
weighted equally. The lowest expected error wins; ties (and errors under `NEGLIGIBLE_ERROR`)
go to the widest static, then to the wider fallback, then to bf16 slots.

Never below static: the candidates include the widest uniform width that fits (the widest
static), and slots only ever replace an expert's fallback by a more precise copy, so the
choice's expected error is at most that static's. A narrower fallback wins only when the
room it frees buys enough slots to lower the expected error further.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.policies import hotness

LO_WIDTHS = (8, 4, 3, 2)  # fallback widths, widest first (the tie-break order before plan size)
HI_DTYPES = ("bfloat16", "int8")
# Expected relative weight errors below this are treated as equal. int8 (RTN, groups of 64-128)
# measures ~3e-5 and scores as full precision within float32 rounding of the perplexity (a few
# 1e-3 either way on the shipped model); int4 measures ~8e-3.
NEGLIGIBLE_ERROR = 1e-4


@dataclasses.dataclass(frozen=True)
class TierChoice:
    lo_bits: int
    hi_dtype: str
    slots: int
    expected_error: float
    static_bits: int  # the widest uniform width that fits: where the choice starts
    static_error: float  # its expected error with no slots

    def describe(self) -> str:
        return (f"auto tiers: int{self.lo_bits} fallback + {self.slots} {self.hi_dtype} slots, "
                f"expected error {self.expected_error:.3g} (static int{self.static_bits}: {self.static_error:.3g})")


def traffic_share(scores) -> np.ndarray:
    """[L, E] shares summing to 1: each layer's router mass normalised within the layer, layers
    weighted equally (every token passes every layer). A layer without mass counts uniform."""
    s = np.asarray(scores, np.float64)
    L, E = s.shape
    tot = s.sum(axis=1, keepdims=True)
    per_layer = np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 1.0 / E)
    return per_layer / L


def resident_set(scores, slots: int, allocation: str) -> np.ndarray:
    """[L, E] bool: the experts a policy with `slots` slots fills from `scores` (its warm start:
    each layer's capacity taken by its highest scores, ties to the lower index)."""
    s = np.asarray(scores, np.float64)
    L, E = s.shape
    cap = hotness.global_capacity(s, slots) if allocation == "global" else hotness.per_layer_capacity(slots, L, E)
    ranks = np.argsort(np.argsort(-s, axis=1, kind="stable"), axis=1, kind="stable")
    return ranks < cap[:, None]


def expected_error(share, lo_err, hi_err, resident) -> float:
    return float(np.sum(share * np.where(resident, hi_err, lo_err)))


def choose(
    plan_fn: Callable[[int, str], budget_lib.MemoryPlan],
    errors: dict[int, np.ndarray],
    scores,
    *,
    lo_choices=LO_WIDTHS,
    hi_choices=HI_DTYPES,
    allocation: str = "per_layer",
) -> TierChoice:
    """The candidate of least expected error. `plan_fn(lo_bits, hi_dtype)` is the memory plan
    for the run's budget (a BudgetError when its fallbacks do not fit); `errors` {bits: [L, E]}
    must cover `lo_choices` and, for int8 slots, 8."""
    share = traffic_share(scores)
    zero = np.zeros_like(share)
    candidates, last_error = [], None  # (expected error, lo, hi, slots), the static start first
    for lo in sorted(lo_choices, reverse=True):
        for hi in hi_choices:
            if hi == "int8" and lo >= 8:
                continue  # an int8 slot over an int8 fallback changes nothing
            try:
                plan = plan_fn(lo, hi)
            except budget_lib.BudgetError as e:
                last_error = e
                continue
            if not candidates:  # the widest uniform width that fits, no slots: the widest static
                candidates.append((float(np.sum(share * errors[lo])), lo, hi, 0))
            hi_err = zero if hi != "int8" else errors[8]
            err = expected_error(share, errors[lo], hi_err, resident_set(scores, plan.slots, allocation))
            candidates.append((err, lo, hi, plan.slots))
    if not candidates:
        raise last_error
    # Below the floor errors are not told apart (so the start, listed first, wins their ties):
    # slots then would cost transfers and host memory for no difference a model shows.
    err, lo, hi, slots = min(candidates, key=lambda c: max(c[0], NEGLIGIBLE_ERROR))
    start_err, start_lo = candidates[0][0], candidates[0][1]
    return TierChoice(lo, hi, int(slots), err, start_lo, start_err)
