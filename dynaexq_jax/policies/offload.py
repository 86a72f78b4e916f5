"""`offload` and `prefetch`: every expert in host memory, an LRU cache of device slots.

- `offload`: an expert a layer routes to that is not cached is loaded on demand, on the
  critical path: the layer waits for the host -> device copy, the copy is written into a slot
  (donated pool), then the layer's experts run.
- `prefetch`: `offload`, plus a guess of the next MoE layer's experts made from the current
  layer's output; their copies start at once and the next layer waits only for the ones it
  actually routes to (true misses are still loaded on demand).

Routing is known only inside a layer, so these policies are `layerwise`: the engine runs the
decoder layer by layer (`runtime.layerwise`), shows the policy which experts each MoE layer
routes to, and computes them with the expert states the policy answers (more than one round
when a layer needs more experts than there are slots).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier, HostExperts, device_biases
from dynaexq_jax.experts.swap import stage, write_slot
from dynaexq_jax.policies import NoBetweenStepWork
from dynaexq_jax.policies.tiers import host_bank

Key = tuple[int, int]  # (moe_layer, expert)


@dataclasses.dataclass
class CacheStats:
    hits: int = 0  # requests whose expert was cached (prefetched ones included)
    misses: int = 0  # requests loaded on demand
    evictions: int = 0
    prefetches: int = 0
    h2d_bytes: int = 0  # misses and prefetches
    prefetch_bytes: int = 0
    wasted_prefetch_bytes: int = 0  # prefetched, then not used by the layer it was for


class LRUSlots:
    """Which expert each device slot holds; a load evicts the least recently used one.

    Pure bookkeeping, no arrays, so its counters can be checked on a scripted trace. A
    request is one expert needed by one layer in one step, however many tokens chose it.
    """

    def __init__(self, num_slots: int, expert_nbytes: int):
        self.num_slots = num_slots
        self.expert_nbytes = expert_nbytes
        self._slot: collections.OrderedDict[Key, int] = collections.OrderedDict()  # least recent first
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._unused_prefetch: set[Key] = set()
        self.stats = CacheStats()

    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def request(self, key: Key, pinned: frozenset[Key] | set[Key] = frozenset()) -> tuple[int, bool]:
        """-> (slot serving `key`, whether it was cached). A miss takes a free slot or
        evicts the least recently used key not in `pinned` (the keys its layer runs with)."""
        if key in self._slot:
            self._slot.move_to_end(key)
            self._unused_prefetch.discard(key)
            self.stats.hits += 1
            return self._slot[key], True
        self.stats.misses += 1
        self.stats.h2d_bytes += self.expert_nbytes
        return self._insert(key, pinned), False

    def prefetch(self, key: Key, pinned: frozenset[Key] | set[Key] = frozenset()) -> int | None:
        """Reserve a slot for a predicted key (None if it is cached already)."""
        if key in self._slot:
            return None
        self.stats.prefetches += 1
        self.stats.prefetch_bytes += self.expert_nbytes
        self.stats.h2d_bytes += self.expert_nbytes
        self._unused_prefetch.add(key)
        return self._insert(key, pinned)

    def end_layer(self, layer: int) -> None:
        """The layer has run: its prefetches it did not request were wasted."""
        wasted = {k for k in self._unused_prefetch if k[0] == layer}
        self._unused_prefetch -= wasted
        self.stats.wasted_prefetch_bytes += len(wasted) * self.expert_nbytes

    def _insert(self, key: Key, pinned) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in self._slot if k not in pinned), None)
            if victim is None:
                raise RuntimeError(f"all {self.num_slots} slots are pinned; a layer may use at most that many at once")
            slot = self._slot.pop(victim)
            self.stats.evictions += 1
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self.stats.wasted_prefetch_bytes += self.expert_nbytes
        self._slot[key] = slot
        return slot


@dataclasses.dataclass
class RunStats:
    pairs: int = 0  # routed (real token, expert) pairs
    hit_pairs: int = 0  # ... whose expert was cached when its layer ran
    transfer_wait_s: float = 0.0  # host blocked on copies, demand loads and prefetches
    prefetch_wait_s: float = 0.0  # the part spent on prefetches still in flight


class OffloadPolicy(NoBetweenStepWork):
    """Experts on the host, `num_slots` of them at a time in a device slot pool (the
    checkpoint's dtype). At most `staging` copies are in flight at once, the room the memory
    plan reserves."""

    layerwise = True
    observe_every = None

    def __init__(self, host: HostExperts, num_slots: int, *, prefetch: bool, staging: int, device=None):
        self.name = "prefetch" if prefetch else "offload"
        self.prefetch_enabled = prefetch
        self.device = device or jax.devices()[0]
        L, E = host.num_layers, host.num_experts
        self.num_experts = E
        self.num_slots = min(num_slots, L * E)
        self.staging = min(staging, self.num_slots)
        self.bank = host_bank(host, device=self.device)  # the checkpoint's own experts, read on each load
        self.cache = LRUSlots(self.num_slots, self.bank.expert_nbytes)
        self._pool = tuple(jnp.zeros((self.num_slots,) + tuple(shape[1:]), host.dtype, device=self.device)
                           for shape in host.shapes)
        self._inflight: dict[Key, tuple[int, object]] = {}  # prefetches: key -> (slot, staged copy)
        # Each MoE layer's expert biases ([1, E, ...], small), resident: a layer's states carry its own.
        self._biases = [device_biases(host, self.device, slice(m, m + 1)) for m in range(L)]
        self.run = RunStats()

    @property
    def expert_nbytes(self) -> int:
        return self.bank.expert_nbytes

    # -------------------------------------------------------------- the policy interface
    def start_request(self) -> None:
        """Counters are per request; the cache's contents carry over."""
        self.cache.stats, self.run = CacheStats(), RunStats()

    def stats(self) -> dict:
        s, run = self.cache.stats, self.run
        return {
            "slots": self.num_slots,
            "lo_bits": None,  # no low-bit experts
            "promotions": s.misses + s.prefetches,
            "demotions": s.evictions,
            "h2d_bytes": s.h2d_bytes,
            "transfer_wait_s": run.transfer_wait_s,
            "misses": s.misses,
            "hits": s.hits,
            "prefetch_bytes": s.prefetch_bytes,
            "wasted_prefetch_bytes": s.wasted_prefetch_bytes,
            "prefetch_wait_s": run.prefetch_wait_s,
            "host_bank": self.bank.memory_kind,
            "fill_s": 0.0,
            "convert_s": 0.0,  # experts stay as loaded
        }

    # -------------------------------------------------------------- layer by layer
    def rounds(self, m: int, counts: np.ndarray) -> Iterator[ExpertState]:
        """The expert states MoE layer `m` computes with, given `counts` [E] routed pairs of
        real tokens: each round maps up to `num_slots` of the needed experts to their slots
        (the others' handles are -1: not computed in that round)."""
        needed = [(m, int(e)) for e in np.flatnonzero(counts)]
        self._land_prefetches(set(needed))
        # Cached experts go first, so no load of this layer evicts one before it has run.
        cached = [key for key in needed if key in self.cache]
        self.run.pairs += int(counts.sum())
        self.run.hit_pairs += int(sum(counts[e] for _, e in cached))
        order = cached + [key for key in needed if key not in self.cache]
        S = self.num_slots
        for r in range(0, len(order), S):  # more experts than slots (prefill): several rounds
            keys = order[r : r + S]
            row_of = np.full((1, self.num_experts), -1, np.int32)
            loads = []
            for key in keys:
                slot, hit = self.cache.request(key, pinned=set(keys))
                row_of[0, key[1]] = slot
                if not hit:
                    loads.append((slot, key))
            for i in range(0, len(loads), self.staging):
                self._load(loads[i : i + self.staging])
            pool = ExpertTier(self._pool[0], self._pool[1], high_precision=True)
            yield ExpertState(tiers=(pool,), tier_of=jax.device_put(np.zeros_like(row_of), self.device),
                              row_of=jax.device_put(row_of, self.device), **self._biases[m])
        self.cache.end_layer(m)

    def prefetch(self, m: int, counts: np.ndarray) -> None:
        """Start, without waiting, the copies of the experts MoE layer `m` is predicted to use
        (`counts` [E]: the union of every real token's predicted top-k): the most-chosen
        first, at most `staging`."""
        top = np.argsort(-counts, kind="stable")[: min(np.count_nonzero(counts), self.staging)]
        keys = [(m, int(e)) for e in top]
        pinned = set(keys)  # one guess must not evict another
        for key in keys:
            slot = self.cache.prefetch(key, pinned)
            if slot is not None:
                self._inflight[key] = (slot, stage(self.bank[key], self.device))

    def _write(self, slot: int, staged) -> None:
        self._pool, _ = write_slot(self._pool, self.bank.arrive(staged), jax.device_put(np.int32(slot), self.device))

    def _load(self, batch: list[tuple[int, Key]]) -> None:
        """Demand loads: copy, block until on the device, write the slots."""
        t0 = time.perf_counter()
        staged = [stage(self.bank[key], self.device) for _, key in batch]  # copies overlap each other
        jax.block_until_ready(staged)
        self.run.transfer_wait_s += time.perf_counter() - t0
        for (slot, _), s in zip(batch, staged):
            self._write(slot, s)

    def _land_prefetches(self, needed: set[Key]) -> None:
        """Write this layer's prefetched experts into their slots, waiting only for needed ones
        (the write of an unneeded one is enqueued behind its copy; the host goes on)."""
        for key, (slot, staged) in self._inflight.items():
            if key in needed:
                t0 = time.perf_counter()
                jax.block_until_ready(staged)
                dt = time.perf_counter() - t0
                self.run.transfer_wait_s += dt
                self.run.prefetch_wait_s += dt
            self._write(slot, staged)
        self._inflight.clear()


def build(ckpt, plan: budget_lib.MemoryPlan, *, prefetch: bool, batch: int, device=None) -> OffloadPolicy:
    """`plan` is `budget.policy_plan`'s for the policy: its workspace reserves staging room for
    one layer's copies in flight, at most `batch` x `experts_per_token` experts."""
    cfg = ckpt.config
    k = cfg.experts_per_token
    if plan.slots < k:
        raise budget_lib.BudgetError(f"offloading needs at least {k} expert slots (one token's experts), got "
                                     f"{plan.slots}")
    staging = min(batch * k, cfg.num_experts)
    return OffloadPolicy(ckpt.experts, plan.slots, prefetch=prefetch, staging=staging, device=device)
