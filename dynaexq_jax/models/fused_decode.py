"""The decode step's layers on a GPU: six Pallas kernels a layer (plus the loop's counter).

One new token per row, every layer a softmax-attention layer with an MoE block. Each layer is

    attn_in     residual + the previous layer's pending expert rows, RMSNorm, q/k/v, q/k norm,
                RoPE, the new key and value written into the cache in place
    attention   flash-decoding partials over the filled slots (`decode_attention_partials`)
    attn_out    the partials merged (sinks too), the output projection, the residual add
    route       RMSNorm, router, top-k, the routing record, the sorted tile plan of the pairs
    gate_up     each tile's expert gate|up from its tier, the gated activation
    down        each tile's expert down, times the pair's combine weight

(`pallas_kernels.decode_layer`, `decode_attention`, `moe_decode`). The experts' rows are not
added into the residual stream by a kernel of their own: the next layer's `attn_in` and
`attn_out` add them where they read it, and after the last layer the final norm's input is
summed once. Between layers the scan carries x1 (the residual before the expert rows), the
expert rows y in sorted order, each token's positions in y, the KV cache and the routing
record, each written by one kernel.

`supported` says whether a configuration runs this way; everything else (prefill, other
attention kinds or norms, shared experts, big-little routing, another expert FFN, a batch
over 64 rows) runs `Decoder`'s per-layer modules.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

import pallas_kernels
from dynaexq_jax.experts.expert_state import ExpertState
from dynaexq_jax.experts.matmul import kernel_tier
from dynaexq_jax.models.config import ModelConfig

# Opt-in (DYNAEXQ_FUSED_DECODE=1, read once at import): on an H200 (2026-12-04, gpu_check, Qwen3-30B-A3B
# int4) XLA's own step decodes 178 tok/s at batch 1 and 2,446 at batch 32 where this one, at 7.7 kernels
# a layer instead of 30, gives 80 and 1,522: its attention-side kernels ran 40 programs or fewer,
# each waiting on chains of dependent loads (since cut: docs/PERFORMANCE.md, "The fused layer's load
# chains", not yet timed on a GPU). It becomes the default when gpu_check's "(fused layer)" cases beat XLA's.
ENABLED = os.environ.get("DYNAEXQ_FUSED_DECODE", "0") == "1"

MAX_ROWS = 64  # rows per step it takes (the router's sort of the pairs is one program's work)


def _tiers(experts: ExpertState):
    gate_up = [kernel_tier(t.gate_up) for t in experts.tiers]
    down = [kernel_tier(t.down) for t in experts.tiers]
    return gate_up, down


def supported(cfg: ModelConfig, experts, batch: int, slots: int) -> bool:
    """Whether `layers` runs this model's decode step at `batch` rows over a cache of `slots`."""
    if not isinstance(experts, ExpertState) or batch > MAX_ROWS:
        return False
    if len(cfg.segments) != 1 or cfg.segments[0].kind != "moe" or cfg.segments[0].attention != "full":
        return False
    if (cfg.norm != "rms" or cfg.qk_norm not in (None, "per_head") or cfg.attn_output_gate or cfg.clip_qkv is not None
            or cfg.rotary_dim != cfg.head_dim or cfg.shared_expert_size
            or cfg.router not in pallas_kernels.moe_decode.ROUTERS):
        return False
    H, I, D = cfg.hidden_size, cfg.moe_intermediate_size, cfg.head_dim
    pairs = batch * cfg.experts_per_token
    tm = pallas_kernels.default_block_m(pairs, cfg.num_experts)
    layouts = [kernel_tier(t.gate_up)[1] for t in experts.tiers]
    return (pallas_kernels.attn_in_supported(H, D) and pallas_kernels.decode_attention_supported(D, slots)
            and H % 16 == 0 and pallas_kernels.experts_supported(H, I, layouts, pairs, tm))


