"""Qwen2-MoE (`model_type: qwen2_moe`, Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): config mapping and
tensor names.

Quirks: a shared expert (a dense SwiGLU MLP of `shared_expert_intermediate_size`) beside the
routed experts in every MoE layer, its output scaled by sigmoid(x @ shared_expert_gate); it is
always resident, a non-expert weight in the layer's params (`mlp/shared_expert`). Biases on
q, k and v (`qkv_bias`, on unless the config says otherwise); no q/k norms; dense layers from
`mlp_only_layers` / `decoder_sparse_step`; the router's top-k renormalised only if
`norm_topk_prob`. Sliding-window attention is refused (the released models keep it off).
"""

from __future__ import annotations

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "qwen2_moe"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"shared_expert_size": "shared_expert_intermediate_size"}


@common.adapter("Qwen2-MoE", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    if d.get("use_sliding_window"):
        common.refuse(d, "use_sliding_window", "set it to false (Qwen2-MoE checkpoints ship with it off)")
    if "sliding_attention" in (d.get("layer_types") or ()):
        raise ConfigError("config.json's layer_types has 'sliding_attention' layers, which are not supported; "
                          "use 'full_attention' for every layer")
    common.silu_only(d)
    cfg = ModelConfig(
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-6, max_positions=32768),
        num_experts=common.opt(d, "num_experts", 60),
        experts_per_token=common.opt(d, "num_experts_per_tok", 4),
        moe_intermediate_size=d["moe_intermediate_size"],
        intermediate_size=common.opt(d, "intermediate_size", 0),
        norm_topk_prob=common.opt(d, "norm_topk_prob", False),
        decoder_sparse_step=common.opt(d, "decoder_sparse_step", 1),
        mlp_only_layers=common.opt(d, "mlp_only_layers", ()),
        rope_theta=common.rope_theta(d, 10000.0),
        qk_norm=None,
        qkv_bias=common.opt(d, "qkv_bias", True),
        shared_expert_size=d["shared_expert_intermediate_size"],
        shared_expert_gate=True,
    )
    if cfg.moe_layers and cfg.shared_expert_size <= 0:
        common.refuse(d, "shared_expert_intermediate_size", "Qwen2-MoE's shared expert needs a positive size")
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(
        cfg, "Qwen2MoeForCausalLM", MODEL_TYPE,
        **moe_fields(cfg),
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        qkv_bias=cfg.qkv_bias,
        use_sliding_window=False,
    )


top_tensors = common.top_tensors


def moe_fields(cfg: ModelConfig) -> dict:
    """config.json's fields of the MoE block (a shared expert beside the routed ones)."""
    return dict(head_dim=cfg.head_dim, num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                shared_expert_intermediate_size=cfg.shared_expert_size, intermediate_size=cfg.intermediate_size,
                norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                mlp_only_layers=list(cfg.mlp_only_layers))


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"model.layers.{i}."
    return common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p) + mlp_tensors(cfg, i, p)


def mlp_tensors(cfg: ModelConfig, i: int, p: str) -> list:
    """Layer i's MLP: the router, the shared expert and its sigmoid gate, or a dense MLP."""
    H, out = cfg.hidden_size, []
    if cfg.is_moe_layer(i):
        out.append(common.Tensor(("mlp", "gate", "kernel"), p + "mlp.gate.weight", (cfg.num_experts, H), linear=True))
        out += common.mlp_tensors(("mlp", "shared_expert"), p + "mlp.shared_expert.", cfg.shared_expert_size, H)
        out.append(common.Tensor(("mlp", "shared_expert_gate", "kernel"), p + "mlp.shared_expert_gate.weight", (1, H),
                                 linear=True))
    else:
        out += common.mlp_tensors(("mlp",), p + "mlp.", cfg.intermediate_size, H)
    return out


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    return common.expert_tensors(cfg, f"model.layers.{i}.mlp.experts.{e}.")


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"model.layers.{i}.mlp.experts.")
