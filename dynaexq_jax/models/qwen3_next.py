"""Qwen3-Next (`model_type: qwen3_next`, Qwen3-Next-80B-A3B): config mapping and tensor names.

Quirks: a hybrid stack, gated DeltaNet linear attention (`models.deltanet`) on the layers
`layer_types` names `linear_attention` (default: three of every `full_attention_interval` = 4),
softmax attention on the rest, with a sigmoid output gate (q_proj emits each head's q and gate)
and RoPE on the first `partial_rotary_factor` of each head's dims; every RMSNorm but the
DeltaNet's output norm stores its weight zero-centred (applied as 1 + w); 512 experts top-10
plus a shared expert scaled by sigmoid(x @ shared_expert_gate). The multi-token-prediction
head (`mtp.*` tensors, for speculative decoding) is not loaded.
"""

from __future__ import annotations

from dynaexq_jax.models import common, qwen2_moe
from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "qwen3_next"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"shared_expert_size": "shared_expert_intermediate_size",
               "linear_conv_kernel": "linear_conv_kernel_dim", "linear_layers": "layer_types"}
ARCHITECTURE = "Qwen3NextForCausalLM"
LAYER_TYPES = ("linear_attention", "full_attention")
IGNORED_PREFIXES = ("mtp.",)  # the multi-token-prediction head: not used for plain decoding


def linear_layers(d: dict, num_layers: int) -> tuple[int, ...]:
    """The DeltaNet layers: from `layer_types`, else every layer but each `full_attention_interval`-th."""
    types = d.get("layer_types")
    if types is None:
        interval = common.opt(d, "full_attention_interval", 4)
        if not isinstance(interval, int) or isinstance(interval, bool) or not 1 <= interval <= num_layers:
            common.refuse(d, "full_attention_interval",
                          f"it must be an integer from 1 to num_hidden_layers={num_layers}")
        return tuple(i for i in range(num_layers) if (i + 1) % interval)
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json's layer_types must list one of {LAYER_TYPES} for each of the "
                          f"num_hidden_layers={num_layers} layers; correct it from the model's release")
    return tuple(i for i, t in enumerate(types) if t == "linear_attention")


def partial_rotary(d: dict) -> float:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    return common.opt(rope if isinstance(rope, dict) else {}, "partial_rotary_factor",
                      common.opt(d, "partial_rotary_factor", 0.25))


def text_model_config(d: dict, model_type: str = MODEL_TYPE) -> ModelConfig:
    """config.json's fields -> ModelConfig (`config_from_hf` names the keys in its errors;
    Qwen3.5-MoE reads its text model's fields through this)."""
    common.check_model_type(d, model_type)
    if d.get("attention_bias"):
        common.refuse(d, "attention_bias", "Qwen3-Next has no attention biases; set it to false")
    common.silu_only(d)
    fields = common.hf_fields(d, model_type, rms_norm_eps=1e-6, max_positions=32768, head_dim=256)
    cfg = ModelConfig(
        **fields,
        num_experts=common.opt(d, "num_experts", 512),
        experts_per_token=common.opt(d, "num_experts_per_tok", 10),
        moe_intermediate_size=common.opt(d, "moe_intermediate_size", 512),
        intermediate_size=common.opt(d, "intermediate_size", 5632),
        norm_topk_prob=common.opt(d, "norm_topk_prob", True),
        decoder_sparse_step=common.opt(d, "decoder_sparse_step", 1),
        mlp_only_layers=common.opt(d, "mlp_only_layers", ()),
        rope_theta=common.rope_theta(d, 10000.0),
        norm="zero_centred_rms",
        shared_expert_size=common.opt(d, "shared_expert_intermediate_size", 512),
        shared_expert_gate=True,
        linear_layers=linear_layers(d, fields["num_layers"]),
        linear_num_key_heads=common.opt(d, "linear_num_key_heads", 16),
        linear_num_value_heads=common.opt(d, "linear_num_value_heads", 32),
        linear_key_head_dim=common.opt(d, "linear_key_head_dim", 128),
        linear_value_head_dim=common.opt(d, "linear_value_head_dim", 128),
        linear_conv_kernel=common.opt(d, "linear_conv_kernel_dim", 4),
        attn_output_gate=True,
        partial_rotary_factor=partial_rotary(d),
    )
    if cfg.moe_layers and cfg.shared_expert_size <= 0:
        common.refuse(d, "shared_expert_intermediate_size", "Qwen3-Next's shared expert needs a positive size")
    return common.checked(cfg)


config_from_hf = common.adapter("Qwen3-Next", CONFIG_KEYS)(text_model_config)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(
        cfg, ARCHITECTURE, MODEL_TYPE,
        **qwen2_moe.moe_fields(cfg),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
        layer_types=["linear_attention" if i in cfg.linear_layers else "full_attention"
                     for i in range(cfg.num_layers)],
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel,
        hidden_act="silu",
        attention_bias=False,
    )


top_tensors = common.top_tensors


def linear_attention_tensors(cfg: ModelConfig, p: str) -> list:
    """`linear_attn.*`: in_proj_qkvz and in_proj_ba into one projection (one read of x), the
    convolution as stored [C, 1, K], the per-head decay parameters, the output norm and projection."""
    from dynaexq_jax.models.deltanet import conv_channels

    H = cfg.hidden_size
    NK, NV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    DK, DV = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    a, T = p + "linear_attn.", common.Tensor
    qkvz = NK * 2 * DK + NV * 2 * DV
    return [T(("linear_attn", "in_proj", "kernel"), a + "in_proj_qkvz.weight", (qkvz, H), linear=True, cols=(0, qkvz)),
            T(("linear_attn", "in_proj", "kernel"), a + "in_proj_ba.weight", (2 * NV, H), linear=True,
              cols=(qkvz, qkvz + 2 * NV)),
            T(("linear_attn", "conv_weight"), a + "conv1d.weight", (conv_channels(cfg), 1, cfg.linear_conv_kernel)),
            T(("linear_attn", "A_log"), a + "A_log", (NV,)),
            T(("linear_attn", "dt_bias"), a + "dt_bias", (NV,)),
            T(("linear_attn", "norm", "weight"), a + "norm.weight", (DV,)),
            T(("linear_attn", "out_proj", "kernel"), a + "out_proj.weight", (H, NV * DV), linear=True)]


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"model.layers.{i}."
    out = common.norm_tensors(cfg, p)
    out += linear_attention_tensors(cfg, p) if i in cfg.linear_layers else common.attention_tensors(cfg, p)
    return out + qwen2_moe.mlp_tensors(cfg, i, p)


# The MoE block and its expert tensors are Qwen2-MoE's.
expert_tensors = qwen2_moe.expert_tensors
fused_expert_tensors = qwen2_moe.fused_expert_tensors
