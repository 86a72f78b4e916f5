"""Pallas kernels (GPU via Triton, `interpret=True` elsewhere) for grouped expert matmuls."""

from pallas_kernels.grouped_matmul import (
    default_block_m,
    default_block_n,
    gpu_unsupported_reason,
    grouped_dequant_matmul,
    grouped_matmul_dense,
)

__all__ = [
    "default_block_m",
    "default_block_n",
    "gpu_unsupported_reason",
    "grouped_dequant_matmul",
    "grouped_matmul_dense",
]
