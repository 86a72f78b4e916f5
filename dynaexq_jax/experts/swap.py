"""Asynchronous promotion and instant demotion of experts between decode steps.

A promotion goes through three stages, none of which makes a step wait:
1. an asynchronous host -> device `jax.device_put` of the expert's high-precision copy
   (from pinned host memory where the backend has it), started within a per-step byte budget;
2. once that copy `is_ready()`, a jitted in-place write of the slot (the pool is donated, so
   XLA orders the write after every step already enqueued that reads the old contents);
3. only then the expert's handle (`slot_of`) flips to the slot.
A demotion flips the handle back to the fallback at once and frees the slot; a transfer that
never completes never changes outputs, and one that fails leaves the expert on its fallback.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Iterable

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from dynaexq_jax.experts.expert_state import MixedExperts


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
        return self.tree


def stage(host_tree, device=None):
    """Start the asynchronous copy of a host pytree into device memory."""
    return jax.device_put(host_tree, SingleDeviceSharding(device or jax.devices()[0]))


def device_put_transfer(device) -> Callable[[object], Transfer]:
    return lambda host_tree: Transfer(stage(host_tree, device))


class HostBank:
    """High-precision copies of every expert on the host, one small pytree per expert.

    Per-expert arrays (rather than one per layer) let a transfer move exactly one expert
    without a device-side gather from host memory.
    """

    def __init__(self, layers: Iterable[list[object]], device=None):
        """`layers` yields each MoE layer's [E] expert pytrees; it is consumed one layer at a
        time, so a lazily made layer is pinned and dropped before the next one exists."""
        device = device or jax.devices()[0]
        kind = host_memory_kind(device)
        if kind is not None:
            sharding = SingleDeviceSharding(device, memory_kind=kind)
            layers = ([jax.device_put(t, sharding) for t in layer] for layer in layers)
        self.experts = list(layers)  # [moe_layers][E] -> (gate_up, down) pytree
        self.memory_kind = kind or "numpy"
        self.expert_nbytes = sum(a.nbytes for a in jax.tree.leaves(self.experts[0][0]))

    def __getitem__(self, key: tuple[int, int]):
        layer, expert = key
        return self.experts[layer][expert]


def _write_slot_impl(pool, staged, slot):
    # Leaf by leaf: a pool QuantizedTensor [S, K, N] and one staged expert [K, N] differ in
    # their static shape, so they are not the same pytree structure.
    leaves, treedef = jax.tree.flatten(pool)
    new = [jax.lax.dynamic_update_index_in_dim(p, s.astype(p.dtype), slot, 0) for p, s in zip(leaves, jax.tree.leaves(staged))]
    return jax.tree.unflatten(treedef, new)


_write_slot = jax.jit(_write_slot_impl, donate_argnums=(0,))


@dataclasses.dataclass
class SwapStats:
    promotions: int = 0
    demotions: int = 0
    cancelled: int = 0
    failed: int = 0
    h2d_bytes: int = 0
    transfer_wait_s: float = 0.0


class Swapper:
    """Owns the slot pool and the handles; the engine reads `experts` before every step."""

    def __init__(
        self,
        experts: MixedExperts,
        bank: HostBank,
        *,
        bytes_per_step: int,
        transfer: Callable[[object], Transfer] | None = None,
        blocking: bool = False,
    ):
        self._pool = (experts.hi_gate_up, experts.hi_down)
        self._lo = (experts.lo_gate_up, experts.lo_down)
        self.slot_of = np.asarray(experts.slot_of).copy()  # [moe_layers, E]
        self.owner = np.asarray(experts.owner).copy()  # [S]
        self.bank = bank
        self.bytes_per_step = max(int(bytes_per_step), bank.expert_nbytes)
        self.transfer = transfer or device_put_transfer(jax.devices()[0])
        self.blocking = blocking  # wait for each transfer (the "blocking migration" variant)
        self.pending: list[tuple[int, int]] = []  # promotions not yet started, in order
        self.inflight: dict[tuple[int, int], tuple[int, Transfer]] = {}  # -> (reserved slot, transfer)
        self.stats = SwapStats()
        self._experts = experts
        self._handles_sharding = experts.slot_of.sharding  # republished handles keep it: no retrace

    # ------------------------------------------------------------------ queries
    @property
    def num_experts(self) -> int:
        return self.slot_of.shape[1]

    def resident(self) -> np.ndarray:
        """[moe_layers, E] bool: experts whose handle points at a slot now."""
        return self.slot_of >= 0

    def wanted(self) -> np.ndarray:
        """Residents plus promotions in flight or queued: the set the policy asked for."""
        w = self.resident().copy()
        for le in list(self.inflight) + self.pending:
            w[le] = True
        return w

    def free_slots(self) -> list[int]:
        reserved = {slot for slot, _ in self.inflight.values()}
        return [s for s in np.flatnonzero(self.owner < 0) if s not in reserved]

    @property
    def experts(self) -> MixedExperts:
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
        landed = []
        for key, (slot, tr) in list(self.inflight.items()):
            try:
                if self.blocking:
                    t0 = time.perf_counter()
                    jax.block_until_ready(tr.result())
                    self.stats.transfer_wait_s += time.perf_counter() - t0
                if not tr.ready():
                    continue
                staged = tr.result()
                self._pool = _write_slot(self._pool, staged, np.int32(slot))
            except Exception as e:  # a failed copy must not stop decoding
                warnings.warn(f"promotion of expert {key[1]} in MoE layer {key[0]} failed ({e}); it stays on its fallback")
                del self.inflight[key]
                self.stats.failed += 1
                continue
            del self.inflight[key]
            self.slot_of[key] = slot
            self.owner[slot] = key[0] * self.num_experts + key[1]
            self.stats.promotions += 1
            landed.append(key)
        started = 0
        free = self.free_slots()
        while self.pending and free and started + self.bank.expert_nbytes <= self.bytes_per_step:
            key = self.pending.pop(0)
            try:
                tr = self.transfer(self.bank[key])
            except Exception as e:
                warnings.warn(f"promotion of expert {key[1]} in MoE layer {key[0]} failed ({e}); it stays on its fallback")
                self.stats.failed += 1
                continue
            self.inflight[key] = (free.pop(0), tr)
            started += self.bank.expert_nbytes
            self.stats.h2d_bytes += self.bank.expert_nbytes
        if landed:
            self._publish()
        if self.blocking and self.inflight:
            self.poll()

    def _publish(self) -> None:
        self._experts = MixedExperts(
            lo_gate_up=self._lo[0],
            lo_down=self._lo[1],
            hi_gate_up=self._pool[0],
            hi_down=self._pool[1],
            slot_of=jax.device_put(self.slot_of, self._handles_sharding),
            owner=jax.device_put(self.owner, self._handles_sharding),
        )

    def check_invariants(self) -> None:
        """Handles and their inverse agree; no slot serves two experts."""
        held = self.slot_of[self.slot_of >= 0]
        assert len(set(held.tolist())) == len(held), "a slot is used by two experts"
        for layer, expert in zip(*np.nonzero(self.slot_of >= 0)):
            assert self.owner[self.slot_of[layer, expert]] == layer * self.num_experts + expert
        assert int((self.owner >= 0).sum()) == len(held)
        reserved = [s for s, _ in self.inflight.values()]
        assert not set(reserved) & set(held.tolist()), "an in-flight transfer targets a slot in use"
