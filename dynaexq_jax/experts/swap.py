"""Asynchronous promotion and instant demotion of experts between decode steps.

A promotion goes through three stages, none of which makes a step wait:
1. an asynchronous host -> device `jax.device_put` of the expert's high-precision copy (from the
   host bank's pageable memory: `HostBank`), started within a per-step byte budget and
   only while fewer than `max_inflight` copies are on the device (the plan's staging);
2. once that copy `is_ready()` and did not fail, a jitted in-place write of the slot (the pool
   is donated, so XLA orders the write after every step already enqueued that reads it);
3. only then the expert's handle flips to the slot, in a newly published expert state.
A demotion flips the handle back to the fallback at once and frees the slot.

Published states are fresh device arrays made from fresh host arrays, never views of the
swapper's own bookkeeping, so a step dispatched earlier computes with the handles in force
when it was dispatched. A copy that fails, or does not land within `stall_s`, never reaches
the pool: the expert stays on its fallback and its slot is freed.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Iterable

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier, layer_major_handles, update_rows


def host_memory_kind(device) -> str | None:
    """'pinned_host' where the backend offers it (jax >= 0.4.32 on GPU and CPU), else None."""
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except (AttributeError, NotImplementedError):
        return None
    return "pinned_host" if "pinned_host" in kinds else None


class Transfer:
    """One expert's host -> device copy in flight."""

    def __init__(self, device_tree):
        self.tree = device_tree

    def ready(self) -> bool:
        return all(a.is_ready() for a in jax.tree.leaves(self.tree))

    def result(self):
        """The copied pytree; raises if the copy failed (instant once `ready()`)."""
        return jax.block_until_ready(self.tree)


def stage(host_tree, device=None):
    """Start the asynchronous copy of a host pytree into device memory."""
    return jax.device_put(host_tree, SingleDeviceSharding(device or jax.devices()[0]))


def device_put_transfer(device) -> Callable[[object], Transfer]:
    return lambda host_tree: Transfer(stage(host_tree, device))


class HostBank:
    """High-precision copies of every expert on the host, read one expert at a time (a small
    pytree each) from memory that already exists: the checkpoint's mapped files, a mapped entry
    of the converted-expert cache, or a preset's generator. Nothing is copied up front; a
    promotion reads its expert and copies it to the device.

    Per-expert reads (rather than one array per layer) let a transfer move exactly one expert
    without a device-side gather from host memory. Transfers start from pageable memory: pinning
    the whole bank would double the host memory it takes (on the H200, 7.6 GB/s pageable: one
    Qwen3-30B bf16 expert, 9.4 MB, in ~1.2 ms, well inside the steps a promotion spans).
    """

    def __init__(self, read: Callable[[int, int], object], expert_nbytes: int, memory_kind: str, device=None,
                 arrive: Callable[[object], object] | None = None):
        """`read(layer, expert)`: the expert's pytree on the host; `memory_kind` says where it
        lives (reported in a run's stats); `arrive`: what a copy of a read becomes on the
        device before it is written into a slot (a checkpoint's stored [out, in] tensors
        transposed there: numpy's transposing copy of bf16 runs at 0.24 GB/s on the CPU
        machines), None: the copy as it is."""
        self.read = read
        self.expert_nbytes = int(expert_nbytes)
        self.memory_kind = memory_kind
        self.device = device
        self._arrive = arrive

    def __getitem__(self, key: tuple[int, int]):
        layer, expert = key
        return self.read(layer, expert)

    def arrive(self, copied):
        """A read copied to the device -> the expert's pytree for its slot (asynchronous)."""
        return copied if self._arrive is None else self._arrive(copied)


def _write_slot_impl(pool, staged, slot):
    """-> (the pool with `staged` in row `slot`, a scalar that is ready once the write has run:
    until then the staged copy holds its device memory)."""
    # Leaf by leaf: a pool QuantizedTensor [S, K, N] and one staged expert [K, N] differ in
    # their static shape, so they are not the same pytree structure.
    leaves, treedef = jax.tree.flatten(pool)
    new = [update_rows(p, s[None], slot) for p, s in zip(leaves, jax.tree.leaves(staged))]
    return jax.tree.unflatten(treedef, new), slot + 1


write_slot = jax.jit(_write_slot_impl, donate_argnums=(0,))


@dataclasses.dataclass
class SwapStats:
    promotions: int = 0
    demotions: int = 0
    cancelled: int = 0
    failed: int = 0
    h2d_bytes: int = 0
    transfer_wait_s: float = 0.0
    fill_s: float = 0.0  # warm start: slots filled before the first step


