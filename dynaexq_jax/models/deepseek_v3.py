"""DeepSeek-V3 (`model_type: deepseek_v3`, DeepSeek-V3/R1 and models built on its code, e.g.
Kimi K2, Moonlight): config mapping and tensor names.

Quirks: multi-head latent attention (`models.mla`: q through a `q_lora_rank` bottleneck or one
q_proj when it is null, keys and values from a `kv_lora_rank` latent plus one shared rotary key
of `qk_rope_head_dim` dims, the latent cached instead of the heads; rotary dims stored in
interleaved pairs unless `rope_interleave` is false); YaRN RoPE scaling as released, its
mscale also on the softmax scale; the sigmoid router (`models.routing`: `e_score_correction_bias`,
`n_group` / `topk_group` group-limited top-k, `norm_topk_prob`, `routed_scaling_factor`) run in
float32; `n_shared_experts` shared experts (one dense MLP of n x `moe_intermediate_size`, always
resident, planned as a non-expert weight); the first `first_k_dense_replace` layers dense
(`intermediate_size`). The released weights are block-wise FP8 (`weight_scale_inv`), dequantized
on load (`io.loader`). The multi-token-prediction layers after the last decoder layer
(`num_nextn_predict_layers`) are not loaded.
"""

from __future__ import annotations

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ModelConfig, field_value

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"


def ignored_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """The multi-token-prediction layers, numbered on after the decoder's (one in the releases)."""
    return tuple(f"model.layers.{cfg.num_layers + j}." for j in range(cfg.mtp_layers))


# ModelConfig fields of the MoE block under another config.json key (GLM-4.5 spells them alike).
SIGMOID_KEYS = {"num_experts": "n_routed_experts", "mtp_layers": "num_nextn_predict_layers"}
# MLA: the rotary head dim is head_dim (transformers' rule).
CONFIG_KEYS = {**SIGMOID_KEYS, "head_dim": "qk_rope_head_dim"}

# transformers' DeepseekV3Config defaults for the MoE block's fields.
MAX_SHARED = 64  # shared experts per MoE layer (the releases have 1 or 2)
MOE_DEFAULTS = dict(n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, n_shared_experts=1,
                    n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True)


def sigmoid_moe_fields(d: dict, family: str, defaults: dict = MOE_DEFAULTS) -> dict:
    """ModelConfig's MoE fields of DeepSeek-V3's block (GLM-4.5 has the same, with its own
    `defaults`): routed experts chosen by the sigmoid router, n_shared_experts shared ones, dense
    layers before first_k_dense_replace."""
    for field, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if d.get(field, want) != want:
            common.refuse(d, field, f"{family} runs with {field}={want!r}, as released")
    opt = lambda key: common.opt(d, key, defaults[key])
    layers, dense = field_value("num_layers", d["num_hidden_layers"]), opt("first_k_dense_replace")
    shared = opt("n_shared_experts")
    if not isinstance(shared, int) or isinstance(shared, bool) or not 1 <= shared <= MAX_SHARED:
        common.refuse(d, "n_shared_experts", f"{family}'s MoE layers have from 1 to {MAX_SHARED} shared experts")
    if not isinstance(dense, int) or isinstance(dense, bool) or not 0 <= dense <= layers:
        common.refuse(d, "first_k_dense_replace", f"it must be a number of leading dense layers, from 0 to "
                      f"num_hidden_layers={layers}")
    return dict(
        num_experts=opt("n_routed_experts"),
        experts_per_token=opt("num_experts_per_tok"),
        moe_intermediate_size=d["moe_intermediate_size"],
        intermediate_size=d["intermediate_size"],
        norm_topk_prob=opt("norm_topk_prob"),
        mlp_only_layers=tuple(range(dense)),
        shared_expert_size=d["moe_intermediate_size"] * shared,
        router="sigmoid_topk",
        n_group=opt("n_group"),
        topk_group=opt("topk_group"),
        routed_scaling_factor=opt("routed_scaling_factor"),
        mtp_layers=common.opt(d, "num_nextn_predict_layers", 0),
    )


