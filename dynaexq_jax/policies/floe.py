"""`floe`: compressed up projections on the device, only the active channels of gate and down
streamed from the host (FloE, "on-the-fly MoE inference on memory-constrained GPUs").

Per expert the up projection is resident on the device, compressed (HQQ int2, groups of 64, by
default); gate and down stay in host memory at the checkpoint's precision. For each MoE layer:

1. `up(x)` of every routed (token, expert) pair is computed on the device from the compressed
   up projections (`experts.matmul.grouped_matmul`: the same kernels as the packed tiers).
2. A pair's intermediate channel is *active* where |up(x)| reaches its (layer, expert)
   threshold, calibrated offline for a target sparsity (`policies.floe_calibration`). Per
   expert the union of its tokens' active channels, at most `capacity` of them (the largest
   |up(x)| first; the rest are counted as `dropped_channels`), is what the host must send.
3. The host reads those channel indices (a few hundred bytes), gathers the gate columns and
   down rows of exactly those channels into staging buffers of a fixed shape
   [experts per round, capacity, H] and copies them to the device (`jax.device_put`).
4. The device computes activation(gate, up) on the active channels only (a token's channels
   below its threshold are zeroed, so a token's output never depends on its batch mates),
   times the gathered down rows.

Shapes never change between calls of one shape of input: a round always stages `round_experts`
experts x `capacity` channels. The capacity grows with the tokens per call (the union of n
tokens' channels is about I * (1 - s**n) for sparsity s), so a decode step stages a tenth of
an expert at s = 0.9 and a long prefill stages whole experts.

With sparsity 0 and an uncompressed up projection every channel is kept and `floe` computes
exactly what `full` does (a test pins this).

What is not done here (see docs/PERFORMANCE.md, FloE): overlapping the next layer's fetches
with the current layer (the inter-expert predictor) and a device cache of hot experts' rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts import matmul, quant
from dynaexq_jax.experts.expert_state import HostExperts, device_biases
from dynaexq_jax.io import floe_calibration
from dynaexq_jax.models.layers import expert_activation
from dynaexq_jax.policies import NoBetweenStepWork
from pallas_kernels import INVALID


@dataclasses.dataclass(frozen=True)
class FloeOptions:
    """up_bits: the up projection's width (None: the checkpoint's precision); sparsity: the
    target share of channels dropped (0: keep all, no calibration needed); capacity_margin:
    staging room over the expected active channels; thresholds: a [moe_layers, E] array, else
    read from `calibration` (`io.floe_calibration`) when sparsity > 0."""

    up_bits: int | None = 2
    group_size: int = budget_lib.FLOE_UP_GROUP
    sparsity: float = 0.9
    capacity_margin: float = 1.25
    thresholds: np.ndarray | None = dataclasses.field(default=None, compare=False)
    calibration: str | None = None  # a calibration folder; None: the one saved for the checkpoint

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise UserError(f"FloE sparsity must be in [0, 1) (the share of channels dropped), got {self.sparsity}")
        if self.up_bits not in (None, *quant.SUPPORTED_BITS):
            raise UserError(f"FloE up projection width {self.up_bits} is not one of {quant.SUPPORTED_BITS} or none")
        if self.capacity_margin < 1:
            raise UserError(f"FloE capacity margin must be >= 1, got {self.capacity_margin}")


def capacity(intermediate: int, sparsity: float, rows: int, margin: float) -> int:
    """Channels staged per expert for a call of `rows` tokens: the expected union of active
    channels, I * (1 - s**rows), times `margin`, rounded up to 8, at most I."""
    if sparsity <= 0:
        return intermediate
    expected = intermediate * (1.0 - sparsity**rows)
    return min(intermediate, 8 * math.ceil(margin * expected / 8))


# ------------------------------------------------------------------- device functions


def _pairs(top_i, valid):
    flat, ok = top_i.reshape(-1), valid.reshape(-1)
    keys = jnp.where(ok, flat, INVALID)
    return flat, ok, keys


def up_activations(up, thr, hn, top_i, valid, up_bias):
    """u [P, I] float32: each routed pair's up(x) (P = B*T*k, pair order), and score [E, I]:
    per expert and channel the largest |u| of its pairs that reach the threshold `thr` [E]
    (-1 where none does). `up` is the layer's [E, H, I] (packed or dense); `up_bias` [E, I] or None."""
    B, T, H = hn.shape
    k = top_i.shape[-1]
    E = thr.shape[0]
    flat, ok, keys = _pairs(top_i, valid)
    order = jnp.argsort(keys, stable=True)
    xs = hn.reshape(B * T, H)[order // k]
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(ok.astype(jnp.int32))
    u_sorted = matmul.grouped_matmul(xs, up, sizes, out_dtype=jnp.float32)  # [P, I], rows sorted by expert
    u = jnp.zeros_like(u_sorted).at[order].set(u_sorted)
    if up_bias is not None:
        u = u + up_bias[flat].astype(jnp.float32)
    a = jnp.abs(u)
    passing = (a >= thr[flat][:, None]) & ok[:, None]
    score = jax.ops.segment_max(jnp.where(passing, a, -1.0), jnp.where(ok, flat, E), num_segments=E + 1)[:E]
    return u, jnp.maximum(score, -1.0)


def select_channels(score, experts, cap: int):
    """For `experts` [R] (-1: an unused place), the channels to stage: idx [R, C] int32 (the
    `cap` largest scores, in ascending channel order), n [R] how many of them are active, and
    dropped [R] the active channels over capacity."""
    s = jnp.where((experts >= 0)[:, None], score[jnp.maximum(experts, 0)], -1.0)  # [R, I]
    vals, idx = jax.lax.top_k(s, cap)
    active = jnp.sum(s >= 0, axis=-1, dtype=jnp.int32)
    n = jnp.minimum(active, cap)
    # Inactive places sort last; active channels in ascending order make the host gather sequential.
    idx = jnp.sort(jnp.where(vals >= 0, idx, s.shape[-1] + idx), axis=-1) % s.shape[-1]
    return idx.astype(jnp.int32), n, active - n


def partial_ffn(gate_s, down_s, idx, n, experts, u, thr, hn, top_i, top_p, valid, acc, gate_bias, down_bias, *,
                activation):
    """acc [B, T, H] + the routed pairs of `experts` [R] computed on their staged channels.

    gate_s, down_s [R, C, H]: gate columns and down rows of channels idx [R, C], the first
    n [R] of them active; u [P, I] the pairs' up(x); thr [E] the layer's thresholds. A token's
    channel counts only where its own |u| reaches the threshold."""
    B, T, H = hn.shape
    k = top_i.shape[-1]
    f32 = jnp.float32
    hp = jax.lax.Precision.HIGHEST
    x = hn.reshape(B * T, H).astype(f32)
    member = (top_i[:, :, None] == experts[None, None, :]) & valid[:, :, None] & (experts >= 0)  # [BT, k, R]
    m = member.astype(f32)
    u_r = jnp.einsum("tkr,tki->rti", m, u.reshape(B * T, k, -1), precision=hp)  # [R, BT, I]
    u_sel = jnp.take_along_axis(u_r, idx[:, None, :], axis=-1)  # [R, BT, C]
    g = jnp.einsum("th,rch->rtc", x, gate_s.astype(f32), precision=hp)
    safe = jnp.maximum(experts, 0)
    if gate_bias is not None:
        g = g + jnp.take_along_axis(gate_bias[safe].astype(f32), idx, axis=-1)[:, None, :]
    h = activation(jnp.concatenate([g, u_sel], axis=-1))  # [R, BT, C]
    C = idx.shape[-1]
    keep = (jnp.arange(C)[None, None, :] < n[:, None, None]) & (jnp.abs(u_sel) >= thr[safe][:, None, None])
    y = jnp.einsum("rtc,rch->rth", jnp.where(keep, h, 0.0), down_s.astype(f32), precision=hp)
    if down_bias is not None:
        y = y + down_bias[safe].astype(f32)[:, None, :]
    w = jnp.einsum("tkr,tk->rt", m, top_p.astype(f32), precision=hp)  # [R, BT] combine weights
    y = jnp.einsum("rt,rth->th", w, y, precision=hp)
    return acc + y.reshape(B, T, H).astype(acc.dtype)


def device_functions(cfg) -> dict:
    """The jitted pieces a layerwise engine runs for this policy (by name); `floe_select{C}`
    is added per capacity C (`FloePolicy.moe_layer`)."""
    return {
        "floe_up": jax.jit(up_activations),
        "floe_ffn": jax.jit(partial_ffn_for(cfg)),
    }


def partial_ffn_for(cfg):
    activation = expert_activation(cfg)
    return lambda *args: partial_ffn(*args, activation=activation)


# ------------------------------------------------------------------------------ policy


def gather_channels(layer: np.ndarray, experts: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows idx [R, C] of experts [R] (-1: expert 0's) of a host layer [E, I, H] into `out`
    [R, C, H]. Into a reused buffer, as unsigned integers of the same width: fresh arrays cost
    page faults on every call, and numpy copies ml_dtypes' bfloat16 element by element (both
    several times the copy itself). The buffer is free again once `to_device` has returned."""
    E, I, H = layer.shape
    u = np.dtype(f"u{layer.dtype.itemsize}")
    rows = (np.maximum(experts, 0)[:, None] * I + idx).reshape(-1)
    np.take(layer.view(u).reshape(E * I, H), rows, axis=0, out=out.view(u).reshape(-1, H))
    return out


def to_device(host: tuple[np.ndarray, ...], device) -> tuple[jax.Array, ...]:
    """Copy host arrays to `device` and wait. The CPU backend may hand back a buffer that
    aliases the numpy array (zero-copy, whatever `may_alias` says), which the next round's
    gather would overwrite: such a result is copied once more on the device."""
    staged = jax.device_put(host, device)
    staged = tuple(jnp.copy(d) if d.unsafe_buffer_pointer() == h.ctypes.data else d for d, h in zip(staged, host))
    return jax.block_until_ready(staged)


@dataclasses.dataclass
class FloeStats:
    pairs: int = 0  # routed (real token, expert) pairs
    hit_pairs: int = 0  # ... served from the device alone (none: no device cache of rows yet)
    h2d_bytes: int = 0  # staging buffers copied host -> device
    active_bytes: int = 0  # ... of which active channels' rows
    channels: int = 0  # active channels staged
    dropped_channels: int = 0  # active channels over capacity (not computed)
    gather_s: float = 0.0  # host gather into the staging buffers
    copy_s: float = 0.0  # host -> device copies, waited for
    transfer_wait_s: float = 0.0


class FloePolicy(NoBetweenStepWork):
    """Compressed up projections resident, gate and down on the host, streamed by channel."""

    layerwise = True
    observe_every = None
    prefetch_enabled = False  # no inter-expert prediction yet: fetches are on the critical path
    partial_experts = True  # the layerwise engine calls `moe_layer` instead of `rounds`

    def __init__(self, cfg, host: HostExperts, opts: FloeOptions, *, round_experts: int, itemsize: int,
                 device=None):
        self.name = "floe"
        self.cfg = cfg
        self.opts = opts
        self.device = device or jax.devices()[0]
        L, E, I = host.num_layers, host.num_experts, cfg.moe_intermediate_size
        self.round_experts = min(round_experts, E)
        self.itemsize = itemsize
        thr = np.zeros((L, E), np.float32) if opts.sparsity <= 0 else opts.thresholds
        if thr is None or thr.shape != (L, E):
            raise ValueError(f"FloE thresholds must be [{L}, {E}], got {None if thr is None else thr.shape}")
        self.thresholds = [jax.device_put(np.asarray(t, np.float32), self.device) for t in thr]
        t0 = time.perf_counter()
        self.up, self.gate_t, self.down = [], [], []
        for m in range(L):
            gu = np.asarray(host.gate_up[m])  # [E, H, 2I]: gate columns, then up
            up = jnp.asarray(gu[..., I:])
            if opts.up_bits is not None:
                up = quant.quantize(up.astype(jnp.float32), opts.up_bits, opts.group_size, method="hqq")
            self.up.append(jax.device_put(up, self.device))
            # Channel-major on the host: one channel's gate column is a contiguous row of H.
            self.gate_t.append(np.ascontiguousarray(gu[..., :I].transpose(0, 2, 1)))  # [E, I, H]
            self.down.append(np.ascontiguousarray(np.asarray(host.down[m])))  # [E, I, H]
        self.convert_s = time.perf_counter() - t0
        self._biases = [device_biases(host, self.device, slice(m, m + 1)) for m in range(L)]
        self.jitted = device_functions(cfg)
        self._staging: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # host staging by [R, C]
        self.recorder = None  # calibration: called with (layer, u [P, I], top_i, valid, hn) on the host
        self.run = FloeStats()

    # -------------------------------------------------------------- the policy interface
    def start_request(self) -> None:
        self.run = FloeStats()

    @property
    def expert_nbytes(self) -> int:
        """One expert's gate and down at the checkpoint's precision (what offload moves)."""
        return 2 * self.cfg.moe_intermediate_size * self.cfg.hidden_size * self.itemsize

    def stats(self) -> dict:
        r = self.run
        moved = r.gather_s + r.copy_s
        return {
            "slots": 0,
            "lo_bits": self.opts.up_bits,
            "promotions": 0,
            "demotions": 0,
            "h2d_bytes": r.h2d_bytes,
            "active_bytes": r.active_bytes,
            "channels": r.channels,
            "dropped_channels": r.dropped_channels,
            "transfer_wait_s": r.transfer_wait_s,
            "gather_s": r.gather_s,
            "copy_s": r.copy_s,
            "stream_gbps": r.h2d_bytes / moved / 1e9 if moved else None,
            "fill_s": 0.0,
            "convert_s": self.convert_s,
        }

    # -------------------------------------------------------------- layer by layer
    def moe_layer(self, m: int, counts: np.ndarray, hn, top_i, top_p, valid, acc, call):
        """acc + MoE layer `m`'s routed experts on their active channels. `counts` [E]: routed
        pairs of real tokens per expert; `call(name, *args)` runs one of `self.jitted`."""
        cfg = self.cfg
        b = self._biases[m]
        gu_bias, dn_bias = b.get("gate_up_bias"), b.get("down_bias")
        I = cfg.moe_intermediate_size
        up_bias = None if gu_bias is None else gu_bias[0, :, I:]
        gate_bias = None if gu_bias is None else gu_bias[0, :, :I]
        down_bias = None if dn_bias is None else dn_bias[0]
        thr = self.thresholds[m]
        u, score = call("floe_up", self.up[m], thr, hn, top_i, valid, up_bias)
        if self.recorder is not None:
            self.recorder(m, *jax.device_get((u, top_i, valid, hn)))
        self.run.pairs += int(counts.sum())
        rows = int(np.prod(hn.shape[:2]))
        cap = capacity(I, self.opts.sparsity, rows, self.opts.capacity_margin)
        select = f"floe_select{cap}"
        if select not in self.jitted:
            self.jitted[select] = jax.jit(functools.partial(select_channels, cap=cap))
        needed = np.flatnonzero(counts)
        R = self.round_experts
        for r in range(0, len(needed), R):
            experts = np.full(R, -1, np.int32)
            chosen = needed[r : r + R]
            experts[: len(chosen)] = chosen
            experts_d = jax.device_put(experts, self.device)
            idx, n, dropped = jax.device_get(call(select, score, experts_d))  # host sync: what to fetch
            staged = self._stage(m, experts, idx, n)
            self.run.dropped_channels += int(dropped.sum())
            acc = call("floe_ffn", *staged, jax.device_put(idx, self.device), jax.device_put(n, self.device),
                       experts_d, u, thr, hn, top_i, top_p, valid, acc, gate_bias, down_bias)
        return acc

    def _stage(self, m: int, experts: np.ndarray, idx: np.ndarray, n: np.ndarray):
        """Gather the channels' gate columns and down rows [R, C, H] on the host, copy them to
        the device and wait (the layer needs them next). Unused places stage expert 0's rows."""
        t0 = time.perf_counter()
        bufs = self._staging.get(idx.shape)
        if bufs is None:  # one pair per capacity (decode's, prefill's): reused, never reallocated
            bufs = self._staging[idx.shape] = tuple(np.empty(idx.shape + (self.cfg.hidden_size,), a.dtype)
                                                    for a in (self.gate_t[m], self.down[m]))
        host = tuple(gather_channels(w[m], experts, idx, b) for w, b in zip((self.gate_t, self.down), bufs))
        t1 = time.perf_counter()
        staged = to_device(host, self.device)
        t2 = time.perf_counter()
        r = self.run
        r.gather_s += t1 - t0
        r.copy_s += t2 - t1
        r.transfer_wait_s += t2 - t0
        r.h2d_bytes += sum(a.nbytes for a in host)
        r.active_bytes += int(n.sum()) * 2 * self.cfg.hidden_size * self.itemsize
        r.channels += int(n.sum())
        return staged


def calibrated_thresholds(ckpt, opts: FloeOptions) -> np.ndarray:
    """The thresholds of `opts.calibration` (a folder), else of the calibration saved for this
    checkpoint and these settings; a missing or mismatched one is a one-line UserError."""
    s = floe_calibration.settings(opts.sparsity, opts.up_bits, opts.group_size)
    path = opts.calibration or floe_calibration.default_path(ckpt.path, opts.sparsity, opts.up_bits, opts.group_size)
    if path is None:
        raise UserError(f"policy 'floe' at sparsity {opts.sparsity} needs calibrated thresholds and the cache is off "
                        f"(DYNAEXQ_CACHE=0): pass --floe-calibration DIR written by scripts/calibrate.py --out DIR")
    return floe_calibration.load(path, ckpt, s).thresholds


def build(ckpt, plan: budget_lib.MemoryPlan, opts: FloeOptions, *, batch: int, device=None) -> FloePolicy:
    """`plan` is `budget.policy_plan`'s for floe (`budget.floe_plan`): it holds the compressed up
    projections and staging for `batch` x `experts_per_token` experts a round."""
    cfg = ckpt.config
    if opts.sparsity > 0 and opts.thresholds is None:
        opts = dataclasses.replace(opts, thresholds=calibrated_thresholds(ckpt, opts))
    rounds = min(batch * cfg.experts_per_token, cfg.num_experts)
    return FloePolicy(cfg, ckpt.experts, opts, round_experts=rounds, itemsize=ckpt.dtype.itemsize, device=device)
