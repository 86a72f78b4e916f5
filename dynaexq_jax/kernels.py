"""One entry point for grouped (per-expert) matmuls, whatever the weights' precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x, w, group_sizes, *, backend=None, preferred_element_type=None):
    """Rows of `x` [T, K], sorted by group, times `w[g]` [K, N] for their group g -> [T, N].

    `group_sizes` [G] int32 sums to at most T (`jax.lax.ragged_dot` semantics; rows past
    the sum come out zero).
    """
    out_dtype = preferred_element_type or x.dtype
    return jax.lax.ragged_dot(
        x.astype(w.dtype), w, group_sizes.astype(jnp.int32), preferred_element_type=out_dtype
    )
