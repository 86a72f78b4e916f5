"""Expert tiers built from the checkpoint's host experts, shared by the policies.

Fallback formats: group-wise integer widths (`quant.QuantizedTensor`) and MXFP4
(`quant.Mxfp4Tensor`; a checkpoint that ships MXFP4 experts is served from its own bytes).
Quantization runs on the CPU backend one layer at a time, so loading never holds a layer's
bf16 experts on the accelerator, and its results go through `io.store.cached`: converted once
per checkpoint and settings, reused by later runs.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dynaexq_jax.budget import HI_BITS, MXFP4
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.expert_state import ExpertState, ExpertTier, HostExperts, device_biases, stack_layers
from dynaexq_jax.experts.swap import HostBank
from dynaexq_jax.io import store

_PIECES = ("gate_up", "down")
_LEAVES = ("packed", "scales", "zeros")


@dataclasses.dataclass
class Stopwatch:
    """Seconds spent getting converted experts (quantizing them, or reading them back from the
    converted-expert cache), summed over the calls it is passed to; a policy reports it as
    `convert_s`."""

    seconds: float = 0.0


def quantized_layers(host: HostExperts, bits: int | str, group_size: int, method: str, *, source=None,
                     progress: bool = False, clock: Stopwatch | None = None,
                     ) -> list[tuple[quant.QuantizedTensor, quant.QuantizedTensor]]:
    """Every MoE layer's (gate_up, down) quantized, as host `QuantizedTensor`s [E, K, N]; for
    bits MXFP4, `Mxfp4Tensor`s (`mxfp4_layers`)."""
    if bits == MXFP4:
        return mxfp4_layers(host, source=source, progress=progress, clock=clock)
    t0 = time.perf_counter()
    cpu = jax.local_devices(backend="cpu")[0]

    def build() -> dict:  # {layer_i: {gate_up|down: {packed, scales, zeros}}} of host numpy
        out = {}
        layers = zip(host.gate_up, host.down)
        for i, ws in enumerate(tqdm(layers, total=host.num_layers, desc=f"quantizing int{bits}", unit="layer",
                                    file=sys.stderr, disable=not progress, leave=False)):
            with jax.default_device(cpu):
                qs = [quant.quantize(jnp.asarray(w, jnp.float32), bits, group_size, method) for w in ws]
            out[f"layer_{i}"] = {n: dict(zip(_LEAVES, jax.device_get(jax.tree.leaves(q)))) for n, q in zip(_PIECES, qs)}
        return out

    settings = {"bits": bits, "group_size": group_size, "method": method, "dtype": str(host.gate_up[0].dtype)}
    tree = store.cached(source, f"int{bits}", settings, build)
    shapes = (host.gate_up[0].shape, host.down[0].shape)
    layers = [tuple(quant.QuantizedTensor(**tree[f"layer_{i}"][n], bits=bits, group_size=group_size, shape=sh)
                    for n, sh in zip(_PIECES, shapes))
              for i in range(host.num_layers)]
    if clock is not None:
        clock.seconds += time.perf_counter() - t0
    return layers


def mxfp4_layers(host: HostExperts, *, source=None, progress: bool = False, clock: Stopwatch | None = None,
                 ) -> list[tuple[quant.Mxfp4Tensor, quant.Mxfp4Tensor]]:
    """Every MoE layer's (gate_up, down) as host `Mxfp4Tensor`s [E, K, N]: the checkpoint's own
    blocks and scales when it ships MXFP4 (no conversion, no decoded copy), else quantized from
    the loaded weights (cached like the integer widths)."""
    if host.mxfp4 is not None:
        return list(host.mxfp4)
    t0 = time.perf_counter()
    cpu = jax.local_devices(backend="cpu")[0]

    def build() -> dict:
        out = {}
        for i, ws in enumerate(tqdm(zip(host.gate_up, host.down), total=host.num_layers, desc="quantizing mxfp4",
                                    unit="layer", file=sys.stderr, disable=not progress, leave=False)):
            with jax.default_device(cpu):
                qs = [quant.quantize_mxfp4(jnp.asarray(w, jnp.float32)) for w in ws]
            out[f"layer_{i}"] = {n: {"blocks": np.asarray(q.blocks), "scales": np.asarray(q.scales)}
                                 for n, q in zip(_PIECES, qs)}
        return out

    tree = store.cached(source, MXFP4, {"dtype": str(host.gate_up[0].dtype)}, build)
    shapes = (host.gate_up[0].shape, host.down[0].shape)
    layers = [tuple(quant.Mxfp4Tensor(**tree[f"layer_{i}"][n], shape=sh) for n, sh in zip(_PIECES, shapes))
              for i in range(host.num_layers)]
    if clock is not None:
        clock.seconds += time.perf_counter() - t0
    return layers


def quant_errors(host: HostExperts, widths, group_size: int, method: str, *, source=None,
                 clock: Stopwatch | None = None) -> dict[int, np.ndarray]:
    """Each expert's relative weight error at each width in `widths`: {bits: [L, E] float64},
    ||W - Q(W)||^2 / ||W||^2 over its gate_up and down together.

    Why this measure: it is what the output error of an expert is, relative to its output,
    for inputs with no preferred direction, so it needs no activations and is a property of
    the converted experts alone (cached beside them, computed once per checkpoint and
    settings); which experts matter comes from the traffic share of the calibration profile
    that weights it (`policies.autotier`).
    """
    t0 = time.perf_counter()
    cpu = jax.local_devices(backend="cpu")[0]
    widths = tuple(sorted(widths))

    def build() -> dict:
        out = {f"int{b}": np.zeros((host.num_layers, host.num_experts)) for b in widths}
        for i, ws in enumerate(zip(host.gate_up, host.down)):
            with jax.default_device(cpu):
                ws = [jnp.asarray(w, jnp.float32) for w in ws]
                norm = sum(jnp.sum(w * w, axis=(1, 2)) for w in ws)  # [E]
                for b in widths:
                    err = sum(jnp.sum((quant.dequantize(quant.quantize(w, b, group_size, method), jnp.float32) - w)
                                      ** 2, axis=(1, 2)) for w in ws)
                    out[f"int{b}"][i] = np.asarray(err / jnp.maximum(norm, 1e-30), np.float64)
        return out

    settings = {"widths": list(widths), "group_size": group_size, "method": method, "dtype": str(host.gate_up[0].dtype)}
    tree = store.cached(source, "qerr", settings, build)
    if clock is not None:
        clock.seconds += time.perf_counter() - t0
    return {b: np.asarray(tree[f"int{b}"], np.float64) for b in widths}


class _Layers:
    """A lazy sequence: item i of each layer pair in `layers`."""

    def __init__(self, layers, item: int):
        self.layers, self.item = layers, item

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i][self.item]


def dense_tier(host: HostExperts, device=None) -> ExpertTier:
    """Every expert at the checkpoint's precision, rows [L*E] layer-major, on the device."""
    return ExpertTier(stack_layers(host.gate_up, device), stack_layers(host.down, device), high_precision=True)


