"""Expert parallelism on a `jax.sharding.Mesh` with one axis, `expert`.

Every device owns a fixed share of each MoE layer's experts (`Placement`: contiguous blocks of
expert ids by default, or balanced from a hotness profile) and holds everything else
replicated: non-expert weights, the KV cache, the step's inputs. Each device runs its own
policy over its own experts (fallbacks, slot pool, host bank, swapper) exactly as one device
would, sized by its own memory plan (`device_plan`: the budget is per device).

A step stays one jitted call. The MoE layers' FFN (`expert_parallel_ffn`) is a
`jax.shard_map` over the expert axis inside it: routing runs everywhere (replicated), each
device computes only the (token, expert) pairs whose expert it owns, and one `psum` of the
[tokens, hidden] partial outputs combines them. No Python loop over devices runs per step;
the only per-step collective is that psum (plus a scalar for the statistics).

The expert state a step takes (`MeshPolicy.experts`) is one `ExpertState` pytree: each tier's
leaves are the devices' own tiers laid end to end along axis 0 and sharded on `expert`
(assembled without a copy by `jax.make_array_from_single_device_arrays`), and the handles
[L, E] are replicated, each naming (tier, row) on the expert's owner. A swap writes only the
owning device's slot pool; the global state is reassembled (a few small dispatches) only after
a device published a new state.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import PACKED, ExpertState, ExpertTier, HostExperts, LayerSource, layer_shape
from dynaexq_jax.experts.matmul import routed_ffn, swiglu
from dynaexq_jax.runtime.engine import Engine

AXIS = "expert"
MESH_POLICIES = ("full", "static", "dynaexq")  # offload/prefetch run layer by layer on one device (LayerwiseEngine)


class MeshError(UserError):
    """A mesh that cannot be made, or a run the mesh cannot serve."""


def parse_mesh(text: str) -> int:
    """`expert=N` -> N (the one axis this engine knows)."""
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", text or "")
    if m is None:
        raise MeshError(f"bad --mesh {text!r}; write expert=N, e.g. --mesh expert=4")
    name, size = m.group(1), int(m.group(2))
    if name != AXIS:
        raise MeshError(f"--mesh axis {name!r} is not one this engine knows; the only axis is 'expert' "
                        f"(expert parallelism), e.g. --mesh expert={size}")
    if size < 1:
        raise MeshError(f"--mesh expert={size}: the mesh needs at least one device")
    return size


def check_split(num_experts: int, size: int) -> None:
    if num_experts % size:
        fits = [d for d in range(2, num_experts + 1) if num_experts % d == 0][:6]
        raise MeshError(f"--mesh expert={size}: the model's {num_experts} experts per layer do not split evenly over "
                        f"{size} devices; use a mesh size that divides {num_experts} (e.g. "
                        f"{', '.join(map(str, fits))})")


def expert_mesh(size: int, devices: Sequence | None = None) -> Mesh:
    """A one-axis mesh of the first `size` devices (every process's devices, under jax.distributed)."""
    devices = list(jax.devices() if devices is None else devices)
    if size > len(devices):
        raise MeshError(f"--mesh expert={size} needs {size} devices, but JAX sees {len(devices)} "
                        f"({devices[0].platform}); use --mesh expert={len(devices)} or fewer")
    if jax.process_count() > 1 and size != len(devices):
        raise MeshError(f"--mesh expert={size} must span every process's devices ({len(devices)} in all)")
    return Mesh(np.array(devices[:size]), (AXIS,))


def start_distributed(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 60) -> None:
    """Join `num_processes` processes into one JAX runtime (`jax.distributed.initialize`), before
    anything starts a backend; on CPUs their collectives go through gloo. A coordinator that does
    not answer within `timeout_s` is a MeshError, not a hang; so, later, is a process that stops
    answering (the coordination service's heartbeats), and a process that waits for the others at
    the end waits at most `timeout_s` (`runtime.supervise` turns XLA's ending into one line)."""
    if not re.fullmatch(r"[^\s:]+:\d+", coordinator or ""):
        raise MeshError(f"bad --coordinator {coordinator!r}; write HOST:PORT, e.g. 127.0.0.1:12355")
    if not 0 <= process_id < num_processes:
        raise MeshError(f"--process-id {process_id} is not in 0..{num_processes - 1} (--num-processes {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # XLA's client aborts the process (no exception) when the coordinator stays silent past its
    # own timeout; a watchdog that fires first turns that into the one-line error and exit 2.
    if process_id == 0:
        why = (f"error: the other {num_processes - 1} process(es) did not join the coordinator at {coordinator} "
               f"within {timeout_s} s (--distributed-timeout); start them with the same --coordinator")
    else:
        why = (f"error: process {process_id} of {num_processes} got no answer from the coordinator at {coordinator} "
               f"within {timeout_s} s (--distributed-timeout); start process 0 there first, or fix --coordinator")
    watchdog = threading.Timer(timeout_s, lambda: (print(why, file=sys.stderr, flush=True), os._exit(2)))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s + 60,
                                   heartbeat_timeout_seconds=timeout_s, shutdown_timeout_seconds=timeout_s)
    except Exception as e:  # XLA's runtime errors that do raise: a refused address, a duplicate id
        raise MeshError(f"process {process_id} of {num_processes} could not join the coordinator at {coordinator} "
                        f"({' '.join(str(e).split())[:200]}); fix --coordinator") from None
    finally:
        watchdog.cancel()


# ----------------------------------------------------------------------------- placement


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which device owns which experts, per MoE layer."""

    experts: np.ndarray  # [L, D, E/D] int: the expert ids device d owns in layer l, ascending

    @property
    def devices(self) -> int:
        return self.experts.shape[1]

    @property
    def owner(self) -> np.ndarray:
        """[L, E] int32: the device owning each expert."""
        L, D, n = self.experts.shape
        out = np.empty((L, D * n), np.int32)
        np.put_along_axis(out, self.experts.reshape(L, -1), np.repeat(np.arange(D, dtype=np.int32), n)[None], 1)
        return out

    @property
    def position(self) -> np.ndarray:
        """[L, E] int32: each expert's column in the devices' handles laid end to end (owner * E/D + local)."""
        L, D, n = self.experts.shape
        out = np.empty((L, D * n), np.int32)
        np.put_along_axis(out, self.experts.reshape(L, -1), np.arange(D * n, dtype=np.int32)[None], 1)
        return out

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, devices: int) -> "Placement":
        check_split(num_experts, devices)
        ids = np.arange(num_experts).reshape(devices, -1)
        return cls(np.broadcast_to(ids, (num_layers,) + ids.shape).copy())

    @classmethod
    def balanced(cls, load: np.ndarray, devices: int) -> "Placement":
        """From an expected load [L, E] (a hotness profile): per layer, experts from the
        heaviest down each go to the least loaded device with room (E/D each), as EPLB's
        greedy packing does without replicas."""
        L, E = load.shape
        check_split(E, devices)
        n = E // devices
        out = np.empty((L, devices, n), np.int64)
        for l in range(L):
            total, members = np.zeros(devices), [[] for _ in range(devices)]
            for e in np.argsort(-load[l], kind="stable"):
                d = min((d for d in range(devices) if len(members[d]) < n), key=lambda d: (total[d], d))
                members[d].append(e)
                total[d] += load[l, e]
            out[l] = np.sort(np.array(members), axis=1)
        return cls(out)

    def device_load(self, counts: np.ndarray) -> np.ndarray:
        """[L, D]: routed pairs each device computes, from per-expert counts [L, E]."""
        return np.take_along_axis(np.asarray(counts), self.experts.reshape(counts.shape[0], -1), 1).reshape(
            self.experts.shape).sum(axis=2)

    def imbalance(self, counts: np.ndarray) -> float:
        """Mean over layers of max/mean routed pairs per device: 1.0 is perfect balance (a
        layer waits for its busiest device)."""
        load = self.device_load(counts).astype(np.float64)
        mean = load.mean(axis=1)
        keep = mean > 0
        return float(np.mean(load[keep].max(axis=1) / mean[keep])) if keep.any() else 1.0


# ----------------------------------------------------------------------------- memory plan


def local_config(cfg, devices: int):
    """`cfg` with one device's share of the experts (for the budget arithmetic only: its
    validation would refuse top-k > E/D, which the mesh serves fine)."""
    local = copy.copy(cfg)
    object.__setattr__(local, "num_experts", cfg.num_experts // devices)
    return local


def device_plan(plan_fn, cfg, devices: int, budget: int | None, dtype_itemsize: int, policy: str):
    """One device's memory plan on `devices` devices: its share of the experts and every
    replicated byte (non-expert weights with the whole router, KV cache, workspace), within
    `budget` per device. `plan_fn(cfg, budget)` is the single-device plan."""
    check_split(cfg.num_experts, devices)
    local = local_config(cfg, devices)
    # The routers stay whole on every device: the local config counts only its share of them.
    extra = budget_lib.non_expert_nbytes(cfg, dtype_itemsize) - budget_lib.non_expert_nbytes(local, dtype_itemsize)
    try:
        plan = plan_fn(local, None if budget is None else budget - extra)
    except budget_lib.BudgetError:
        floor = plan_fn(local, None)
        need = (floor.total if policy == "full" else floor.minimum) + extra
        raise budget_lib.BudgetError(
            f"budget {budget_lib.format_size(budget)} per device cannot hold one device's share on --mesh "
            f"expert={devices} ({local.num_experts} of {cfg.num_experts} experts per layer, policy {policy}) with the "
            f"replicated weights, KV cache and workspace: the per-device minimum is {budget_lib.format_size(need)} "
            f"({need} bytes)") from None
    return dataclasses.replace(plan, budget=budget, weights=plan.weights + extra)


# ----------------------------------------------------------------------------- per-device checkpoints


class _Experts(LayerSource):
    """One device's experts of every layer, `ids` [L, E/D] of the checkpoint's, read from its
    source one expert at a time on access (a process reads only its own devices' experts)."""

    def __init__(self, layers, ids: np.ndarray):
        self.layers, self.ids = layers, ids
        shape = layer_shape(layers)
        self.shape, self.num_layers = (ids.shape[1],) + tuple(shape[1:]), len(layers)
        self.dtype = np.dtype(layers.dtype if isinstance(layers, LayerSource) else layers[0].dtype)
        self.memory_kind = getattr(layers, "memory_kind", "process memory")

    def expert(self, i: int, e: int) -> np.ndarray:
        e = int(self.ids[i][e])
        return self.layers.expert(i, e) if isinstance(self.layers, LayerSource) else np.asarray(self.layers[i][e])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return np.stack([self.expert(i, e) for e in range(self.shape[0])])


def device_checkpoint(ckpt, ids: np.ndarray):
    """`ckpt` with only experts `ids` [L, E/D] of each layer (and no path: the converted-expert
    cache holds whole checkpoints)."""
    host = ckpt.experts
    if host.mxfp4 is not None or host.gate_up_bias is not None:
        raise MeshError("checkpoints with MXFP4 experts or expert biases (gpt-oss) do not run on --mesh yet; "
                        "drop --mesh")
    sub = HostExperts(_Experts(host.gate_up, ids), _Experts(host.down, ids))
    devices = ckpt.config.num_experts // ids.shape[1]
    return dataclasses.replace(ckpt, config=local_config(ckpt.config, devices), experts=sub, path=None)


# ----------------------------------------------------------------------------- the mesh policy


def _with_rows(w, rows: int):
    """A packed tensor's static logical shape with `rows` on axis 0 (its leaves carry their own)."""
    return dataclasses.replace(w, shape=(rows,) + tuple(w.shape[1:])) if isinstance(w, PACKED) else w


def _tiers_with_rows(tiers, rows: Sequence[int]):
    return tuple(ExpertTier(_with_rows(t.gate_up, r), _with_rows(t.down, r), t.high_precision)
                 for t, r in zip(tiers, rows))


def _leaf_rows(tier: ExpertTier) -> int:
    return jax.tree.leaves(tier.gate_up)[0].shape[0]


class MeshPolicy:
    """The devices' own policies (`parts`, one per local device, in mesh order) as one `Policy`."""

    layerwise = False

    def __init__(self, name: str, mesh: Mesh, placement: Placement, parts: list, *, save_profile_to=None):
        self.name, self.mesh, self.placement, self.parts = name, mesh, placement, parts
        self.observe_every = parts[0].observe_every
        self.save_profile_to = save_profile_to
        self._replicated = NamedSharding(mesh, P())
        self._rows = NamedSharding(mesh, P(AXIS))
        self._cols = NamedSharding(mesh, P(None, AXIS))
        self._position = replicate(placement.position, self._replicated)  # [L, E]
        self._gather = jax.jit(lambda h, pos: jnp.take_along_axis(h, pos, axis=1), out_shardings=self._replicated)
        self._states, self._experts = None, None
        # Mesh positions of this process's devices, one per part.
        self.device_ids = [i for i, dev in enumerate(mesh.devices.flat) if dev.process_index == jax.process_index()]

    @property
    def experts(self) -> ExpertState:
        states = [p.experts for p in self.parts]
        if self._states is None or any(a is not b for a, b in zip(states, self._states)):
            self._experts, self._states = self._assemble(states), states
        return self._experts

    def _assemble(self, states: list[ExpertState]) -> ExpertState:
        D = self.mesh.size

        def rows(*leaves):
            return jax.make_array_from_single_device_arrays((D * leaves[0].shape[0],) + leaves[0].shape[1:],
                                                            self._rows, list(leaves))

        tiers = jax.tree.map(rows, *[s.tiers for s in states])
        tiers = _tiers_with_rows(tiers, [_leaf_rows(t) for t in tiers])
        L, n = states[0].tier_of.shape

        def handles(parts):  # the devices' [L, E/D] end to end, then in expert order, replicated
            return self._gather(jax.make_array_from_single_device_arrays((L, D * n), self._cols, parts),
                                self._position)

        return ExpertState(tiers=tiers, tier_of=handles([s.tier_of for s in states]),
                           row_of=handles([s.row_of for s in states]))

    def _split(self, mass: np.ndarray, part: int) -> np.ndarray:
        """Part `part`'s columns of `mass` [L, E]."""
        return np.take_along_axis(np.asarray(mass), self.placement.experts[:, self.device_ids[part]], 1)

    def prepare(self, routing_pass) -> None:
        memo = []

        def sliced(d):
            if not memo:
                memo.append(routing_pass())
            mass, tokens, steps = memo[0]
            return self._split(mass, d), tokens, steps

        for d, part in enumerate(self.parts):
            part.prepare(lambda d=d: sliced(d))

    def between_steps(self) -> None:
        for part in self.parts:
            part.between_steps()

    def observe(self, mass, tokens, steps) -> None:
        for d, part in enumerate(self.parts):
            part.observe(self._split(mass, d), tokens, steps)

    def settle(self) -> None:
        """dynaexq's `settle` on every device."""
        for part in self.parts:
            part.settle()

    @property
    def lo_bits(self):
        """The fallback width every device computes at (static's pick from the per-device plan)."""
        return getattr(self.parts[0], "lo_bits", None)

    @property
    def tracker(self):
        """The hotness of every expert, [L, E], from the devices' trackers (dynaexq)."""
        from dynaexq_jax.policies.hotness import HotnessTracker

        trackers = [p.tracker for p in self.parts]
        L, D, n = self.placement.experts.shape
        scores = np.zeros((L, D * n))
        for d, t in zip(self.device_ids, trackers):
            np.put_along_axis(scores, self.placement.experts[:, d], t.scores, 1)
        return HotnessTracker(L, D * n, trackers[0].half_life_steps, scores)

    def after_request(self) -> None:
        for part in self.parts:
            part.after_request()
        if self.save_profile_to is not None and jax.process_count() == 1:
            try:
                self.save_profile_to.parent.mkdir(parents=True, exist_ok=True)
                self.tracker.save(self.save_profile_to)
            except OSError:  # a read-only cache must not fail a finished run (dynaexq warns the same way)
                pass

    def stats(self) -> dict:
        each = [p.stats() for p in self.parts]
        out = dict(each[0])
        for k, v in out.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "lo_bits":
                out[k] = sum(s[k] for s in each)
        out["slots_per_device"] = each[0]["slots"]
        out["mesh_devices"] = self.mesh.size
        return out


def check_policy(name: str) -> None:
    if name not in MESH_POLICIES:
        raise MeshError(f"policy {name!r} does not run on --mesh yet (it moves experts layer by layer on one "
                        f"device); use --policy {', '.join(MESH_POLICIES)}, or drop --mesh")


def build_policy(name: str, ckpt, plan, opts, mesh: Mesh, placement: Placement, *, batch: int,
                 hotness_profile=None, transfer=None, progress: bool = False) -> MeshPolicy:
    """`name`'s policy on every local device of `mesh`, over the experts `placement` gives it."""
    from dynaexq_jax.io import store
    from dynaexq_jax.policies import dynaexq, full, static

    check_policy(name)
    tracker, informed = None, False
    if name == "dynaexq":
        tracker, informed = dynaexq.warm_tracker(ckpt, opts, hotness_profile)
    sub_opts = dataclasses.replace(opts, save_profile=False)
    devices = list(mesh.devices.flat)
    parts = []
    for d, dev in enumerate(devices):
        if dev.process_index != jax.process_index():
            continue
        ids = placement.experts[:, d]
        sub = device_checkpoint(ckpt, ids)
        if name == "full":
            parts.append(full.build(sub, device=dev))
        elif name == "static":
            parts.append(static.build(sub, plan, opts, progress=progress, device=dev))
        else:
            profile = (dynaexq.hotness.HotnessTracker(ids.shape[0], ids.shape[1], opts.half_life_steps,
                                                      np.take_along_axis(tracker.scores, ids, 1))
                       if informed else None)
            parts.append(dynaexq.build(sub, plan, sub_opts, hotness_profile=profile, transfer=transfer,
                                       progress=progress, device=dev))
    saved = store.profile_path(ckpt.path) if name == "dynaexq" and opts.save_profile and plan.slots else None
    return MeshPolicy(name, mesh, placement, parts, save_profile_to=saved)


# ----------------------------------------------------------------------------- the step


def expert_parallel_ffn(mesh: Mesh, placement: Placement):
    """An `ExpertFFN` (`models.layers`) for a `MeshPolicy`'s expert state: each device computes
    the pairs of the experts it owns, one psum combines them."""
    owner = placement.owner  # [L, E], a constant of the step

    def ffn(state: ExpertState, layer, x, expert_ids, weights, token_valid, residual=None, *, activation=swiglu):
        spec = ExpertState(tiers=jax.tree.map(lambda _: P(AXIS), state.tiers), tier_of=P(), row_of=P())

        def local(state, layer, x, expert_ids, weights, token_valid):
            state = state.replace(tiers=_tiers_with_rows(state.tiers, [_leaf_rows(t) for t in state.tiers]))
            mine = jnp.asarray(owner)[layer][expert_ids] == jax.lax.axis_index(AXIS)  # [T, k]
            valid = (token_valid if token_valid.ndim == 2 else token_valid[:, None]) & mine
            return jax.lax.psum(routed_ffn(state, layer, x, expert_ids, weights, valid, activation=activation), AXIS)

        y = jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), P(), P(), P(), P()), out_specs=P(),
                          check_vma=False)(  # the Pallas kernel declares no varying axes
            state, layer, x, expert_ids, weights, token_valid)
        return y if residual is None else residual + y

    return ffn


