"""Budget-optimal tiers: the fallback width, a mixed fallback and the slots that fit a budget best.

Candidates: every fallback width whose plan fits; slots in the checkpoint's dtype or int8, as
many as fit or fewer (in steps of one per layer); and with the room left, a mixed fallback:
some experts stored at the next wider width instead (each costs the difference in bytes).
The slots go to the experts the policy itself fills them with (the hottest of each layer, by
the warm-start profile), the wider fallbacks to the others that save the most. Each candidate
scores

    expected error = sum over experts of  traffic_share x quant_error(expert, its tier)

with `quant_error` each expert's relative weight error at that width (`tiers.quant_errors`,
measured once and cached with the converted experts; 0 for a slot in the checkpoint's own
dtype) and `traffic_share` its share of its layer's routed mass in the profile, layers
weighted equally. Every expert slotted at the checkpoint's precision (the model itself) wins
when it fits; else the lowest expected error wins; ties (and errors under `NEGLIGIBLE_ERROR`)
go to the widest static, then to the wider fallback, then to bf16 slots.

Never below static: the candidates include the widest uniform width that fits with no slots
(the widest static), and every other candidate only ever replaces an expert's fallback by a
more precise copy, so the choice's expected error is at most that static's. A narrower
fallback wins only when the room it frees lowers the expected error further.
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
    mid_bits: int | None = None  # the wider fallback width of `mid_experts`
    mid_experts: tuple[tuple[int, int], ...] = ()  # (MoE layer, expert) stored at mid_bits, not lo_bits

    def describe(self) -> str:
        mid = f" ({len(self.mid_experts)} at int{self.mid_bits})" if self.mid_experts else ""
        return (f"auto tiers: int{self.lo_bits} fallback{mid} + {self.slots} {self.hi_dtype} slots, "
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
    plan_fn: Callable[[int, str, int | None], budget_lib.MemoryPlan],
    errors: dict[int, np.ndarray],
    scores,
    *,
    lo_choices=LO_WIDTHS,
    hi_choices=HI_DTYPES,
    allocation: str = "per_layer",
    expert_bytes: Callable[[int], int] | None = None,
) -> TierChoice:
    """The candidate of least expected error. `plan_fn(lo_bits, hi_dtype, max_slots)` is the
    memory plan for the run's budget (a BudgetError when its fallbacks do not fit); `errors`
    {bits: [L, E]} must cover `lo_choices`, the next wider width of each, and (for int8 slots) 8.

    With `expert_bytes(bits)` (one expert's quantized bytes) the room the slots leave also
    buys a mixed fallback: experts stored at the next wider width instead of `lo_bits`, each
    for the difference in bytes, the ones with the most share x error saved first. Every slot
    count (in steps of one per layer) is tried against the mixed fallback its room leaves.
    """
    share = traffic_share(scores)
    L, E = share.shape
    zero = np.zeros_like(share)
    # (expected error, lo, hi, slots, mid_bits, mid mask), the static start first
    candidates, last_error = [], None
    for lo in sorted(lo_choices, reverse=True):
        wider = [b for b in LO_WIDTHS if b > lo]
        mid_bits = min(wider) if wider and expert_bytes is not None else None
        delta = expert_bytes(mid_bits) - expert_bytes(lo) if mid_bits else 0
        gain = share * (errors[lo] - errors[mid_bits]) if mid_bits else zero
        for hi in hi_choices:
            hi_bits = budget_lib.HI_BITS.get(hi)
            if hi_bits and lo >= hi_bits:
                continue  # a slot no wider than its fallback changes nothing
            try:
                most = plan_fn(lo, hi, None)
            except budget_lib.BudgetError as e:
                last_error = e
                continue
            if not candidates:  # the widest uniform width that fits, no slots: the widest static
                candidates.append((float(np.sum(share * errors[lo])), lo, hi, 0, None, None))
            hi_err = errors[hi_bits] if hi_bits else zero
            counts = sorted(set(range(0, most.slots, L)) | {most.slots}) if mid_bits else [most.slots]
            for slots in counts:
                plan = plan_fn(lo, hi, slots)
                resident = resident_set(scores, slots, allocation)
                mid = np.zeros((L, E), bool)
                if mid_bits:
                    # Not all: a fallback wholly at mid_bits is that width's static candidate.
                    m = min((plan.budget - plan.total) // delta, L * E - 1)
                    order = np.argsort(-np.where(resident, -np.inf, gain).ravel(), kind="stable")[:m]
                    mid.ravel()[order[gain.ravel()[order] > 0]] = True
                lo_err = np.where(mid, errors[mid_bits], errors[lo]) if mid_bits else errors[lo]
                err = expected_error(share, lo_err, hi_err, resident)
                candidates.append((err, lo, hi, slots, mid_bits if mid.any() else None, mid if mid.any() else None))
    if not candidates:
        raise last_error
    # Every expert in a slot at the checkpoint's own precision is the model itself: it wins
    # outright, its widest fallback first (int8's error is not zero, only too small to weigh).
    exact = [c for c in candidates if c[2] not in budget_lib.HI_BITS and c[3] >= L * E]
    # Below the floor errors are not told apart (so the start, listed first, wins their ties):
    # slots then would cost transfers and host memory for no difference a model shows.
    best = exact[0] if exact else min(candidates, key=lambda c: max(c[0], NEGLIGIBLE_ERROR))
    err, lo, hi, slots, mid_bits, mid = best
    pairs = () if mid is None else tuple((int(l), int(e)) for l, e in zip(*np.nonzero(mid)))
    return TierChoice(lo, hi, int(slots), err, candidates[0][1], candidates[0][0], mid_bits, pairs)
