"""Qwen3.5-MoE (`model_type: qwen3_5_moe`, e.g. Qwen/Qwen3.5-35B-A3B): config mapping and tensor
names, for text prompts.

Published as a vision-language checkpoint (`Qwen3_5MoeForConditionalGeneration`): the text
model's config is `text_config`, its tensors sit under `model.language_model.`, and the vision
tower's (`model.visual.*`) are not loaded: prompts are text only. A text-only checkpoint as
transformers' `Qwen3_5MoeForCausalLM` saves it (`model_type: qwen3_5_moe_text`, tensors under
`model.`) loads too; each exports in its own layout.

The text model is Qwen3-Next's (`models.qwen3_next`: gated DeltaNet and gated softmax attention
layers from `layer_types`, zero-centred norms, partial RoPE, a gated shared expert), with the
DeltaNet's input projections stored apart: `in_proj_qkv` (q and k of every key head, then v,
the convolution's channels in order), `in_proj_z`, `in_proj_b`, `in_proj_a` (per value head),
read side by side as one projection ("split"). Its RoPE is multimodal (`mrope_section`: the
rotary frequencies split between temporal, height and width positions, interleaved); for text
every section's position is the token's, so it is the plain RoPE of those positions. The
multi-token-prediction head (`mtp.*`) is not loaded.
"""

from __future__ import annotations

import dataclasses

from dynaexq_jax.models import common, qwen2_moe, qwen3_next
from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "qwen3_5_moe"  # the published vision-language checkpoint
TEXT_MODEL_TYPE = "qwen3_5_moe_text"  # a text-only checkpoint
MODEL_TYPES = (MODEL_TYPE, TEXT_MODEL_TYPE)


def prefix(cfg: ModelConfig) -> str:
    """Where the text model's tensors are: under the vision-language model's language_model, or not."""
    return "model.language_model." if cfg.model_type == MODEL_TYPE else "model."


def ignored_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """The multi-token-prediction head, and the vision tower of a vision-language checkpoint."""
    return ("mtp.", "model.visual.") if cfg.model_type == MODEL_TYPE else ("mtp.",)


def text_config(d: dict) -> dict:
    """The text model's config.json fields: `text_config` of a vision-language config (with the
    top level's tie_word_embeddings, which transformers ties by), else the config itself."""
    if d.get("model_type") != MODEL_TYPE:
        return d
    t = d.get("text_config")
    if not isinstance(t, dict):
        raise ConfigError(f"config.json has text_config={t!r}, but a {MODEL_TYPE} config must hold its text model's "
                          "fields there; restore it from the model's release")
    tie = common.opt(d, "tie_word_embeddings", common.opt(t, "tie_word_embeddings", False))
    return {**t, "tie_word_embeddings": tie}


def config_keys(d: dict) -> dict[str, str]:
    """Every field's config.json key: Qwen3-Next's, inside `text_config` when the config has one."""
    t = d.get("text_config") if d.get("model_type") == MODEL_TYPE else None
    if not isinstance(t, dict):
        return common.config_keys(d, qwen3_next.CONFIG_KEYS)
    return {f: "text_config." + k for f, k in common.config_keys(t, qwen3_next.CONFIG_KEYS).items()}


@common.adapter("Qwen3.5-MoE", config_keys)
def config_from_hf(d: dict) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        common.check_model_type(d, MODEL_TYPE)
    common.fp8_or_none(d, "Qwen3.5-MoE")
    t = text_config(d)
    if t.get("attn_output_gate", True) is not True:
        common.refuse(t, "attn_output_gate", "Qwen3.5's softmax attention always gates its output")
    cfg = qwen3_next.text_model_config({**t, "model_type": model_type}, model_type)
    cfg = dataclasses.replace(cfg, linear_projection="split")
    _, rope = common.rope_dict(t)
    section = rope.get("mrope_section")
    if section is not None and not (isinstance(section, list) and len(section) == 3
                                    and all(isinstance(s, int) and s >= 0 for s in section)
                                    and sum(section) == cfg.rotary_dim // 2):
        raise ConfigError(f"config.json's rope_parameters has mrope_section={section!r}, but it must split the "
                          f"{cfg.rotary_dim // 2} rotary frequencies in three; restore it from the model's release")
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    text = qwen3_next.config_to_hf(cfg)
    text.update(model_type=TEXT_MODEL_TYPE, architectures=["Qwen3_5MoeForCausalLM"])
    for field in ("intermediate_size", "mlp_only_layers", "decoder_sparse_step"):  # every layer is MoE
        text.pop(field)
    if cfg.model_type == TEXT_MODEL_TYPE:
        return text
    del text["architectures"]
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": MODEL_TYPE, "text_config": text,
            "tie_word_embeddings": cfg.tie_word_embeddings}


def top_tensors(cfg: ModelConfig) -> list:
    """The text model's embeddings and final norm under its prefix; the LM head at the top level."""
    p, out = prefix(cfg), []
    for t in common.top_tensors(cfg):
        name = t.name if t.name.startswith("lm_head.") else p + t.name[len("model."):]
        out.append(dataclasses.replace(t, name=name))
    return out


def linear_attention_tensors(cfg: ModelConfig, p: str) -> list:
    """`linear_attn.*`: in_proj_qkv, in_proj_z, in_proj_b and in_proj_a into one projection (one
    read of x), the rest as Qwen3-Next stores it."""
    H, NK, NV = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    DK, DV = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    a, T, path = p + "linear_attn.", common.Tensor, ("linear_attn", "in_proj", "kernel")
    widths = (("qkv", 2 * NK * DK + NV * DV), ("z", NV * DV), ("b", NV), ("a", NV))
    out, start = [], 0
    for name, width in widths:
        out.append(T(path, f"{a}in_proj_{name}.weight", (width, H), linear=True, cols=(start, start + width)))
        start += width
    rest = [t for t in qwen3_next.linear_attention_tensors(cfg, p) if t.path != path]
    return out + rest


def layer_tensors(cfg: ModelConfig, i: int) -> list:
    p = f"{prefix(cfg)}layers.{i}."
    out = common.norm_tensors(cfg, p)
    out += linear_attention_tensors(cfg, p) if i in cfg.linear_layers else common.attention_tensors(cfg, p)
    return out + qwen2_moe.mlp_tensors(cfg, i, p)


def expert_tensors(cfg: ModelConfig, i: int, e: int):
    return common.expert_tensors(cfg, f"{prefix(cfg)}layers.{i}.mlp.experts.{e}.")


def fused_expert_tensors(cfg: ModelConfig, i: int):
    return common.fused_expert_tensors(cfg, f"{prefix(cfg)}layers.{i}.mlp.experts.")
