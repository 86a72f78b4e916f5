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

from dynaexq_jax.kernels import grouped_matmul

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