class MeshEngine(Engine):
    """An `Engine` whose steps run on every device of `mesh`: replicated params and inputs,
    the expert state of a `MeshPolicy`."""

    def __init__(self, checkpoint, policy: MeshPolicy, big_little=None):
        super().__init__(checkpoint, policy, big_little, ffn=expert_parallel_ffn(policy.mesh, policy.placement))
        self.mesh = policy.mesh
        self.input_sharding = NamedSharding(self.mesh, P())
        self.params = self._put(checkpoint.params)
        # The engine keeps no reference to the default device's copy of the weights: once the
        # caller drops `checkpoint` too (or takes `engine.checkpoint`), only the plan's copies remain.
        self.checkpoint = dataclasses.replace(checkpoint, params=self.params)

    def _put(self, tree):
        return replicate(tree, self.input_sharding)


def replicate(tree, sharding: NamedSharding):
    """`tree` (host or device values, the same in every process) replicated over `sharding`'s
    devices; under jax.distributed each process places only its own devices' copies."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a):
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        with jax.transfer_guard_device_to_host("allow"):
            host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree)


_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "s8": 1, "u8": 1, "pred": 1}


def collective_bytes(hlo_text: str) -> int:
    """Bytes one call of a compiled step moves through all-reduces (their results' sizes, per
    device), from its optimized HLO (`compiled.as_text()`): an all-reduce inside a loop counts
    once per iteration, by the loop's known trip count (the layer scan)."""
    comp, calls, reduced = None, {}, {}  # computation -> [(callee, times)], computation -> bytes
    entry = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            comp = head.group(2)
            entry = comp if head.group(1) else entry
            continue
        if comp is None:
            continue
        op = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if op:
            reduced[comp] = reduced.get(comp, 0) + sum(
                _ITEMSIZE.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", op.group(1)))
        body = re.search(r"body=%?([\w.\-]+)", line)
        trips = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', line)
        for callee in re.findall(r"(?:body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)", line) + \
                [c for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
                 for c in re.findall(r"%?([\w.\-]+)", group)]:
            times = int(trips.group(1)) if trips and body and callee == body.group(1) else 1
            calls.setdefault(comp, []).append((callee, times))

    def total(c, seen=()):
        if c in seen:
            return 0
        return reduced.get(c, 0) + sum(n * total(k, seen + (c,)) for k, n in calls.get(c, []))

    return total(entry) if entry else 0


def load_report(eng: MeshEngine, gen, plan, profile_seqs) -> dict:
    """A mesh run's balance: each device's load (max/mean routed pairs over the devices, mean
    over layers) under the engine's placement and under one balanced from the routing of other
    sequences (`profile_seqs`, scored on the same engine); the decode step's all-reduce bytes
    from its compiled HLO; and the expert bytes the busiest device reads per decode step at most
    (its routed pairs per step, each one expert read at its tier's size)."""
    counts = np.asarray(gen.expert_counts)  # [L, E] routed pairs of this run
    profile = np.asarray(eng.score(profile_seqs)[1].counts)
    balanced = Placement.balanced(profile, eng.mesh.size)
    decode = [c for k, c in eng._compiled.items() if k[0] == "decode"]
    hi = gen.stats["hi_hit_rate"] or 0.0
    lo_bytes = plan.fallback / plan.num_experts_total if plan.fallback else plan.slot_bytes
    per_pair = hi * plan.slot_bytes + (1 - hi) * lo_bytes
    # Pairs per decode step the busiest device computes, summed over layers: its share of the run's pairs.
    k = eng.cfg.experts_per_token
    busiest = gen.stats["batch_size"] * k * eng.policy.placement.device_load(counts).max(axis=1).sum() / counts.sum()
    return {
        "mesh_devices": eng.mesh.size,
        "imbalance_contiguous": eng.policy.placement.imbalance(counts),
        "imbalance_balanced": balanced.imbalance(counts),
        "collective_bytes_per_step": collective_bytes(decode[-1].as_text()) if decode else None,
        "expert_bytes_per_device_step": busiest * per_pair,
    }
