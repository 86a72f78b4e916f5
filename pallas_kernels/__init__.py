"""Pallas kernels (GPU via Triton, `interpret=True` elsewhere): grouped expert matmuls, decode
attention, and the fused decode layer (`decode_layer`, `moe_decode`).

Nothing here imports `dynaexq_jax`: kernels take plain arrays and a static layout
description, so they can be tested and benchmarked on their own. Beside each kernel is its
reference, what it computes written the plain way in jnp (`*_reference`), which tests,
scripts/bench_kernels.py and scripts/gpu_check.py hold the kernels to.
"""

from pallas_kernels.decode_attention import (
    decode_attention,
    decode_attention_partials,
    decode_attention_reference,
    decode_attention_supported,
    merge_partials,
)
from pallas_kernels.decode_layer import attn_in, attn_in_reference, attn_in_supported, attn_out, attn_out_reference
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
from pallas_kernels.moe_decode import (
    Route,
    clamped_glu,
    expert_down,
    expert_gate_up,
    experts_reference,
    experts_supported,
    route,
    route_reference,
    silu_glu,
)
from pallas_kernels.tiling import INVALID, Tiles, group_keys, max_tiles, plan_tiles, row_tiles

__all__ = [
    "INVALID",
    "Mxfp4",
    "Packed",
    "Route",
    "Tiles",
    "attn_in",
    "attn_in_reference",
    "attn_in_supported",
    "attn_out",
    "attn_out_reference",
    "clamped_glu",
    "decode_attention",
    "decode_attention_partials",
    "decode_attention_reference",
    "decode_attention_supported",
    "expert_down",
    "expert_gate_up",
    "experts_reference",
    "experts_supported",
    "merge_partials",
    "route",
    "route_reference",
    "silu_glu",
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
