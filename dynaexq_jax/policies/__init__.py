"""Expert-residency policies: what the engine computes each step with, and how that changes.

A runtime exposes `experts` (the pytree the next step uses), `before_step()` (between steps:
land transfers, flip handles), `observe(counts, tokens)` (after a step: the routing trace,
[moe_layers, E] pair counts on the host) and `stats()`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.policies import hotness
from dynaexq_jax.experts import quant
from dynaexq_jax.io import store
from dynaexq_jax.experts.expert_state import DenseExperts, MixedExperts
from dynaexq_jax.experts.swap import HostBank, Swapper

POLICIES = ("dynaexq", "full", "static", "offload", "prefetch")


class StaticRuntime:
    """Experts that never change (every expert at one precision)."""

    def __init__(self, experts, lo_bits: int | None = None):
        self.experts = experts
        self.lo_bits = lo_bits

    def before_step(self) -> None:
        pass

    def observe(self, counts: np.ndarray, tokens: int) -> None:
        pass

    def stats(self) -> dict:
        return {
            "slots": None, "lo_bits": self.lo_bits, "promotions": 0, "demotions": 0, "h2d_bytes": 0,
            "transfer_wait_s": 0.0,
        }


@dataclasses.dataclass(frozen=True)
class DynaExqOptions:
    lo_bits: int = 4
    hi_dtype: str = "bfloat16"  # or "int8"
    group_size: int = 128
    quant_method: str = "rtn"
    rebalance_every: int = 16  # decode steps between residency decisions
    half_life_tokens: float = 256.0
    hysteresis: float = 0.01  # per-token selection rate an outsider must win by
    allocation: str = "per_layer"  # or "global"
    max_swaps_per_layer: int | None = 4
    bytes_per_step: int | None = None  # promotion bytes started per step; None = 4 experts
    blocking: bool = False  # land every promotion before the next step (the comparison variant)


class DynaExqRuntime:
    """Online hotness -> budget-feasible top-n per layer -> asynchronous swaps."""

    def __init__(self, swapper: Swapper, tracker: hotness.HotnessTracker, opts: DynaExqOptions):
        self.swapper = swapper
        self.tracker = tracker
        self.opts = opts
        self._counts = np.zeros(tracker.scores.shape)
        self._tokens = 0
        self._steps = 0

    @property
    def experts(self) -> MixedExperts:
        return self.swapper.experts

    @property
    def num_slots(self) -> int:
        return self.swapper.owner.shape[0]

    def capacity(self) -> np.ndarray:
        L, E = self.tracker.scores.shape
        if self.opts.allocation == "global":
            return hotness.global_capacity(self.tracker.scores, self.num_slots)
        return hotness.per_layer_capacity(self.num_slots, L, E)

    def rebalance(self) -> None:
        """Fold the trace into hotness, pick the resident set, queue demotions and promotions."""
        if self._tokens:
            self.tracker.update(self._counts, self._tokens)
            self._counts[:] = 0
            self._tokens = 0
        scores = self.tracker.scores
        current = self.swapper.wanted()
        target = hotness.select_resident(
            scores,
            self.capacity(),
            current,
            hysteresis=self.opts.hysteresis,
            max_swaps_per_layer=self.opts.max_swaps_per_layer,
        )
        demote, promote = hotness.plan_swaps(current, target, scores)
        for le in demote:
            self.swapper.demote(*le)
        for le in promote:
            self.swapper.promote(*le)

    def before_step(self) -> None:
        self.swapper.poll()

    def observe(self, counts: np.ndarray, tokens: int) -> None:
        self._counts += counts
        self._tokens += tokens
        self._steps += 1
        if (self._steps - 1) % self.opts.rebalance_every == 0:  # after prefill, then every N steps
            self.rebalance()

    def stats(self) -> dict:
        s = self.swapper.stats
        return {
            "slots": self.num_slots,
            "promotions": s.promotions,
            "demotions": s.demotions,
            "h2d_bytes": s.h2d_bytes,
            "transfer_wait_s": s.transfer_wait_s,
            "failed_promotions": s.failed,
            "host_bank": self.swapper.bank.memory_kind,
        }


def build_mixed_experts(
    host: DenseExperts, num_slots: int, opts: DynaExqOptions, *, source=None, device=None, with_bank: bool = True
):
    """Quantize every expert to its fallback, allocate the slot pool, stage the host bank
    (None without `with_bank`).

    Quantization runs on the CPU backend one layer at a time, so loading never holds a
    layer's bf16 experts on the accelerator. Its results (fallbacks, int8 host copies) go
    through `store.cached`: reused across runs when `source` names their checkpoint directory.
    """
    device = device or jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    to_dev = lambda t: jax.device_put(t, device)
    pieces = ("gate_up", "down")

    def quantize_all(bits: int, method: str) -> dict:
        # {layer_i: {gate_up|down: {packed, scales, zeros}}} of host numpy, [E, ...] per leaf
        out = {}
        for i, ws in enumerate(zip(host.gate_up, host.down)):
            with jax.default_device(cpu):
                qs = [quant.quantize(jnp.asarray(w, jnp.float32), bits, opts.group_size, method) for w in ws]
            out[f"layer_{i}"] = {n: dict(zip(("packed", "scales", "zeros"), jax.device_get(jax.tree.leaves(q))))
                                 for n, q in zip(pieces, qs)}
        return out

    def as_tensors(tree: dict, bits: int) -> list[tuple[quant.QuantizedTensor, ...]]:
        shapes = (host.gate_up[0].shape, host.down[0].shape)
        return [
            tuple(quant.QuantizedTensor(**tree[f"layer_{i}"][n], bits=bits, group_size=opts.group_size, shape=sh)
                  for n, sh in zip(pieces, shapes))
            for i in range(len(host.gate_up))
        ]

    def settings(bits: int, method: str) -> dict:
        return {"bits": bits, "group_size": opts.group_size, "method": method, "dtype": str(host.gate_up[0].dtype)}

    lo = as_tensors(store.cached(source, "fallback", settings(opts.lo_bits, opts.quant_method),
                                 lambda: quantize_all(opts.lo_bits, opts.quant_method)), opts.lo_bits)
    lo_gu = [to_dev(gu) for gu, _ in lo]
    lo_d = [to_dev(d) for _, d in lo]
    if not with_bank:
        bank = None
    elif opts.hi_dtype == "int8":
        hi = as_tensors(store.cached(source, "hi-int8", settings(8, "rtn"), lambda: quantize_all(8, "rtn")), 8)
        E = host.gate_up[0].shape[0]
        one = lambda qt, e: dataclasses.replace(jax.tree.map(lambda a: a[e], qt), shape=qt.shape[1:])  # host slice
        bank = ([(one(gu, e), one(d, e)) for e in range(E)] for gu, d in hi)
    else:  # slots hold the checkpoint's own precision (bf16; float32 in exactness tests)
        # A generator: HostBank pins one layer at a time, never two copies of every expert.
        bank = ([(wgu[e], wd[e]) for e in range(wgu.shape[0])] for wgu, wd in zip(host.gate_up, host.down))
    L, E = len(host.gate_up), host.gate_up[0].shape[0]
    (K1, N1), (K2, N2) = host.gate_up[0].shape[1:], host.down[0].shape[1:]
    S = num_slots
    if opts.hi_dtype == "int8":
        with jax.default_device(cpu):
            pool_gu = quant.quantize(jnp.zeros((max(S, 1), K1, N1)), 8, opts.group_size)
            pool_d = quant.quantize(jnp.zeros((max(S, 1), K2, N2)), 8, opts.group_size)
        pool_gu, pool_d = (jax.tree.map(lambda a: a[:S], p) for p in (pool_gu, pool_d))
        pool_gu = dataclasses.replace(pool_gu, shape=(S, K1, N1))
        pool_d = dataclasses.replace(pool_d, shape=(S, K2, N2))
    else:
        pool_gu = jnp.zeros((S, K1, N1), host.gate_up[0].dtype)
        pool_d = jnp.zeros((S, K2, N2), host.down[0].dtype)
    experts = MixedExperts(
        lo_gate_up=tuple(lo_gu),
        lo_down=tuple(lo_d),
        hi_gate_up=to_dev(pool_gu),
        hi_down=to_dev(pool_d),
        slot_of=to_dev(jnp.full((L, E), -1, jnp.int32)),
        owner=to_dev(jnp.full((S,), -1, jnp.int32)),
    )
    return experts, HostBank(bank, device) if with_bank else None


def dynaexq_runtime(
    host: DenseExperts,
    plan: budget_lib.MemoryPlan,
    opts: DynaExqOptions,
    *,
    hotness_profile: str | None = None,
    transfer=None,
    source=None,
) -> DynaExqRuntime:
    """`source`: the checkpoint directory `host` came from, for the converted-expert cache."""
    experts, bank = build_mixed_experts(host, plan.slots, opts, source=source)
    L, E = len(host.gate_up), host.gate_up[0].shape[0]
    if hotness_profile:
        tracker = hotness.HotnessTracker.load(hotness_profile, opts.half_life_tokens, expect_shape=(L, E))
    else:
        tracker = hotness.HotnessTracker(L, E, opts.half_life_tokens)
    per_step = opts.bytes_per_step or 4 * bank.expert_nbytes
    swapper = Swapper(experts, bank, bytes_per_step=per_step, transfer=transfer, blocking=opts.blocking)
    runtime = DynaExqRuntime(swapper, tracker, opts)
    if hotness_profile:
        # Warm start: land the profile's hot set at load time, before any step is timed.
        runtime.rebalance()
        while swapper.pending or swapper.inflight:
            jax.block_until_ready([t.result() for _, t in swapper.inflight.values()])
            swapper.poll()
    return runtime


def build_engine(
    ckpt,
    policy: str,
    *,
    budget: int | None,
    batch: int,
    longest_prompt: int,
    max_new_tokens: int,
    opts: DynaExqOptions = DynaExqOptions(),
    hotness_profile: str | None = None,
    transfer=None,
):
    """An Engine for `policy` on a checkpoint loaded with `experts_on_device=False`, sized
    for `batch` prompts of up to `longest_prompt` tokens plus `max_new_tokens`.

    Returns (engine, memory plan). The plan's `total` is the accounted device bytes.
    """
    from dynaexq_jax.runtime import engine as engine_lib

    if policy not in POLICIES:
        raise budget_lib.BudgetError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    cfg = ckpt.config
    prompt = engine_lib.prompt_bucket(longest_prompt)
    context = engine_lib.cache_bucket(prompt + max_new_tokens)
    group = budget_lib.expert_group_size(cfg, opts.group_size)
    opts = dataclasses.replace(opts, group_size=group)
    plan = budget_lib.policy_plan(
        cfg, policy, budget=budget, batch=batch, prompt=prompt, context=context,
        dtype_itemsize=ckpt.dtype.itemsize, lo_bits=opts.lo_bits, hi_dtype=opts.hi_dtype,
        group_size=group, xla_dequant=jax.default_backend() != "gpu",
    )
    if policy == "full":
        host = ckpt.experts  # per-layer arrays, or lazily generated ones (presets)
        experts = DenseExperts(tuple(map(jax.device_put, host.gate_up)), tuple(map(jax.device_put, host.down)))
        return engine_lib.Engine(dataclasses.replace(ckpt, experts=experts)), plan
    if policy == "static":
        experts, _ = build_mixed_experts(
            ckpt.experts, 0, dataclasses.replace(opts, lo_bits=plan.lo_bits), source=ckpt.path, with_bank=False
        )
        return engine_lib.Engine(ckpt, StaticRuntime(experts, lo_bits=plan.lo_bits)), plan
    if policy in ("offload", "prefetch"):
        from dynaexq_jax.policies import offload

        return offload.build_engine(ckpt, plan, policy=policy, batch=batch), plan
    runtime = dynaexq_runtime(
        ckpt.experts, plan, opts, hotness_profile=hotness_profile, transfer=transfer, source=ckpt.path
    )
    return engine_lib.Engine(ckpt, runtime), plan
