"""MiniMax-M2 (`model_type: minimax_m2`, MiniMaxAI/MiniMax-M2): config mapping and tensor names.

Quirks: q and k are RMS-normalised over their whole projections (q_norm [heads * D], k_norm
[kv heads * D]: `qk_norm_type: per_layer` as released), not per head; RoPE on the first
`rotary_dim` of each head's dims (64 of 128 as released; `partial_rotary_factor` in
transformers 5.x); every layer MoE, routed by the float32 sigmoid router (`models.routing`) with
its score-correction bias (`block_sparse_moe.e_score_correction_bias`), no groups and no
shared expert, the top-k weights always renormalised; the experts' intermediate size is
`intermediate_size`, their projections w1 (gate), w3 (up), w2 (down) as in Mixtral. The release
ships block-wise FP8 weights, dequantized on load (`io.loader`).
"""

from __future__ import annotations

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ModelConfig

MODEL_TYPE = "minimax_m2"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size",
               "partial_rotary_factor": lambda d: ("rotary_dim" if d.get("rotary_dim") is not None
                                                   else common.ROPE_KEYS["partial_rotary_factor"](d))}
ARCHITECTURE = "MiniMaxM2ForCausalLM"


def partial_rotary(d: dict, head_dim: int) -> float:
    """transformers' rule: `rotary_dim` (the release's field) / head_dim, else rope_parameters'
    partial_rotary_factor, else all dims."""
    dims = d.get("rotary_dim")
    if dims is not None:
        if not isinstance(dims, int) or isinstance(dims, bool) or not 2 <= dims <= head_dim or dims % 2:
            common.refuse(d, "rotary_dim", f"it must be an even number of the head_dim={head_dim} head dims, 2 or more")
        return dims / head_dim
    _, rope = common.rope_dict(d)
    return common.opt(rope, "partial_rotary_factor", common.opt(d, "partial_rotary_factor", 1.0))


def _check_release_fields(d: dict) -> None:
    """The fields of MiniMax's own config.json that select variants transformers' model does not have."""
    types = d.get("attn_type_list")
    if types is not None and (not isinstance(types, list) or any(t != 1 for t in types)):
        common.refuse(d, "attn_type_list", "MiniMax-M2 runs softmax attention (type 1) on every layer; the "
                      "lightning-attention layers of MiniMax-01 (type 0) are not supported")
    for field, want in (("scoring_func", "sigmoid"), ("qk_norm_type", "per_layer"), ("use_qk_norm", True),
                        ("use_routing_bias", True), ("routed_scaling_factor", 1.0), ("shared_intermediate_size", 0)):
        if d.get(field, want) != want:
            common.refuse(d, field, f"MiniMax-M2 runs with {field}={want!r}, as released")


@common.adapter("MiniMax-M2", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    common.silu_only(d)
    common.fp8_or_none(d, "MiniMax-M2")
    _check_release_fields(d)
    if d.get("sliding_window") is not None:
        common.refuse(d, "sliding_window", "MiniMax-M2 runs with full attention; set it to null")
    fields = common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-6, max_positions=196608, head_dim=128)
    cfg = ModelConfig(
        **fields,
        num_experts=common.opt(d, "num_local_experts", 256),
        experts_per_token=common.opt(d, "num_experts_per_tok", 8),
        moe_intermediate_size=d["intermediate_size"],  # the experts'; MiniMax-M2 has no dense layers
        intermediate_size=d["intermediate_size"],
        norm_topk_prob=True,
        rope_theta=common.rope_theta(d, 5000000.0),
        qk_norm="full",
        router="sigmoid_topk",
        partial_rotary_factor=partial_rotary(d, fields["head_dim"]),
    )
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(
        cfg, ARCHITECTURE, MODEL_TYPE,
        intermediate_size=cfg.moe_intermediate_size,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
        hidden_act="silu",
    )


top_tensors = common.top_tensors


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p, E, H = f"model.layers.{i}.", cfg.num_experts, cfg.hidden_size
    return (common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p)
            + [common.Tensor(("mlp", "gate", "kernel"), p + "block_sparse_moe.gate.weight", (E, H), linear=True),
               common.Tensor(("mlp", "e_score_correction_bias"), p + "block_sparse_moe.e_score_correction_bias",
                             (E,))])


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    return common.expert_tensors(cfg, f"model.layers.{i}.block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"))


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"model.layers.{i}.mlp.experts.")
