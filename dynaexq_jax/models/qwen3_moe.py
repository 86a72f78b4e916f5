"""Qwen3-MoE (`model_type: qwen3_moe`): config mapping and checkpoint tensor names.

Everything family-specific lives here: which `config.json` fields map to `ModelConfig`, which
are refused, and the name, shape and layout of every tensor in a Hugging Face checkpoint. The
tables serve both directions (`io.loader` reads with them, `io.hf_export` writes with them).
"""

from __future__ import annotations

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ModelConfig

MODEL_TYPE = "qwen3_moe"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"num_experts": common.first_key("num_experts", "num_local_experts")}


@common.adapter("Qwen3-MoE", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    """config.json's fields as they are; `ModelConfig` checks their types and ranges."""
    common.check_model_type(d, MODEL_TYPE)
    if d.get("use_sliding_window"):
        common.refuse(d, "use_sliding_window", "set it to false (Qwen3-MoE checkpoints ship with it off)")
    if d.get("attention_bias"):
        common.refuse(d, "attention_bias", "Qwen3-MoE does not use it; set it to false")
    common.silu_only(d)
    cfg = ModelConfig(
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-6, max_positions=40960),
        num_experts=common.opt(d, "num_experts", common.opt(d, "num_local_experts", 0)),
        experts_per_token=d["num_experts_per_tok"],
        moe_intermediate_size=d["moe_intermediate_size"],
        intermediate_size=common.opt(d, "intermediate_size", 0),
        norm_topk_prob=common.opt(d, "norm_topk_prob", True),
        decoder_sparse_step=common.opt(d, "decoder_sparse_step", 1),
        mlp_only_layers=common.opt(d, "mlp_only_layers", ()),
        rope_theta=common.rope_theta(d, 10000.0),
    )
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json fields transformers needs to load a checkpoint of this shape."""
    return common.hf_config(
        cfg, "Qwen3MoeForCausalLM", MODEL_TYPE,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        intermediate_size=cfg.intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=cfg.decoder_sparse_step,
        mlp_only_layers=list(cfg.mlp_only_layers),
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
    )


top_tensors = common.top_tensors


def layer_tensors(cfg: ModelConfig, i: int) -> list[common.Tensor]:
    """Non-expert tensors of decoder layer `i`; paths are inside the layer's params."""
    p = f"model.layers.{i}."
    out = common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p)
    if cfg.is_moe_layer(i):
        out.append(common.Tensor(("mlp", "gate", "kernel"), p + "mlp.gate.weight", (cfg.num_experts, cfg.hidden_size),
                                 linear=True))
    else:
        out += common.mlp_tensors(("mlp",), p + "mlp.", cfg.intermediate_size, cfg.hidden_size)
    return out


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    """Expert `e` of MoE layer `i`: gate, up and down projections ([out, in] each)."""
    return common.expert_tensors(cfg, f"model.layers.{i}.mlp.experts.{e}.")


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"model.layers.{i}.mlp.experts.")