def _glu(cfg: ModelConfig):
    if cfg.expert_activation == "clamped_swiglu":
        return functools.partial(pallas_kernels.clamped_glu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    return pallas_kernels.silu_glu


def layers(cfg: ModelConfig, params: dict, experts: ExpertState, kv, x, rot, token_valid, start, index, *,
           interpret: bool = False):
    """Every layer of the decode step. `params`: the one segment's stacked layer parameters
    (`Decoder`'s tree); kv [L, 2, B, KVH, S, D]; x [B, 1, H] the embedded tokens; rot (cos,
    sin) [B, 1, 1, D]; token_valid [B, 1]; start [B]; index [] or [B]. `interpret`: the kernels
    in interpret mode (tests on a CPU). -> (x [B, 1, H] before the final norm, kv, the routing
    record [L, B, E] float32: chosen experts' router probabilities, -1 elsewhere)."""
    B, _, H = x.shape
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.experts_per_token
    Hq, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = x.dtype
    pairs = B * k
    tile_rows = pallas_kernels.default_block_m(pairs, E)
    attn, mlp = params["self_attn"], params["mlp"]
    bias = lambda tree: tree.get("bias")
    gate_up, down = _tiers(experts)
    mx_in = any(isinstance(lay, pallas_kernels.Mxfp4) for _, lay in gate_up)
    mx_down = any(isinstance(lay, pallas_kernels.Mxfp4) for _, lay in down)
    R = experts.rows_per_tier
    windows = jnp.asarray(cfg.layer_windows, jnp.int32) if cfg.sliding_layers else None
    cos, sin = rot[0][:, 0, 0], rot[1][:, 0, 0]
    valid = token_valid[:, 0].astype(jnp.int32)
    index = jnp.broadcast_to(index, (B,))  # once, not in every layer (XLA keeps broadcasts in loops)

    def body(carry, _):
        x1, y, pos, kv, chosen, i = carry
        x, q, kv = pallas_kernels.attn_in(
            x1, y, pos, params["input_layernorm"]["weight"], attn["qkv_proj"]["kernel"], cos, sin, kv, i, index,
            heads=Hq, kv_heads=KVH, eps=cfg.rms_norm_eps, interpret=interpret, bias=bias(attn["qkv_proj"]),
            qk_norm=attn["qk_norm"]["weight"] if cfg.qk_norm else None)
        o, m, l = pallas_kernels.decode_attention_partials(q, kv, i, start, index, kv_heads=KVH, scale=D**-0.5,
                                                           interpret=interpret, windows=windows)
        x1 = pallas_kernels.attn_out(o, m, l, x, attn["o_proj"]["kernel"], i, heads=Hq, interpret=interpret,
                                     bias=bias(attn["o_proj"]), sinks=attn.get("sinks"))
        r = pallas_kernels.route(x1, params["post_attention_layernorm"]["weight"], mlp["gate"]["kernel"],
                                 experts.tier_of, experts.row_of, valid, chosen, i, i, k=k, eps=cfg.rms_norm_eps,
                                 mode=cfg.router, norm_topk=cfg.norm_topk_prob, rows_per_tier=R, tile_rows=tile_rows,
                                 interpret=interpret, gate_bias=bias(mlp["gate"]), nibbles=mx_in)
        h = pallas_kernels.expert_gate_up(r.hn, gate_up, r, pairs=pairs, inter=cfg.moe_intermediate_size,
                                          rows_per_tier=R, tm=tile_rows, glu=_glu(cfg), interpret=interpret,
                                          bias=experts.gate_up_bias, moe_layer=i, nibbles_out=mx_down)
        h, h_nib = h if mx_down else (h, None)
        y = pallas_kernels.expert_down(h, down, r, pairs=pairs, hidden=H, rows_per_tier=R, tm=tile_rows,
                                       interpret=interpret, bias=experts.down_bias, moe_layer=i, h_nibbles=h_nib)
        return (x1, y, r.pos, kv, r.chosen, i + 1), None

    tm, kp = pallas_kernels.decode_layer.row_tile(B), 1 << (k - 1).bit_length()
    init = (x[:, 0], jnp.zeros((pairs, H), dt), jnp.full((tm, kp), -1, jnp.int32), kv,
            jnp.zeros((L, B, E), jnp.float32), jnp.zeros((), jnp.int32))
    (x1, y, pos, kv, chosen, _), _ = jax.lax.scan(body, init, length=L)
    return pallas_kernels.decode_layer.pending_sum(x1, y, pos, k)[:, None], kv, chosen
