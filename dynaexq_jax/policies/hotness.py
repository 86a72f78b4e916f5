"""Expert hotness learned online from router traces, and the choice of high-precision residents.

Every expert is always resident in low precision; these functions decide which experts of each
MoE layer also get one of the layer's high-precision slots. All of it is host-side numpy that
runs between jitted decode steps, so it favours clarity over vectorisation.

Scores are per-token rates: the (exponentially weighted) router-probability mass an expert
received when chosen, per token (DynaExq's signal; pair counts work the same way). "Layers"
here means the model's MoE layers (dense layers have no experts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dynaexq_jax import inputs
from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files


class ProfileError(UserError):
    """A hotness profile file that cannot be used."""


class HotnessTracker:
    """Exponentially weighted per-token rate of every (layer, expert), over decode steps.

    The horizon is in steps, not tokens, so it means the same at batch 1 and batch 32: an
    update covers `steps` decode steps (a prefill of T tokens per sequence counts as the T
    steps it replaces) and decays the old estimate by 0.5 ** (steps / half_life_steps). The
    new rate enters with the complementary weight, so k updates of n steps at a constant rate
    equal one update of k*n steps whatever the cadence.
    """

    def __init__(self, num_layers: int, num_experts: int, half_life_steps: float, scores=None):
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"need at least one layer and one expert, got {num_layers}x{num_experts}")
        if not half_life_steps > 0:
            raise ValueError(f"half_life_steps must be > 0, got {half_life_steps}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.half_life_steps = float(half_life_steps)
        shape = (num_layers, num_experts)
        if scores is None:
            self._scores = np.zeros(shape, np.float64)  # [layers, experts]
        else:
            self._scores = _check_scores(scores, shape, "initial scores")

    @property
    def scores(self) -> np.ndarray:
        """Current estimate, [layers, experts] float64, read-only (update through `update`)."""
        view = self._scores.view()
        view.flags.writeable = False
        return view

    def update(self, signal, tokens: float, steps: float) -> None:
        """Fold in `signal` [layers, experts] (router mass or pair counts) summed over `tokens`
        real tokens that took `steps` decode steps (or a prefill of that many tokens per row)."""
        signal = _check_scores(signal, self._scores.shape, "signal")
        if tokens < 0 or steps < 0:
            raise ValueError(f"tokens and steps must be >= 0, got {tokens} and {steps}")
        if tokens == 0:
            if signal.any():
                raise ValueError("signal is non-zero but tokens is 0; pass the number of tokens it came from")
            return
        if steps == 0:
            raise ValueError("tokens without steps; pass the decode steps (or prefill length) they took")
        decay = 0.5 ** (steps / self.half_life_steps)
        self._scores = decay * self._scores + (1.0 - decay) * (signal / tokens)

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON; atomic, so a crash never leaves a half-written warm-start file."""
        path = Path(path)
        payload = {
            "written_by": files.WRITTEN_BY,  # a later --save-hotness may replace it (`files.is_own_file`)
            "layers": self.num_layers,
            "experts": self.num_experts,
            "half_life_steps": self.half_life_steps,
            "scores": self._scores.tolist(),
        }
        files.write_atomic(path, json.dumps(payload))

    @classmethod
    def load(
        cls,
        path: str | Path,
        half_life_steps: float | None = None,
        *,
        expect_shape: tuple[int, int] | None = None,
    ) -> "HotnessTracker":
        """Read a profile written by `save`.

        `half_life_steps` overrides the saved one; `expect_shape` is the model's
        (moe_layers, experts), checked so a profile from another model fails loudly.
        """
        path = Path(path)
        fix = "pass a file written by --save-hotness"
        d = inputs.read_json(path, fix, "hotness profile", ProfileError)
        try:
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, not an object")
            layers, experts = int(d["layers"]), int(d["experts"])
            saved_half_life = float(d["half_life_steps"])
            scores = d["scores"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"no field {e}" if isinstance(e, KeyError) else " ".join(str(e).split()) or type(e).__name__
            raise ProfileError(f"{path} is not a hotness profile ({why}); pass a file written by --save-hotness") \
                from None
        if expect_shape is not None and (layers, experts) != tuple(expect_shape):
            raise ProfileError(
                f"hotness profile {path} is for {layers} MoE layers x {experts} experts but the model has "
                f"{expect_shape[0]} x {expect_shape[1]}; record a profile with this model or drop --hotness"
            )
        if half_life_steps is None:
            half_life_steps = saved_half_life
        try:
            return cls(layers, experts, half_life_steps, scores)
        except ValueError as e:
            raise ProfileError(f"{path} is not a usable hotness profile ({e}); record it again with --save-hotness") \
                from None


def _check_scores(x, shape: tuple[int, int], what: str) -> np.ndarray:
    x = np.array(x, np.float64)  # copy: callers may reuse their buffers
    if x.shape != shape:
        raise ValueError(f"{what} have shape {x.shape}, expected [layers, experts] = {shape}")
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{what} must be finite and >= 0")
    return x


def per_layer_capacity(total_slots: int, num_layers: int, num_experts: int) -> np.ndarray:
    """DynaExq's rule: the same number of high-precision slots per layer, [layers] int.

    The remainder of the division goes to the first layers; no layer gets more than
    `num_experts` (slots beyond layers*experts are left unused).
    """
    if total_slots < 0:
        raise ValueError(f"total_slots must be >= 0, got {total_slots}")
    cap = np.full(num_layers, total_slots // num_layers, np.int64)  # [layers]
    cap[: total_slots % num_layers] += 1
    return np.minimum(cap, num_experts)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Position of each expert in its layer when sorted by score desc, then index asc. [L, E]"""
    order = np.argsort(-scores, axis=1, kind="stable")  # [L, E]
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :], axis=1)
    return ranks


def global_capacity(scores, total_slots: int) -> np.ndarray:
    """Slots per layer, [layers] int, from the global top-`total_slots` (layer, expert) pairs.

    This maximises the share of routed pairs that hit a high-precision copy (the sum of the
    slotted experts' scores) under a model-wide budget: layers whose traffic is concentrated on
    few experts need fewer slots than flat ones. Ties are broken by within-layer rank first, so
    pairs with equal scores are spread across layers round-robin; with no information (all
    scores equal) this gives exactly `per_layer_capacity`.
    """
    scores = np.asarray(scores, np.float64)  # [L, E]
    if total_slots < 0:
        raise ValueError(f"total_slots must be >= 0, got {total_slots}")
    num_layers, _ = scores.shape
    layer = np.broadcast_to(np.arange(num_layers)[:, None], scores.shape)
    # np.lexsort sorts by the last key first: score desc, then within-layer rank, then layer.
    order = np.lexsort((layer.ravel(), _ranks(scores).ravel(), -scores.ravel()))
    chosen = layer.ravel()[order[:total_slots]]
    return np.bincount(chosen, minlength=num_layers).astype(np.int64)


def select_resident(
    scores,
    capacity,
    current,
    *,
    hysteresis: float = 0.01,
    max_swaps_per_layer: int | None = None,
) -> np.ndarray:
    """Which experts should hold high-precision slots next, [layers, experts] bool.

    Per layer l, starting from `current`:
      1. If more than capacity[l] are resident (capacity shrank), drop the weakest.
      2. Fill empty slots with the best outsiders whose score is > 0 (not counted as swaps).
      3. Replace the weakest incumbent with the best outsider while the outsider's score exceeds
         the incumbent's by more than `hysteresis`, at most `max_swaps_per_layer` times.

    `hysteresis` is absolute, in score units (per-token rate): 0.01 means "selected by at least
    one more token in a hundred". An absolute margin keeps cold experts, whose relative
    differences are large but worthless, from churning, and matches DynaExq's published rule.
    The comparison is strict, so ties never swap; equal scores are ordered by expert index.
    """
    scores = np.asarray(scores, np.float64)  # [L, E]
    current = np.asarray(current, bool)  # [L, E]
    capacity = np.asarray(capacity)  # [L]
    num_layers, num_experts = scores.shape
    if current.shape != scores.shape or capacity.shape != (num_layers,):
        raise ValueError(
            f"shapes disagree: scores {scores.shape}, current {current.shape}, capacity {capacity.shape}"
        )
    if (capacity < 0).any():
        raise ValueError("capacity must be >= 0")
    if hysteresis < 0:
        raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")

    ranks = _ranks(scores)  # [L, E], 0 = hottest
    target = current.copy()
    for l in range(num_layers):
        row = target[l]
        # Best-first orders; sorting by rank gives score desc with index as the tie-break.
        inc = sorted(np.flatnonzero(row), key=lambda e: ranks[l, e])
        out = sorted(np.flatnonzero(~row), key=lambda e: ranks[l, e])
        cap = min(int(capacity[l]), num_experts)

        for e in inc[cap:]:
            row[e] = False
        inc = inc[:cap]

        fill = [e for e in out[: cap - len(inc)] if scores[l, e] > 0]
        row[fill] = True
        inc, out = inc + fill, out[len(fill):]

        swaps = 0
        weakest_first = inc[::-1]
        for new, old in zip(out, weakest_first):
            if max_swaps_per_layer is not None and swaps >= max_swaps_per_layer:
                break
            # Outsiders descend and incumbents ascend, so the first pair that fails ends the loop.
            if not scores[l, new] > scores[l, old] + hysteresis:
                break
            row[new], row[old] = True, False
            swaps += 1
    return target


def plan_swaps(current, target, scores=None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Copies that turn `current` into `target`: (demotions, promotions) of (layer, expert).

    Demotions come first so their slots are free before any promotion needs one. Promotions are
    ordered by descending score when `scores` is given (the most valuable copies land first if
    the caller spreads them over several steps), otherwise by (layer, expert).
    """
    current = np.asarray(current, bool)
    target = np.asarray(target, bool)
    if current.shape != target.shape:
        raise ValueError(f"current {current.shape} and target {target.shape} differ in shape")
    demotions = [(int(l), int(e)) for l, e in zip(*np.nonzero(current & ~target))]
    promotions = [(int(l), int(e)) for l, e in zip(*np.nonzero(target & ~current))]
    if scores is not None:
        scores = np.asarray(scores, np.float64)
        promotions.sort(key=lambda le: -scores[le])  # stable: ties keep (layer, expert) order
    return demotions, promotions


def routing_concentration(scores, fraction: float = 0.25) -> np.ndarray:
    """Share of each layer's score mass held by its top `fraction` of experts, [layers].

    1.0 means all traffic goes to that top group; `fraction` means uniform routing. A layer with
    no mass yet gives nan ("unknown"), not 0, which would read as "flatter than uniform".
    """
    scores = np.asarray(scores, np.float64)  # [L, E]
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * scores.shape[1]))
    top = np.sort(scores, axis=1)[:, -k:].sum(axis=1)  # [L]
    total = scores.sum(axis=1)  # [L]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / total, np.nan)
