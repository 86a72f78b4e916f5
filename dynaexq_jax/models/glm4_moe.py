"""GLM-4.5 / 4.6 (`model_type: glm4_moe`, zai-org/GLM-4.5, GLM-4.5-Air, GLM-4.6): config mapping
and tensor names.

Quirks: DeepSeek-V3's MoE block (`models.deepseek_v3`: the float32 sigmoid router with its
`e_score_correction_bias`, `n_group` / `topk_group`, `routed_scaling_factor`, `n_shared_experts`
shared experts, dense layers before `first_k_dense_replace`) under grouped-query softmax
attention with biases on q, k and v (`attention_bias`, none on o), RoPE on the first
`partial_rotary_factor` of each head's dims (0.5 as released), and RMSNorms of q and k per head
when `use_qk_norm` (GLM-4.5 and 4.6; not Air). The multi-token-prediction layer after the last
decoder layer (`num_nextn_predict_layers`) is not loaded.
"""

from __future__ import annotations

from dynaexq_jax.models import common, deepseek_v3
from dynaexq_jax.models.config import ModelConfig

MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"
# transformers' Glm4MoeConfig defaults for the MoE block's fields (GLM-4.5-Air's).
MOE_DEFAULTS = dict(n_routed_experts=128, num_experts_per_tok=8, first_k_dense_replace=1, n_shared_experts=1,
                    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True)

ignored_prefixes = deepseek_v3.ignored_prefixes


def partial_rotary(d: dict) -> float:
    """`partial_rotary_factor` from rope_parameters (transformers 5.x) or the top level (the releases)."""
    _, rope = common.rope_dict(d)
    return common.opt(rope, "partial_rotary_factor", common.opt(d, "partial_rotary_factor", 0.5))


@common.adapter("GLM-4.5", deepseek_v3.SIGMOID_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    common.silu_only(d)
    common.fp8_or_none(d, "GLM-4.5")
    bias = common.opt(d, "attention_bias", False)
    cfg = ModelConfig(
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-5, max_positions=131072),
        **deepseek_v3.sigmoid_moe_fields(d, "GLM-4.5", MOE_DEFAULTS),
        rope_theta=common.rope_theta(d, 10000.0),
        qk_norm="per_head" if common.opt(d, "use_qk_norm", False) else None,
        qkv_bias=bias,
        partial_rotary_factor=partial_rotary(d),
    )
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(
        cfg, ARCHITECTURE, MODEL_TYPE,
        **deepseek_v3.sigmoid_moe_config(cfg),
        head_dim=cfg.head_dim,
        attention_bias=cfg.qkv_bias,
        use_qk_norm=cfg.qk_norm is not None,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
        hidden_act="silu",
    )


top_tensors = common.top_tensors


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"model.layers.{i}."
    return common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p) + deepseek_v3.mlp_tensors(cfg, i, p)


expert_tensors = deepseek_v3.expert_tensors
fused_expert_tensors = deepseek_v3.fused_expert_tensors
