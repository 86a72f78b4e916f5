"""Mixtral (`model_type: mixtral`, Mixtral-8x7B / 8x22B): config mapping and tensor names.

Quirks: no q/k norms; the experts' intermediate size is `intermediate_size` (no dense layers);
the router always renormalises its top-k (softmax, top-k, divide by their sum); checkpoints
name the MoE block `block_sparse_moe` and the experts' projections w1 (gate), w3 (up), w2
(down). A sliding window is refused: the released models run without one.
"""

from __future__ import annotations

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "mixtral"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"}


@common.adapter("Mixtral", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    if d.get("sliding_window") is not None:
        raise ConfigError(
            f"config.json sets sliding_window={d['sliding_window']!r}, which is not supported for Mixtral; "
            "set it to null (Mixtral-8x7B and 8x22B ship with it null)"
        )
    common.silu_only(d)
    cfg = ModelConfig(
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-5, max_positions=4096 * 32),
        num_experts=common.opt(d, "num_local_experts", 8),
        experts_per_token=common.opt(d, "num_experts_per_tok", 2),
        moe_intermediate_size=d["intermediate_size"],  # the experts'; Mixtral has no dense layers
        intermediate_size=d["intermediate_size"],
        norm_topk_prob=True,
        rope_theta=common.rope_theta(d, 1e6),
        qk_norm=None,
    )
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(
        cfg, "MixtralForCausalLM", MODEL_TYPE,
        intermediate_size=cfg.moe_intermediate_size,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        sliding_window=None,
    )


top_tensors = common.top_tensors


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"model.layers.{i}."
    return (common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p)
            + [common.Tensor(("mlp", "gate", "kernel"), p + "block_sparse_moe.gate.weight",
                             (cfg.num_experts, cfg.hidden_size), linear=True)])


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    return common.expert_tensors(cfg, f"model.layers.{i}.block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"))


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"model.layers.{i}.mlp.experts.")
