"""gpt-oss (`model_type: gpt_oss`, openai/gpt-oss-20b and -120b): config mapping and tensor names.

Quirks: attention sinks (a learned logit per query head in every softmax, `self_attn.sinks`);
sliding-window attention (`sliding_window` keys) on the layers `layer_types` marks
"sliding_attention", full attention on the others; biases on q, k, v, o (`attention_bias`), on
the router (`mlp.router`) and on both expert projections; the router takes the top-k logits
and softmaxes them; the experts' clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`); YaRN RoPE
scaling as released. Every layer is MoE; no q/k norms.

Experts are stored fused, in transformers' layout: `experts.gate_up_proj` [E, H, 2I] with gate
and up columns interleaved (gate at even columns), `experts.down_proj` [E, I, H], both already
[in, out], and their biases `gate_up_proj_bias` [E, 2I] (interleaved too), `down_proj_bias`
[E, H]. The released checkpoints hold the two matrices as MXFP4 (`*_blocks` + `*_scales`,
`quantization_config.quant_method: mxfp4`), which `io.loader` keeps as shipped: an MXFP4
fallback (`--lo-bits mxfp4`) serves those bytes, other tiers get them decoded.
"""

from __future__ import annotations

import dataclasses

from dynaexq_jax.models import common
from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "gpt_oss"
# ModelConfig fields under another config.json key (`common.adapter` names them so in errors).
CONFIG_KEYS = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size",
               "sliding_layers": "layer_types"}
LAYER_TYPES = ("sliding_attention", "full_attention")


def _check_quantization(d: dict) -> None:
    """No quantization, or MXFP4 (the release's experts, decoded by the loader)."""
    q = d.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method != "mxfp4":
        raise ConfigError(f"config.json has quantization_config with quant_method={method!r}, which is not "
                          "supported for gpt-oss: use the model's MXFP4 release (quant_method 'mxfp4') or a "
                          "bf16 one (no quantization_config)")


def _sliding_layers(d: dict, num_layers: int) -> tuple[int, ...]:
    """Indices of the sliding-window layers; transformers' default alternates, sliding first."""
    types = d.get("layer_types")
    if types is None:
        return tuple(range(0, num_layers, 2))
    if not (isinstance(types, list) and len(types) == num_layers and all(t in LAYER_TYPES for t in types)):
        common.refuse(d, "layer_types", f"it must list {' or '.join(map(repr, LAYER_TYPES))} for each of the "
                      f"num_hidden_layers={num_layers} layers")
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


@common.adapter("gpt-oss", CONFIG_KEYS)
def config_from_hf(d: dict) -> ModelConfig:
    common.check_model_type(d, MODEL_TYPE)
    _check_quantization(d)
    bias = common.opt(d, "attention_bias", True)
    layers = d["num_hidden_layers"]
    sliding = _sliding_layers(d, layers) if isinstance(layers, int) else ()
    cfg = ModelConfig(
        # head_dim 64: transformers' default, not hidden / heads
        **common.hf_fields(d, MODEL_TYPE, rms_norm_eps=1e-5, max_positions=131072, head_dim=64),
        num_experts=common.opt(d, "num_local_experts", 128),
        experts_per_token=common.opt(d, "num_experts_per_tok", 4),
        moe_intermediate_size=d["intermediate_size"],  # the experts'; gpt-oss has no dense layers
        intermediate_size=d["intermediate_size"],
        norm_topk_prob=False,
        qk_norm=None,
        qkv_bias=bias,
        o_bias=bias,
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
        expert_activation="clamped_swiglu",
        swiglu_alpha=common.opt(d, "swiglu_alpha", 1.702),
        swiglu_limit=common.opt(d, "swiglu_limit", 7.0),
        attention_sinks=True,
        sliding_window=common.opt(d, "sliding_window", 128) if sliding else None,
        sliding_layers=sliding,
    )
    return common.checked(dataclasses.replace(cfg, **common.yarn_rope(d, 150000.0, "gpt-oss", 131072)))


def config_to_hf(cfg: ModelConfig) -> dict:
    out = common.hf_config(
        cfg, "GptOssForCausalLM", MODEL_TYPE,
        intermediate_size=cfg.moe_intermediate_size,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts,
        attention_bias=cfg.qkv_bias,
        swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        layer_types=["sliding_attention" if i in cfg.sliding_layers else "full_attention"
                     for i in range(cfg.num_layers)],
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if cfg.rope_scaling == "yarn":
        out["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow, "truncate": cfg.rope_truncate,
            "original_max_position_embeddings": cfg.rope_original_max,
            "attention_factor": cfg.rope_attention_factor,
        }
    return out


top_tensors = common.top_tensors


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    H, E, p = cfg.hidden_size, cfg.num_experts, f"model.layers.{i}."
    return (common.norm_tensors(cfg, p) + common.attention_tensors(cfg, p)
            + [common.Tensor(("self_attn", "sinks"), p + "self_attn.sinks", (cfg.num_heads,)),
               common.Tensor(("mlp", "gate", "kernel"), p + "mlp.router.weight", (E, H), linear=True),
               common.Tensor(("mlp", "gate", "bias"), p + "mlp.router.bias", (E,))])


expert_tensors = None  # no per-expert tensors: checkpoints hold the fused layout only


def fused_expert_tensors(cfg: ModelConfig, i: int):
    """gate_up_proj [E, H, 2I] (gate|up interleaved) and down_proj [E, I, H], both [in, out]."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    p = f"model.layers.{i}.mlp.experts."
    return (common.Tensor((), p + "gate_up_proj", (E, H, 2 * I), interleaved=True),
            common.Tensor((), p + "down_proj", (E, I, H)))


def expert_bias_tensors(cfg: ModelConfig, i: int):
    """gate_up_proj_bias [E, 2I] (interleaved like its matrix) and down_proj_bias [E, H]."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    p = f"model.layers.{i}.mlp.experts."
    return (common.Tensor((), p + "gate_up_proj_bias", (E, 2 * I), interleaved=True),
            common.Tensor((), p + "down_proj_bias", (E, H)))
