"""Pallas kernels (GPU via Triton, `interpret=True` elsewhere) for grouped expert matmuls.

Nothing here imports `dynaexq_jax`: kernels take plain arrays and a static layout
description, so they can be tested and benchmarked on their own. Beside each kernel is its
reference, what it computes written the plain way in jnp (`*_reference`), which tests,
scripts/bench_kernels.py and scripts/gpu_check.py hold the kernels to.
"""

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference, decode_attention_supported
from pallas_kernels.grouped_matmul import (
    Mxfp4,
    Packed,
    default_block_m,
    default_block_n,
    e2m1_decode,
    e8m0_decode,
    gpu_unsupported_reason,
    layer_matmul,
    layer_matmul_reference,
    layer_matmul_supported,
    split_key,
    tier_weights,
    tiled_matmul,
    tiled_matmul_reference,
)
from pallas_kernels.tiling import INVALID, Tiles, group_keys, max_tiles, plan_tiles, row_tiles

__all__ = [
    "INVALID",
    "Mxfp4",
    "Packed",
    "Tiles",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_supported",
    "default_block_m",
    "default_block_n",
    "e2m1_decode",
    "e8m0_decode",
    "gpu_unsupported_reason",
    "group_keys",
    "layer_matmul",
    "layer_matmul_reference",
    "layer_matmul_supported",
    "max_tiles",
    "plan_tiles",
    "row_tiles",
    "split_key",
    "tier_weights",
    "tiled_matmul",
    "tiled_matmul_reference",
]