class Swapper:
    """Owns the slot pool and the handles; the engine reads `experts` before every step.

    `fallback` stores every expert: one tier (row `layer * E + expert`), or an `ExpertState`
    whose handles say where each expert's fallback is; `pool` holds the slots.
    """

    def __init__(
        self,
        fallback: ExpertTier | ExpertState,
        pool: ExpertTier,
        bank: HostBank,
        num_layers: int,
        *,
        bytes_per_step: int,
        max_inflight: int,
        transfer: Callable[[object], Transfer] | None = None,
        blocking: bool = False,
        stall_s: float = 30.0,
        device=None,
        biases: dict | None = None,
    ):
        """`max_inflight`: expert copies on the device at once on their way into slots (copied
        or being written; the plan's staging, `budget.staging_nbytes`), in the warm start's fill
        as between steps. `biases`: the `ExpertState` bias fields every published state carries
        (`device_biases`)."""
        self.device = device or jax.devices()[0]
        self.biases = biases or {}
        if isinstance(fallback, ExpertTier):  # every expert in one tier, layer-major
            self._lo_tiers = (fallback,)
            self._lo_handles = layer_major_handles(num_layers, fallback.rows // num_layers)
        else:  # an ExpertState: fallbacks spread over tiers of several widths
            self._lo_tiers = fallback.tiers
            self._lo_handles = (np.asarray(fallback.tier_of), np.asarray(fallback.row_of))
        self._pool = (pool.gate_up, pool.down)
        self.num_layers = num_layers
        E = self._lo_handles[0].shape[1]
        self.slot_of = np.full((num_layers, E), -1, np.int32)  # [moe_layers, E]; -1 = fallback
        self.owner = np.full((pool.rows,), -1, np.int32)  # [S]: layer * E + expert, -1 = free
        self.bank = bank
        self.bytes_per_step = max(int(bytes_per_step), bank.expert_nbytes)
        self.max_inflight = max(int(max_inflight), 1)
        self._writing: list[jax.Array] = []  # `write_slot`'s scalars of the writes not known to have run
        self.transfer = transfer or device_put_transfer(self.device)
        self.blocking = blocking  # wait for each transfer (the "blocking migration" variant)
        self.stall_s = stall_s
        self.pending: list[tuple[int, int]] = []  # promotions not yet started, in order
        self.inflight: dict[tuple[int, int], tuple[int, Transfer, float]] = {}  # -> (slot, transfer, start)
        self.stats = SwapStats()
        self._publish()

    # ------------------------------------------------------------------ queries
    @property
    def num_experts(self) -> int:
        return self.slot_of.shape[1]

    @property
    def num_slots(self) -> int:
        return self.owner.shape[0]

    def resident(self) -> np.ndarray:
        """[moe_layers, E] bool: experts whose handle points at a slot now."""
        return self.slot_of >= 0

    def wanted(self) -> np.ndarray:
        """Residents plus promotions in flight or queued: the set the policy asked for."""
        w = self.resident().copy()
        for le in list(self.inflight) + self.pending:
            w[le] = True
        return w

    def staged(self) -> int:
        """Expert copies on the device not yet in their slots: in flight, or landed and being written."""
        self._writing = [d for d in self._writing if not d.is_ready()]
        return len(self.inflight) + len(self._writing)

    def free_slots(self) -> list[int]:
        reserved = {slot for slot, _, _ in self.inflight.values()}
        return [s for s in np.flatnonzero(self.owner < 0) if s not in reserved]

    @property
    def experts(self) -> ExpertState:
        return self._experts

    # ------------------------------------------------------------------ requests
    def demote(self, layer: int, expert: int) -> None:
        key = (layer, expert)
        if key in self.pending:
            self.pending.remove(key)
        elif key in self.inflight:
            del self.inflight[key]  # the slot was only reserved; nothing reads it
            self.stats.cancelled += 1
        elif self.slot_of[key] >= 0:
            self.owner[self.slot_of[key]] = -1
            self.slot_of[key] = -1
            self.stats.demotions += 1
            self._publish()

    def promote(self, layer: int, expert: int) -> None:
        key = (layer, expert)
        if self.slot_of[key] < 0 and key not in self.inflight and key not in self.pending:
            self.pending.append(key)

    # ------------------------------------------------------------------ progress
    def poll(self) -> None:
        """Between steps: land finished transfers, then start new ones within the byte rate."""
        if not self.inflight and not self.pending:  # the common case between rebalances: nothing to do
            return
        landed = False
        for key, (slot, tr, t0) in list(self.inflight.items()):
            if self.blocking:
                tw = time.perf_counter()
                jax.block_until_ready(tr.tree)
                self.stats.transfer_wait_s += time.perf_counter() - tw
            elif not tr.ready():
                if time.perf_counter() - t0 > self.stall_s:
                    self._fail(key, f"no copy after {self.stall_s:g} s")
                continue
            landed |= self._land(key, slot, tr)
        started = 0
        free = self.free_slots()
        while (self.pending and free and started + self.bank.expert_nbytes <= self.bytes_per_step
               and self.staged() < self.max_inflight):
            key = self.pending.pop(0)
            if self._start(key, free.pop(0)):
                started += self.bank.expert_nbytes
        if landed:
            self._publish()
        if self.blocking and self.inflight:
            self.poll()

    def settle(self) -> None:
        """Land every in-flight promotion now, and every queued one a free slot can take,
        `max_inflight` at a time."""
        while self.inflight or (self.pending and self.free_slots()):
            jax.block_until_ready([tr.tree for _, tr, _ in self.inflight.values()] + self._writing)
            self.poll()

    def fill(self, keys: Iterable[tuple[int, int]]) -> None:
        """Promote `keys` now, waiting for every copy: the warm start, before any step runs.
        At most `max_inflight` copies are on the device at once, as between steps."""
        t0 = time.perf_counter()
        free = self.free_slots()
        todo = [key for key in dict.fromkeys(keys) if self.slot_of[key] < 0 and key not in self.inflight]
        while (todo and free) or self.inflight or self._writing:
            while todo and free and self.staged() < self.max_inflight:
                self._start(todo.pop(0), free.pop(0))
            if self.inflight:  # the oldest copy: wait for it, write it
                key, (slot, tr, _) = next(iter(self.inflight.items()))
                try:
                    jax.block_until_ready(tr.tree)
                except Exception:
                    pass  # _land reports it
                self._land(key, slot, tr)
            elif self._writing:
                jax.block_until_ready(self._writing.pop(0))
        self._publish()
        jax.block_until_ready(self._pool)
        self.stats.fill_s += time.perf_counter() - t0

    def _start(self, key, slot) -> bool:
        try:
            tr = self.transfer(self.bank[key])
        except Exception as e:
            self._warn(key, e)
            return False
        self.inflight[key] = (slot, tr, time.perf_counter())
        self.stats.h2d_bytes += self.bank.expert_nbytes
        return True

    def _land(self, key, slot, tr: Transfer) -> bool:
        """Write a finished copy into its slot and flip the handle (bookkeeping only until the
        next publish). A failed copy never reaches the pool."""
        try:
            staged = tr.result()
        except Exception as e:  # the copy itself failed: surfaced here, not inside the write
            self._fail(key, e)
            return False
        del self.inflight[key]
        self._pool, done = write_slot(self._pool, self.bank.arrive(staged), jax.device_put(np.int32(slot), self.device))
        self._writing.append(done)
        self.slot_of[key] = slot
        self.owner[slot] = key[0] * self.num_experts + key[1]
        self.stats.promotions += 1
        return True

    def _fail(self, key, why) -> None:
        del self.inflight[key]
        self.stats.failed += 1
        self._warn(key, why)

    @staticmethod
    def _warn(key, why) -> None:
        warnings.warn(f"promotion of expert {key[1]} in MoE layer {key[0]} failed ({why}); it stays on its fallback")

    def _publish(self) -> None:
        tier_lo, row_lo = self._lo_handles
        slotted = self.slot_of >= 0
        tier_of = np.where(slotted, len(self._lo_tiers), tier_lo).astype(np.int32)  # fresh arrays: never views of
        row_of = np.where(slotted, self.slot_of, row_lo).astype(np.int32)  # the mutable bookkeeping
        pool = ExpertTier(self._pool[0], self._pool[1], high_precision=True)
        self._experts = ExpertState(
            tiers=(*self._lo_tiers, pool),
            tier_of=jax.device_put(tier_of, self.device),
            row_of=jax.device_put(row_of, self.device),
            **self.biases,
        )

    def check_invariants(self) -> None:
        """Handles and their inverse agree; no slot serves two experts."""
        held = self.slot_of[self.slot_of >= 0]
        assert len(set(held.tolist())) == len(held), "a slot is used by two experts"
        for layer, expert in zip(*np.nonzero(self.slot_of >= 0)):
            assert self.owner[self.slot_of[layer, expert]] == layer * self.num_experts + expert
        assert int((self.owner >= 0).sum()) == len(held)
        reserved = [s for s, _, _ in self.inflight.values()]
        assert not set(reserved) & set(held.tolist()), "an in-flight transfer targets a slot in use"
