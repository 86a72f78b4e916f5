"""One entry point for grouped (per-expert) matmuls, whatever the weights' precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from dynaexq_jax.experts.quant import QuantizedTensor, dequantize

BACKENDS = (None, "pallas", "xla")


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def grouped_matmul(x, w, group_sizes, *, backend=None, preferred_element_type=None):
    """Rows of `x` [T, K], sorted by group, times `w[g]` [K, N] for their group g -> [T, N].

    `group_sizes` [G] int32 sums to at most T (`jax.lax.ragged_dot` semantics; rows past
    the sum come out zero). `w` is a dense array [G, K, N] or a `QuantizedTensor`.

    backend None picks per platform: on GPU the Pallas kernel for quantized weights (unless
    its shape limits rule it out) and `ragged_dot` for dense ones; elsewhere the XLA path.
    "pallas" forces the Pallas kernels (interpreted off GPU, also for dense weights);
    "xla" forces dequantize + `ragged_dot`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    group_sizes = group_sizes.astype(jnp.int32)
    out_dtype = preferred_element_type or x.dtype
    if isinstance(w, QuantizedTensor):
        if backend is None:
            _, k, n = w.shape
            ok = _on_gpu() and pallas_kernels.gpu_unsupported_reason(
                k, n, bits=w.bits, group_size=w.group_size,
                block_m=pallas_kernels.default_block_m(x.shape[0], w.shape[0]),
                block_n=pallas_kernels.default_block_n(n, x.shape[0])) is None
            backend = "pallas" if ok else "xla"
        if backend == "pallas":
            return pallas_kernels.grouped_dequant_matmul(
                x, w, group_sizes, preferred_element_type=out_dtype)
        return _xla_dequant_matmul(x, w, group_sizes, out_dtype)
    if backend == "pallas":
        return pallas_kernels.grouped_matmul_dense(
            x, w, group_sizes, preferred_element_type=out_dtype)
    return jax.lax.ragged_dot(x.astype(w.dtype), w, group_sizes, preferred_element_type=out_dtype)


def _xla_dequant_matmul(x, qt: QuantizedTensor, group_sizes, out_dtype):
    """Dequantize + `ragged_dot`; with fewer rows than experts only the active experts are
    dequantized (at most T of them), so decode does not expand the whole bank."""
    t = x.shape[0]
    num_experts = qt.shape[0]
    if t == 0:
        return jnp.zeros((0, qt.shape[-1]), out_dtype)
    if t < num_experts:
        # Ascending ids keep the rows' expert order; padding entries get zero rows.
        (active,) = jnp.nonzero(group_sizes > 0, size=t, fill_value=0)  # [T]
        n_active = jnp.sum(group_sizes > 0)
        group_sizes = jnp.where(jnp.arange(t) < n_active, group_sizes[active], 0)
        qt = qt.take(active)
    w = dequantize(qt, x.dtype)  # [min(T, E), K, N]
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=out_dtype)
