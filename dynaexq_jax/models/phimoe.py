"""Phi-3.5-MoE (`model_type: phimoe`, microsoft/Phi-3.5-MoE-instruct): config mapping and
tensor names.

Quirks: LayerNorms with bias (layers and final norm), biases on q, k, v and o
(`attention_bias`) and on the LM head (`lm_head_bias`); no q/k norms; the "sparsemixer" top-2
router (the best expert weighted by its softmax among the experts within a relative
2 * `router_jitter_noise` of it, then the same for the best of the rest; no renormalisation);
"longrope" RoPE scaling (per-frequency short/long factors and mscales, long past
`original_max_position_embeddings`); checkpoints name the MoE block `block_sparse_moe` and the
experts' projections w1 (gate), w3 (up), w2 (down), like Mixtral.

transformers 5.x's own Phi-MoE keeps the short factors past `original_max_position_embeddings`
(switching only the mscale); this follows the model's release code and transformers' Phi-3,
which switch both. The two agree up to `original_max_position_embeddings` tokens (4096).
"""

from __future__ import annotations

import dataclasses

from dynaexq_jax.models import common, mixtral
from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "phimoe"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size",
               "router_jitter": "router_jitter_noise"}


def _rope(d: dict) -> dict:
    """ModelConfig's RoPE fields from `rope_parameters` / `rope_scaling` (default or longrope)."""
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = d.get(field) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json has {field}={rope!r}, but it must be an object or null")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out = dict(rope_theta=common.opt(rope, "rope_theta", common.opt(d, "rope_theta", 1e6)))
    if rope_type == "default":
        return out
    if rope_type != "longrope":
        raise ConfigError(f"config.json asks for rope scaling {rope_type!r} in {field!r}, which is not supported "
                          f"for Phi-MoE (only 'longrope'); remove {field!r} to run at the model's native context")
    for key in ("short_factor", "long_factor", "short_mscale", "long_mscale"):
        if rope.get(key) is None:
            raise ConfigError(f"config.json's {field} (longrope) lacks {key!r}")
    original = rope.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if original is None:
        raise ConfigError(f"config.json's {field} (longrope) lacks 'original_max_position_embeddings'")
    return dict(out, rope_scaling="longrope", rope_original_max=original, rope_short_factor=rope["short_factor"],
                rope_long_factor=rope["long_factor"], rope_short_mscale=rope["short_mscale"],
                rope_long_mscale=rope["long_mscale"])


@common.adapter("Phi-MoE", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    common.silu_only(d)
    if common.opt(d, "num_experts_per_tok", 2) != 2:
        common.refuse(d, "num_experts_per_tok", "Phi-MoE's sparsemixer router picks exactly 2 experts")
    bias = common.opt(d, "attention_bias", False)
    cfg = ModelConfig(
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-5, max_positions=4096 * 32),
        num_experts=common.opt(d, "num_local_experts", 16),
        experts_per_token=2,
        moe_intermediate_size=d["intermediate_size"],  # the experts'; Phi-MoE has no dense layers
        intermediate_size=d["intermediate_size"],
        norm_topk_prob=False,
        qk_norm=None,
        qkv_bias=bias,
        o_bias=bias,
        router="sparsemixer",
        router_jitter=common.opt(d, "router_jitter_noise", 0.01),
        norm="layer",
        lm_head_bias=common.opt(d, "lm_head_bias", False),
    )
    cfg = dataclasses.replace(cfg, **_rope(d))
    window = d.get("sliding_window")
    # A window as long as the context (as released) is no window.
    if window is not None and not (isinstance(window, int) and window >= cfg.max_position_embeddings):
        common.refuse(d, "sliding_window", f"set it to null or to max_position_embeddings="
                      f"{cfg.max_position_embeddings} (Phi-3.5-MoE ships with the latter)")
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    out = common.hf_config(
        cfg, "PhimoeForCausalLM", MODEL_TYPE,
        intermediate_size=cfg.moe_intermediate_size,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=cfg.qkv_bias,
        lm_head_bias=cfg.lm_head_bias,
        router_jitter_noise=cfg.router_jitter,
        sliding_window=None,
    )
    if cfg.rope_scaling == "longrope":
        out["original_max_position_embeddings"] = cfg.rope_original_max
        out["rope_scaling"] = {
            "rope_type": "longrope", "rope_theta": cfg.rope_theta, "short_factor": list(cfg.rope_short_factor),
            "long_factor": list(cfg.rope_long_factor), "short_mscale": cfg.rope_short_mscale,
            "long_mscale": cfg.rope_long_mscale, "original_max_position_embeddings": cfg.rope_original_max,
        }
    return out


# Named as Mixtral's tensors are (the biases each config asks for included: `common` reads them from it).
top_tensors, layer_tensors, expert_tensors, fused_expert_tensors = (
    mixtral.top_tensors, mixtral.layer_tensors, mixtral.expert_tensors, mixtral.fused_expert_tensors)
