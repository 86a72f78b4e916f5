"""`dynaexq`: every expert on a low-bit fallback; the hottest also in high-precision slots.

The fallback may be mixed (auto tiers, `policies.autotier`): some experts stored at a wider
width than the rest, each once; a demoted expert returns to its own.

Online hotness (router-probability mass per token, decayed over decode steps) -> a
budget-feasible top-n per layer with hysteresis -> asynchronous swaps (`experts.swap`).

Warm from the first token: before a request's first step every slot holds an expert, chosen
from (in order) the `--hotness` profile given, the profile saved for this checkpoint by an
earlier run, or the request's own prompt routed on the fallbacks. With room for every expert,
all are resident and the output equals `full`'s.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np

from dynaexq_jax.budget import HI_BITS, STAGING_EXPERTS
from dynaexq_jax.experts.expert_state import device_biases
from dynaexq_jax.experts.swap import Swapper
from dynaexq_jax.io import store
from dynaexq_jax.policies import hotness
from dynaexq_jax.policies.full import FixedPolicy
from dynaexq_jax.policies.tiers import Stopwatch, fallback_and_bank, host_bank, slot_pool


@dataclasses.dataclass(frozen=True)
class DynaExqOptions:
    lo_bits: int | str = 4  # or "mxfp4", or "auto": the plan picks (`policies.autotier`, resolved by `build_engine`)
    hi_dtype: str = "bfloat16"  # or "int8", or "auto"
    group_size: int = 128
    quant_method: str = "rtn"
    rebalance_every: int = 16  # decode steps between residency decisions
    half_life_steps: float = 256.0  # hotness horizon, in decode steps (prefill: its length)
    hysteresis: float = 0.01  # per-token rate an outsider must win by
    allocation: str = "per_layer"  # or "global"
    max_swaps_per_layer: int | None = 4
    bytes_per_step: int | None = None  # promotion bytes started per step (None: 4 experts; <= 2 in flight)
    blocking: bool = False  # land every promotion before the next step (the comparison variant)
    save_profile: bool = True  # keep this checkpoint's profile for the next run's warm start
    max_slots: int | None = None  # at most this many slots whatever the budget leaves (auto tiers' choice)
    mid_bits: int | None = None  # a wider fallback width for the experts in `mid_experts` (auto tiers' choice)
    mid_experts: tuple[tuple[int, int], ...] = ()  # (MoE layer, expert) pairs stored at mid_bits


class DynaExqPolicy:
    name = "dynaexq"
    layerwise = False

    def __init__(self, swapper: Swapper, tracker: hotness.HotnessTracker, opts: DynaExqOptions, *,
                 informed: bool, profile_path=None, convert_s: float = 0.0):
        self.swapper = swapper
        self.tracker = tracker
        self.opts = opts
        # With a slot for every expert nothing can move: no routing statistics to read.
        self.observe_every = None if swapper.num_slots >= tracker.scores.size else opts.rebalance_every
        self.informed = informed  # the tracker holds a profile (given or saved), not zeros
        self.warm = False
        self.profile_path = profile_path
        self.convert_s = convert_s  # quantizing the fallbacks (and int8 slots' host copies) at build

    @property
    def experts(self):
        return self.swapper.experts

    @property
    def num_slots(self) -> int:
        return self.swapper.num_slots

    def capacity(self) -> np.ndarray:
        L, E = self.tracker.scores.shape
        if self.opts.allocation == "global":
            return hotness.global_capacity(self.tracker.scores, self.num_slots)
        return hotness.per_layer_capacity(self.num_slots, L, E)

    def prepare(self, routing_pass) -> None:
        if self.warm:
            return
        L, E = self.tracker.scores.shape
        if self.num_slots >= L * E:  # room for everyone: all resident, equal to `full`
            keys = [(l, e) for l in range(L) for e in range(E)]
        else:
            if not self.informed:
                self.tracker.update(*routing_pass())
                self.informed = True
            target = hotness.select_resident(self.tracker.scores, self.capacity(), np.zeros((L, E), bool),
                                             hysteresis=self.opts.hysteresis, max_swaps_per_layer=None)
            _, keys = hotness.plan_swaps(np.zeros((L, E), bool), target, self.tracker.scores)
        self.swapper.fill(keys)
        self.warm = True

    def rebalance(self) -> None:
        """Pick the resident set from the scores; queue demotions, then promotions."""
        scores = self.tracker.scores
        current = self.swapper.wanted()
        target = hotness.select_resident(scores, self.capacity(), current, hysteresis=self.opts.hysteresis,
                                         max_swaps_per_layer=self.opts.max_swaps_per_layer)
        demote, promote = hotness.plan_swaps(current, target, scores)
        for le in demote:
            self.swapper.demote(*le)
        for le in promote:
            self.swapper.promote(*le)

    def between_steps(self) -> None:
        self.swapper.poll()

    def observe(self, mass, tokens, steps) -> None:
        self.tracker.update(mass, tokens, steps)
        self.informed = True
        self.rebalance()

    def after_request(self) -> None:
        if self.profile_path is None:
            return
        try:
            self.profile_path.parent.mkdir(parents=True, exist_ok=True)
            self.tracker.save(self.profile_path)
        except OSError as e:  # a read-only cache must not fail a finished run
            warnings.warn(f"could not save the hotness profile to {self.profile_path} ({e})")

    def settle(self) -> None:
        """Land every queued and in-flight copy now: an evaluation's settle points (the decode
        loop never waits on a copy)."""
        self.swapper.settle()

    def stats(self) -> dict:
        s = self.swapper.stats
        return {
            "slots": self.num_slots,
            "lo_bits": self.opts.lo_bits,
            "promotions": s.promotions,
            "demotions": s.demotions,
            "h2d_bytes": s.h2d_bytes,
            "transfer_wait_s": s.transfer_wait_s,
            "failed_promotions": s.failed,
            "fill_s": s.fill_s,
            "convert_s": self.convert_s,
            "host_bank": self.swapper.bank.memory_kind,
        }


def build(ckpt, plan, opts: DynaExqOptions, *, hotness_profile=None, transfer=None, progress: bool = False,
          device=None):
    """The dynaexq policy for `plan.slots` slots (a static one when the plan has none). One
    pass converts the fallbacks (and an int8/int4 slots' host bank); a bf16 bank is the
    checkpoint's own experts, read on promotion."""
    host = ckpt.experts
    device = device or jax.devices()[0]  # committed arrays: every published state has one placement
    L, E = host.num_layers, host.num_experts
    clock = Stopwatch()
    mid = None
    if opts.mid_experts:
        mid = np.zeros((L, E), bool)
        mid[tuple(np.array(opts.mid_experts).T)] = True
    bank_bits = HI_BITS.get(opts.hi_dtype) if plan.slots else None
    fallback, hi_layers = fallback_and_bank(host, opts.lo_bits, opts.group_size, opts.quant_method,
                                            mid_bits=opts.mid_bits, mid=mid, bank_bits=bank_bits, source=ckpt.source,
                                            device=device, room=plan.unallocated, progress=progress, clock=clock)
    if plan.slots == 0:
        return FixedPolicy("dynaexq", fallback, lo_bits=opts.lo_bits, convert_s=clock.seconds)
    bank = host_bank(host, hi_layers, device)
    pool = slot_pool(host, plan.slots, opts.hi_dtype, opts.group_size, device)
    per_step = opts.bytes_per_step or 4 * bank.expert_nbytes
    swapper = Swapper(fallback, pool, bank, L, bytes_per_step=per_step, max_inflight=STAGING_EXPERTS,
                      transfer=transfer, blocking=opts.blocking, device=device, biases=device_biases(host, device))
    saved = store.profile_path(ckpt.source) if opts.save_profile else None
    tracker, informed = warm_tracker(ckpt, opts, hotness_profile)
    return DynaExqPolicy(swapper, tracker, opts, informed=informed, profile_path=saved, convert_s=clock.seconds)


def warm_tracker(ckpt, opts: DynaExqOptions, hotness_profile=None) -> tuple[hotness.HotnessTracker, bool]:
    """The hotness a run starts from, and whether it is informed: the profile given (a path, or
    a `HotnessTracker` already made, e.g. from calibration text), else the one saved for this
    checkpoint (unless `opts.save_profile` is off), else zeros."""
    host = ckpt.experts
    L, E = host.num_layers, host.num_experts
    if isinstance(hotness_profile, hotness.HotnessTracker):
        return hotness.HotnessTracker(L, E, opts.half_life_steps, hotness_profile.scores), True
    if hotness_profile:
        return hotness.HotnessTracker.load(hotness_profile, opts.half_life_steps, expect_shape=(L, E)), True
    saved = store.profile_path(ckpt.source) if opts.save_profile else None
    if saved is not None and saved.is_file():
        try:
            return hotness.HotnessTracker.load(saved, opts.half_life_steps, expect_shape=(L, E)), True
        except ValueError as e:
            warnings.warn(f"ignoring the saved hotness profile ({e})")
    return hotness.HotnessTracker(L, E, opts.half_life_steps), False
