"""Expert weights as an explicit pytree, apart from the model's other parameters.

Every policy hands the model the same structure: a few *tiers* of stored experts and a
*handle* per (MoE layer, expert) naming the tier and row that serve it.

    full      one dense tier, [L*E] rows: every expert at the checkpoint's precision
    static    one packed tier (int8/4/3/2 or MXFP4), [L*E] rows
    dynaexq   a packed fallback tier [L*E] and a high-precision slot pool [S] shared by all
              layers; an expert's handle points at its slot when it holds one
    offload   one dense slot pool [S] holding the experts the current layer needs

A promotion writes a slot and flips a handle; a demotion flips it back. Only array contents
change, never shapes or tier structure, so a jitted step never retraces. Handles are plain
int32 arrays and every published version is a fresh device array: a step already dispatched
keeps computing with the version it was given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.experts.quant import Mxfp4Tensor, QuantizedTensor

Weights = jax.Array | QuantizedTensor | Mxfp4Tensor
PACKED = (QuantizedTensor, Mxfp4Tensor)  # the stored formats whose `shape` is logical, not a buffer's


def weights_nbytes(w: Weights) -> int:
    """Device bytes of a dense array, a `QuantizedTensor` or an `Mxfp4Tensor` (packed at its real size)."""
    return w.nbytes if isinstance(w, PACKED) else math.prod(w.shape) * jnp.dtype(w.dtype).itemsize


@flax.struct.dataclass
class ExpertTier:
    """One way of storing experts: `rows` of them, each a gate_up and a down matrix."""

    gate_up: Weights  # [rows, H, 2I] (gate columns first, then up)
    down: Weights  # [rows, I, H]
    high_precision: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def rows(self) -> int:
        return self.gate_up.shape[0]

    @property
    def nbytes(self) -> int:
        return weights_nbytes(self.gate_up) + weights_nbytes(self.down)


@flax.struct.dataclass
class ExpertState:
    """Tiers of stored experts and the handle of every (MoE layer, expert)."""

    tiers: tuple[ExpertTier, ...]
    tier_of: jax.Array  # [L, E] int32: tier serving the expert
    row_of: jax.Array  # [L, E] int32: its row in that tier
    # The experts' biases (gpt-oss), or None. Kept once at the checkpoint's precision and indexed
    # by (layer, expert), whichever tier serves the expert: they are ~0.3% of its bytes, so
    # quantizing them saves nothing, and promotions never copy them.
    gate_up_bias: jax.Array | None = None  # [L, E, 2I]
    down_bias: jax.Array | None = None  # [L, E, H]

    @property
    def num_layers(self) -> int:
        return self.tier_of.shape[0]

    @property
    def num_experts(self) -> int:
        return self.tier_of.shape[1]

    @property
    def rows_per_tier(self) -> int:
        """Static stride of the (tier, row) sort keys."""
        return max(t.rows for t in self.tiers)

    @property
    def nbytes(self) -> int:
        biases = sum(b.nbytes for b in (self.gate_up_bias, self.down_bias) if b is not None)
        return sum(t.nbytes for t in self.tiers) + self.tier_of.nbytes + self.row_of.nbytes + biases

    def served_high(self) -> jax.Array:
        """[L, E] bool: the expert is served by a high-precision tier."""
        high = jnp.asarray([t.high_precision for t in self.tiers])
        return high[self.tier_of] & (self.row_of >= 0)


def layer_major_handles(num_layers: int, num_experts: int, tier: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tier_of, row_of) [L, E] for a tier that stores every expert at row `l * E + e`."""
    rows = np.arange(num_layers * num_experts, dtype=np.int32).reshape(num_layers, num_experts)
    return np.full((num_layers, num_experts), tier, np.int32), rows


def single_tier(tier: ExpertTier, num_layers: int, num_experts: int, device=None, host=None) -> ExpertState:
    """Every expert of every layer in one tier, layer-major; with `host`'s biases, if it has any."""
    tier_of, row_of = layer_major_handles(num_layers, num_experts)
    put = lambda a: jax.device_put(a, device)
    return ExpertState(tiers=(tier,), tier_of=put(tier_of), row_of=put(row_of), **device_biases(host, device))


def device_biases(host: HostExperts | None, device=None, layers: slice = slice(None)) -> dict:
    """`ExpertState`'s bias fields for `host`'s biases of MoE layers `layers` (none: {})."""
    if host is None or host.gate_up_bias is None:
        return {}
    return dict(gate_up_bias=jax.device_put(np.ascontiguousarray(host.gate_up_bias[layers]), device),
                down_bias=jax.device_put(np.ascontiguousarray(host.down_bias[layers]), device))


def stack_layers(layers, device=None) -> Weights:
    """Per-layer host arrays (or `QuantizedTensor`s, `Mxfp4Tensor`s) [E, K, N] -> one device array [L*E, K, N].

    `layers` is a sequence (a lazy one is fine: presets make each layer on access). Layers are
    moved one at a time into a preallocated device buffer (donated update), so the device never
    holds two copies and the host never holds more than the layer being moved.
    """
    n = len(layers)
    first = layers[0]
    leaves, treedef = jax.tree.flatten(first)
    out = [jnp.zeros((n * a.shape[0],) + a.shape[1:], a.dtype, device=device) for a in leaves]
    for i in range(n):
        layer = first if i == 0 else layers[i]
        for j, a in enumerate(jax.tree.leaves(layer)):
            out[j] = _write_rows(out[j], jax.device_put(np.asarray(a), device),
                                 jax.device_put(np.int32(i * a.shape[0]), device))
        del layer
    stacked = jax.tree.unflatten(treedef, out)
    if isinstance(first, PACKED):
        return dataclasses.replace(stacked, shape=(n * first.shape[0],) + first.shape[1:])
    return stacked


_write_rows = jax.jit(lambda buf, block, start: jax.lax.dynamic_update_slice_in_dim(buf, block, start, 0),
                      donate_argnums=(0,))


@dataclasses.dataclass
class HostExperts:
    """Every expert as the checkpoint holds it, in host memory, one array per MoE layer.

    Sequences may be lazy (random presets make each layer on access), so consumers take one
    layer at a time.
    """

    gate_up: Sequence[np.ndarray]  # per MoE layer: [E, H, 2I] (gate columns, then up)
    down: Sequence[np.ndarray]  # per MoE layer: [E, I, H]
    gate_up_bias: np.ndarray | None = None  # [L, E, 2I] (gate, then up), families with expert biases
    down_bias: np.ndarray | None = None  # [L, E, H]
    # Per MoE layer, the checkpoint's own MXFP4 (gate_up, down) as host `Mxfp4Tensor`s, when it
    # ships its experts so: an MXFP4 fallback is these bytes, and `gate_up` / `down` decode them
    # a layer at a time, only for the tiers that want the compute dtype.
    mxfp4: Sequence[tuple[Mxfp4Tensor, Mxfp4Tensor]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.gate_up)

    @property
    def num_experts(self) -> int:
        return self.gate_up[0].shape[0] if len(self.gate_up) else 0
