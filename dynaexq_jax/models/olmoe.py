"""OLMoE (`model_type: olmoe`, allenai/OLMoE-1B-7B): config mapping and tensor names.

Quirks: q and k are RMS-normalised over their whole projections (q_norm [heads * D], k_norm
[kv heads * D]), not per head; q, k and v are optionally clamped (`clip_qkv`) after the norms;
the router's top-k is not renormalised unless `norm_topk_prob`; the experts' intermediate size
is `intermediate_size` (no dense layers); `attention_bias` puts a bias on q, k, v and o.
"""

from __future__ import annotations

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ModelConfig

MODEL_TYPE = "olmoe"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"moe_intermediate_size": "intermediate_size"}


@common.adapter("OLMoE", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    if d.get("sliding_window") is not None:
        common.refuse(d, "sliding_window", "OLMoE runs here with full attention only; set it to null")
    common.silu_only(d)
    bias = common.opt(d, "attention_bias", False)
    cfg = ModelConfig(
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-5, max_positions=4096),
        num_experts=common.opt(d, "num_experts", 64),
        experts_per_token=common.opt(d, "num_experts_per_tok", 8),
        moe_intermediate_size=d["intermediate_size"],  # the experts'; OLMoE has no dense layers
        intermediate_size=d["intermediate_size"],
        norm_topk_prob=common.opt(d, "norm_topk_prob", False),
        rope_theta=common.rope_theta(d, 10000.0),
        qk_norm="full",
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=d.get("clip_qkv"),
    )
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:  # transformers sizes q_norm by hidden_size
        common.refuse(d, "head_dim", f"OLMoE's q norm spans hidden_size={cfg.hidden_size}, so head_dim must be "
                      f"hidden_size / num_attention_heads = {cfg.hidden_size // cfg.num_heads}")
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(
        cfg, "OlmoeForCausalLM", MODEL_TYPE,
        intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.num_experts,
        norm_topk_prob=cfg.norm_topk_prob,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=cfg.qkv_bias,
        clip_qkv=cfg.clip_qkv,
    )


top_tensors = common.top_tensors


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"model.layers.{i}."
    return (common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p)
            + [common.Tensor(("mlp", "gate", "kernel"), p + "mlp.gate.weight", (cfg.num_experts, cfg.hidden_size),
                             linear=True)])


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    return common.expert_tensors(cfg, f"model.layers.{i}.mlp.experts.{e}.")


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"model.layers.{i}.mlp.experts.")