def packed_tier(layers, device=None, *, high_precision: bool = False) -> ExpertTier:
    """`quantized_layers` stacked on the device, rows [L*E] layer-major."""
    return ExpertTier(stack_layers(_Layers(layers, 0), device), stack_layers(_Layers(layers, 1), device),
                      high_precision=high_precision)


def mixed_fallback(host: HostExperts, lo_bits: int, mid_bits: int, mid: np.ndarray, group_size: int, method: str, *,
                   source=None, device=None, progress: bool = False, clock: Stopwatch | None = None) -> ExpertState:
    """Every expert's fallback, at `mid_bits` where `mid` [L, E] is set and at `lo_bits`
    elsewhere, each stored once: two packed tiers (lo: tier 0, mid: tier 1), rows layer-major
    within each, the handles that find them, and `host`'s expert biases if it has any."""
    mid = np.asarray(mid, bool)
    tier_of = mid.astype(np.int32)
    row_of = np.zeros(mid.shape, np.int32)
    row_of[~mid] = np.arange(int((~mid).sum()))  # boolean indexing runs layer-major
    row_of[mid] = np.arange(int(mid.sum()))
    tiers = []
    for bits, pick in ((lo_bits, ~mid), (mid_bits, mid)):
        layers = quantized_layers(host, bits, group_size, method, source=source, progress=progress, clock=clock)
        pieces = []
        for j in range(2):  # gate_up, down: the picked experts of every layer, concatenated
            qts = [layers[i][j] for i in range(host.num_layers)]
            leaves = [np.concatenate([np.asarray(getattr(q, n))[pick[i]] for i, q in enumerate(qts)]) for n in _LEAVES]
            pieces.append(dataclasses.replace(qts[0], **dict(zip(_LEAVES, leaves)),
                                              shape=(len(leaves[0]),) + qts[0].shape[1:]))
        tiers.append(packed_tier([tuple(pieces)], device))
    put = lambda a: jax.device_put(a, device)
    return ExpertState(tiers=tuple(tiers), tier_of=put(tier_of), row_of=put(row_of), **device_biases(host, device))


def slot_pool(host: HostExperts, slots: int, hi_dtype: str, group_size: int, device=None) -> ExpertTier:
    """`slots` empty high-precision slots: the checkpoint's dtype, or int8 / int4 (group-wise)."""
    (_, K1, N1), (_, K2, N2) = host.gate_up[0].shape, host.down[0].shape
    if hi_dtype in HI_BITS:
        def empty(k, n):
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                one = quant.quantize(jnp.zeros((1, k, n)), HI_BITS[hi_dtype], group_size)
            leaves = [np.zeros((slots,) + a.shape[1:], a.dtype) for a in (one.packed, one.scales, one.zeros)]
            return dataclasses.replace(one, packed=leaves[0], scales=leaves[1], zeros=leaves[2], shape=(slots, k, n))
    else:
        dtype = host.gate_up[0].dtype
        empty = lambda k, n: np.zeros((slots, k, n), dtype)
    put = lambda t: jax.device_put(t, device)
    return ExpertTier(put(empty(K1, N1)), put(empty(K2, N2)), high_precision=True)


def host_bank(host: HostExperts, hi_dtype: str, group_size: int, *, source=None, device=None,
              progress: bool = False, clock: Stopwatch | None = None) -> HostBank:
    """Each expert's high-precision copy in (pinned) host memory: as loaded, or int8 / int4."""
    if hi_dtype in HI_BITS:
        layers = quantized_layers(host, HI_BITS[hi_dtype], group_size, "rtn", source=source, progress=progress,
                                  clock=clock)
        one = lambda qt, e: dataclasses.replace(jax.tree.map(lambda a: a[e], qt), shape=qt.shape[1:])
        E = host.num_experts
        # A generator: HostBank pins one layer at a time.
        return HostBank(([(one(gu, e), one(d, e)) for e in range(E)] for gu, d in layers), device)
    return HostBank(([(wgu[e], wd[e]) for e in range(wgu.shape[0])] for wgu, wd in zip(host.gate_up, host.down)),
                    device)