@common.adapter("DeepSeek-V3", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    common.silu_only(d)
    common.fp8_or_none(d, "DeepSeek-V3")
    if d.get("attention_bias"):
        common.refuse(d, "attention_bias", "DeepSeek-V3 has no attention biases; set it to false")
    rope = common.yarn_rope(d, 10000.0, "DeepSeek-V3", 4096)
    fields = common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-6, max_positions=4096)
    # MLA: head_dim is the rotary part (transformers' rule), the heads share one latent
    fields.update(head_dim=d["qk_rope_head_dim"], num_kv_heads=d["num_attention_heads"])
    cfg = ModelConfig(
        **fields,
        **sigmoid_moe_fields(d, "DeepSeek-V3"),
        **rope,
        qk_norm=None,
        q_lora_rank=common.opt(d, "q_lora_rank", 0),
        kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"],
        v_head_dim=d["v_head_dim"],
        rope_interleave=common.opt(d, "rope_interleave", True),
    )
    return common.checked(cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
    return common.hf_config(cfg, ARCHITECTURE, MODEL_TYPE, **sigmoid_moe_config(cfg), **rope_config(cfg),
                            q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.head_dim,
                            v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave, attention_bias=False,
                            hidden_act="silu")


def rope_config(cfg: ModelConfig) -> dict:
    """config.json's rope_parameters: default, or YaRN with everything `rotary_for` and the MLA
    softmax scale read."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope_factor, beta_fast=cfg.rope_beta_fast,
                    beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
                    original_max_position_embeddings=cfg.rope_original_max,
                    attention_factor=cfg.rope_attention_factor, mscale_all_dim=cfg.rope_mscale_all_dim)
    return {"rope_parameters": rope}


def sigmoid_moe_config(cfg: ModelConfig) -> dict:
    """config.json's fields of the MoE block (`sigmoid_moe_fields` read backwards)."""
    return dict(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                first_k_dense_replace=len(cfg.mlp_only_layers),
                n_shared_experts=cfg.shared_expert_size // cfg.moe_intermediate_size, n_group=cfg.n_group,
                topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                num_nextn_predict_layers=cfg.mtp_layers)


top_tensors = common.top_tensors


def attention_tensors(cfg: ModelConfig, p: str) -> list:
    """`self_attn.*` as `models.mla.LatentAttention` names its params."""
    H, NH, R, C = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.kv_lora_rank
    DN, DV, QL = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    a, T = p + "self_attn.", common.Tensor
    lin = lambda name, shape: T(("self_attn", name, "kernel"), f"{a}{name}.weight", shape, linear=True)
    norm = lambda name, size: T(("self_attn", name, "weight"), f"{a}{name}.weight", (size,))
    if QL:
        out = [lin("q_a_proj", (QL, H)), norm("q_a_layernorm", QL), lin("q_b_proj", (NH * (DN + R), QL))]
    else:
        out = [lin("q_proj", (NH * (DN + R), H))]
    return out + [lin("kv_a_proj_with_mqa", (C + R, H)), norm("kv_a_layernorm", C),
                  T(("self_attn", "kv_b_proj", "weight"), a + "kv_b_proj.weight", (NH * (DN + DV), C)),  # as stored
                  lin("o_proj", (H, NH * DV))]


def mlp_tensors(cfg: ModelConfig, i: int, p: str, block: str = "mlp.") -> list:
    """Layer i's MLP: the float32 router and its score-correction bias, the shared experts; or a
    dense MLP."""
    H, E = cfg.hidden_size, cfg.num_experts
    if not cfg.is_moe_layer(i):
        return common.mlp_tensors(("mlp",), p + block, cfg.intermediate_size, H)
    return ([common.Tensor(("mlp", "gate", "kernel"), f"{p}{block}gate.weight", (E, H), linear=True),
             common.Tensor(("mlp", "e_score_correction_bias"), f"{p}{block}gate.e_score_correction_bias", (E,))]
            + common.mlp_tensors(("mlp", "shared_expert"), f"{p}{block}shared_experts.", cfg.shared_expert_size, H))


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"model.layers.{i}."
    return common.norm_tensors(cfg, p) + attention_tensors(cfg, p) + mlp_tensors(cfg, i, p)


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    return common.expert_tensors(cfg, f"model.layers.{i}.mlp.experts.{e}.")


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"model.layers.{i}.mlp.experts.")
