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

import collections.abc
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


def update_rows(buf: jax.Array, block: jax.Array, start) -> jax.Array:
    """`buf` with rows `start`.. replaced by `block` (cast to `buf`'s dtype), in place when `buf`
    is donated. bfloat16 goes through its bits: XLA on the CPU widens a bf16 dynamic update to
    float32 over the whole buffer (a 1.5 GB slot pool rewritten for every 12 MB expert)."""
    block = block.astype(buf.dtype)
    if buf.dtype == jnp.bfloat16:
        bits = lambda a, t: jax.lax.bitcast_convert_type(a, t)
        return bits(jax.lax.dynamic_update_slice_in_dim(bits(buf, jnp.uint16), bits(block, jnp.uint16), start, 0),
                    jnp.bfloat16)
    return jax.lax.dynamic_update_slice_in_dim(buf, block, start, 0)


write_rows = jax.jit(update_rows, donate_argnums=(0,))


class LayerSource(collections.abc.Sequence):
    """Per-MoE-layer expert arrays [E, K, N] made on access, never all at once: a preset's
    generator (`io.preset`), a mapped checkpoint (`io.loader`). Besides a whole layer (a fresh
    host array), a source gives what consumers need without one: an expert (a promotion's
    copy), every `stride`-th column (sampled quantization errors), a layer made on the device
    (conversion there). Subclasses implement `__getitem__` (layer i, a fresh [E, K, N] host
    array; abstract in `Sequence`) and may make the others cheaper."""

    shape: tuple[int, int, int]  # one layer's [E, K, N]
    dtype: np.dtype
    num_layers: int

    def __len__(self) -> int:
        return self.num_layers

    def expert(self, i: int, e: int) -> np.ndarray:
        """Expert `e` of layer `i`, [K, N] on the host."""
        return self[i][e]

    def stored_expert(self, i: int, e: int) -> tuple[np.ndarray, ...]:
        """Expert `e` of layer `i` as the source holds it, for a copy to a device that
        `in_layout` then makes [K, N] (default: `expert`, already so)."""
        return (self.expert(i, e),)

    def in_layout(self, stored: tuple) -> jax.Array:
        """A `stored_expert` copied to a device -> [K, N] there."""
        return stored[0]

    def columns(self, i: int, stride: int) -> np.ndarray:
        """Every `stride`-th column of layer `i`, [E, K, N // stride] on the host."""
        return np.ascontiguousarray(self[i][..., ::stride])

    def on_device(self, i: int, device=None, experts: slice | np.ndarray = slice(None)) -> jax.Array:
        """Experts `experts` (a slice, or expert ids) of layer `i`, [E', K, N], on `device`."""
        return jax.device_put(np.ascontiguousarray(self[i][experts]), device)


def layer_shape(layers) -> tuple[int, ...]:
    return tuple(layers.shape) if isinstance(layers, LayerSource) else tuple(layers[0].shape)


@dataclasses.dataclass
class HostExperts:
    """Every expert as the checkpoint holds it, in host memory, one array per MoE layer.

    Sequences may be lazy (`LayerSource`: random presets make each layer on access, a loaded
    checkpoint maps its files), so consumers take one layer, one expert or a sample at a time
    through the methods below.
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
        return self.shapes[0][0] if len(self.gate_up) else 0

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One layer's (gate_up [E, H, 2I], down [E, I, H]) shapes, without making a layer."""
        return layer_shape(self.gate_up), layer_shape(self.down)

    @property
    def dtype(self) -> np.dtype:
        seq = self.gate_up
        return np.dtype(seq.dtype if isinstance(seq, LayerSource) else seq[0].dtype)

    def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert `e` of MoE layer `layer` on the host: (gate_up [H, 2I], down [I, H])."""
        return tuple(s.expert(layer, e) if isinstance(s, LayerSource) else s[layer][e]
                     for s in (self.gate_up, self.down))

    def stored_expert(self, layer: int, e: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Expert `e` of MoE layer `layer` as its sources hold it (views of a mapped checkpoint,
        say): what a transfer copies, `expert_in_layout` makes (gate_up, down) of on the device."""
        return tuple(s.stored_expert(layer, e) if isinstance(s, LayerSource) else (s[layer][e],)
                     for s in (self.gate_up, self.down))

    def expert_in_layout(self, stored: tuple) -> tuple[jax.Array, jax.Array]:
        """A `stored_expert` copied to a device -> (gate_up [H, 2I], down [I, H]) there."""
        return tuple(s.in_layout(p) if isinstance(s, LayerSource) else p[0]
                     for s, p in zip((self.gate_up, self.down), stored))

    def columns(self, layer: int, strides: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Every `strides[m]`-th output column of MoE layer `layer`'s matrix m: (gate_up [E, H,
        2I / s0], down [E, I, H / s1]); a column is quantized as a whole (groups run along K)."""
        return tuple(s.columns(layer, st) if isinstance(s, LayerSource)
                     else np.ascontiguousarray(np.asarray(s[layer])[..., ::st])
                     for s, st in zip((self.gate_up, self.down), strides))

    def on_device(self, layer: int, device=None,
                  experts: slice | np.ndarray = slice(None)) -> tuple[jax.Array, jax.Array]:
        """Experts `experts` (a slice, or expert ids) of MoE layer `layer` on `device`:
        (gate_up, down), made there where the source can."""
        return tuple(s.on_device(layer, device, experts) if isinstance(s, LayerSource)
                     else jax.device_put(np.ascontiguousarray(np.asarray(s[layer])[experts]), device)
                     for s in (self.gate_up, self.down))
