"""Expert weights as an explicit pytree, separate from the model's other parameters.

The model's MoE block only ever calls `experts.ffn(moe_layer, x, expert_ids, weights)`, so
any pytree with that method (all-bf16 experts here; mixed-precision slots later) serves the
same jitted model without retracing when its array contents change.
"""

from __future__ import annotations

from typing import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from dynaexq_jax.experts.matmul import grouped_matmul
from dynaexq_jax.experts.quant import QuantizedTensor

# (x_sorted [P, K], group_sizes [G]) -> [P, N]
GroupedMatmul = Callable[[jax.Array, jax.Array], jax.Array]


def routed_swiglu(
    x: jax.Array,  # [T, H]
    group_ids: jax.Array,  # [T, k] group of each routed (token, expert) pair
    weights: jax.Array,  # [T, k] combine weight of each pair
    num_groups: int,
    gate_up: GroupedMatmul,  # -> [P, 2I]
    down: GroupedMatmul,  # -> [P, H]
) -> jax.Array:  # [T, H]
    """SwiGLU experts over routed pairs: sort pairs by group, two grouped matmuls, combine.

    Every (token, expert) pair is computed exactly once, on the weights its group names.
    """
    T, k = group_ids.shape
    flat = group_ids.reshape(-1)  # [P = T*k]
    order = jnp.argsort(flat, stable=True)
    token_of = order // k  # [P]
    group_sizes = jnp.bincount(flat, length=num_groups).astype(jnp.int32)  # [G]
    h = gate_up(x[token_of], group_sizes)  # [P, 2I]
    g, u = jnp.split(h, 2, axis=-1)
    y = down(jax.nn.silu(g) * u, group_sizes)  # [P, H]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(x).at[token_of].add(y.astype(x.dtype))


@flax.struct.dataclass
class DenseExperts:
    """Every expert of every MoE layer in one precision (the all-high-precision model)."""

    gate_up: tuple[jax.Array, ...]  # per MoE layer: [E, H, 2I] (gate columns first, then up)
    down: tuple[jax.Array, ...]  # per MoE layer: [E, I, H]

    @property
    def num_experts(self) -> int:
        return self.gate_up[0].shape[0]

    def ffn(self, moe_layer: int, x, expert_ids, weights):
        wgu, wd = self.gate_up[moe_layer], self.down[moe_layer]
        chex.assert_equal_shape_prefix((wgu, wd), 1)
        return routed_swiglu(
            x,
            expert_ids,
            weights,
            self.num_experts,
            lambda xs, gs: grouped_matmul(xs, wgu, gs, preferred_element_type=x.dtype),
            lambda xs, gs: grouped_matmul(xs, wd, gs, preferred_element_type=x.dtype),
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.gate_up + self.down)

    def hi_pairs(self, counts):
        """Routed pairs served at high precision, from a trace's counts [moe_layers, E]."""
        return jnp.sum(counts)


def _nbytes(w) -> int:
    return w.nbytes if isinstance(w, QuantizedTensor) else w.size * w.dtype.itemsize


@flax.struct.dataclass
class MixedExperts:
    """Every expert on its low-precision fallback, plus a pool of high-precision slots.

    One slot pool serves all MoE layers (all have the same expert shape), so a budget's
    slots can go where traffic is: evenly per layer (the paper's rule) or by a global
    allocation, without reshaping anything. `slot_of` is the stable handle of each expert:
    flipping it is the only thing a promotion or demotion changes in what a step computes.
    """

    lo_gate_up: tuple[QuantizedTensor, ...]  # per MoE layer: [E, H, 2I]
    lo_down: tuple[QuantizedTensor, ...]  # per MoE layer: [E, I, H]
    hi_gate_up: jax.Array | QuantizedTensor  # [S, H, 2I] bf16, or int8
    hi_down: jax.Array | QuantizedTensor  # [S, I, H]
    slot_of: jax.Array  # [moe_layers, E] int32: slot holding the expert, -1 = fallback
    owner: jax.Array  # [S] int32: layer * E + expert in the slot, -1 = free

    @property
    def num_experts(self) -> int:
        return self.slot_of.shape[1]

    @property
    def num_slots(self) -> int:
        return self.owner.shape[0]

    @property
    def fallback_nbytes(self) -> int:
        return sum(_nbytes(w) for w in self.lo_gate_up + self.lo_down)

    @property
    def slots_nbytes(self) -> int:
        return _nbytes(self.hi_gate_up) + _nbytes(self.hi_down)

    @property
    def nbytes(self) -> int:
        return self.fallback_nbytes + self.slots_nbytes + self.slot_of.nbytes + self.owner.nbytes

    def hi_pairs(self, counts):
        return jnp.sum(jnp.where(self.slot_of >= 0, counts, 0))

    def ffn(self, moe_layer: int, x, expert_ids, weights):
        E, S = self.num_experts, self.num_slots
        slot = self.slot_of[moe_layer][expert_ids]  # [T, k]
        # Groups 0..E-1 are fallbacks, E..E+S-1 slots: slotted pairs sort after all others.
        groups = jnp.where(slot >= 0, E + slot, expert_ids)

        def two_tier(lo, hi):
            def matmul(xs, gs):
                y = grouped_matmul(xs, lo, gs[:E], preferred_element_type=x.dtype)
                if S == 0:
                    return y
                # Slot rows start where fallback rows end; bring them to the front for
                # the slot pool's grouped matmul, then put the results back in place.
                n_lo = jnp.sum(gs[:E])
                y_hi = grouped_matmul(jnp.roll(xs, -n_lo, 0), hi, gs[E:], preferred_element_type=x.dtype)
                return y + jnp.roll(y_hi, n_lo, 0)

            return matmul

        return routed_swiglu(
            x,
            groups,
            weights,
            E + S,
            two_tier(self.lo_gate_up[moe_layer], self.hi_gate_up),
            two_tier(self.lo_down[moe_layer], self.hi_down),
        )
