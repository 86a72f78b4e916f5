"""Qwen3-MoE (`model_type: qwen3_moe`): config mapping and checkpoint tensor names.

Everything family-specific lives here: which `config.json` fields map to `ModelConfig`, which
are refused, and the name, shape and layout of every tensor in a Hugging Face checkpoint. The
tables serve both directions (`io.loader` reads with them, `io.hf_export` writes with them).
"""

from __future__ import annotations

import dataclasses

from dynaexq_jax.models.config import ConfigError, ModelConfig

MODEL_TYPE = "qwen3_moe"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: where it goes in our params, its name and shape in the file.

    `linear`: stored [..., out, in] by HF, kept [..., in, out] (a Flax kernel) by us. `cols`:
    the range of the parameter's last axis this tensor fills, where we fuse several into one
    (q, k and v into one projection, read once per step). `interleaved`: the last axis
    alternates gate and up columns (gpt-oss), kept as all gate columns, then all up."""

    path: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    linear: bool = False
    cols: tuple[int, int] | None = None
    interleaved: bool = False


def _opt(d: dict, key: str, default):
    """A field that may be absent or null: transformers then takes its default."""
    value = d.get(key)
    return default if value is None else value


def config_from_hf(d: dict) -> ModelConfig:
    """config.json's fields as they are; `ModelConfig` checks their types and ranges."""
    if d.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"config.json has model_type={d.get('model_type')!r}, not {MODEL_TYPE!r}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json has rope_scaling={rope!r}, but it must be an object or null; "
                          "remove 'rope_scaling' to run at the model's native context")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"config.json asks for rope scaling {rope_type!r}, which is not supported; "
            "remove 'rope_scaling' to run at the model's native context"
        )
    if d.get("use_sliding_window"):
        raise ConfigError(
            "config.json sets use_sliding_window=true, which is not supported; "
            "set it to false (Qwen3-MoE checkpoints ship with it off)"
        )
    if d.get("attention_bias"):
        raise ConfigError("config.json sets attention_bias=true, which Qwen3-MoE does not use; set it to false")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json has hidden_act={d['hidden_act']!r}; only 'silu' is supported")
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=_opt(d, "num_key_value_heads", d["num_attention_heads"]),
            head_dim=d.get("head_dim"),
            num_experts=_opt(d, "num_experts", _opt(d, "num_local_experts", 0)),
            experts_per_token=d["num_experts_per_tok"],
            moe_intermediate_size=d["moe_intermediate_size"],
            intermediate_size=_opt(d, "intermediate_size", 0),
            norm_topk_prob=_opt(d, "norm_topk_prob", True),
            decoder_sparse_step=_opt(d, "decoder_sparse_step", 1),
            mlp_only_layers=_opt(d, "mlp_only_layers", ()),
            rms_norm_eps=_opt(d, "rms_norm_eps", 1e-6),
            rope_theta=_opt(rope, "rope_theta", _opt(d, "rope_theta", 10000.0)),
            tie_word_embeddings=_opt(d, "tie_word_embeddings", False),
            max_position_embeddings=_opt(d, "max_position_embeddings", 40960),
            model_type=MODEL_TYPE,
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks the field {e.args[0]!r} that Qwen3-MoE needs") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json fields transformers needs to load a checkpoint of this shape."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "intermediate_size": cfg.intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": cfg.decoder_sparse_step,
        "mlp_only_layers": list(cfg.mlp_only_layers),
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
    }


def top_tensors(cfg: ModelConfig) -> list[Tensor]:
    """Tensors outside the decoder layers."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = [Tensor(("embed_tokens", "embedding"), "model.embed_tokens.weight", (V, H)),
           Tensor(("norm", "weight"), "model.norm.weight", (H,))]
    if not cfg.tie_word_embeddings:
        out.append(Tensor(("lm_head", "kernel"), "lm_head.weight", (V, H), linear=True))
    return out


def layer_tensors(cfg: ModelConfig, i: int) -> list[Tensor]:
    """Non-expert tensors of decoder layer `i`; paths are inside the layer's params."""
    H, D = cfg.hidden_size, cfg.head_dim
    p = f"model.layers.{i}."
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    qkv = ("self_attn", "qkv_proj", "kernel")
    out = [
        Tensor(("input_layernorm", "weight"), p + "input_layernorm.weight", (H,)),
        Tensor(("post_attention_layernorm", "weight"), p + "post_attention_layernorm.weight", (H,)),
        Tensor(qkv, p + "self_attn.q_proj.weight", (q, H), linear=True, cols=(0, q)),
        Tensor(qkv, p + "self_attn.k_proj.weight", (kv, H), linear=True, cols=(q, q + kv)),
        Tensor(qkv, p + "self_attn.v_proj.weight", (kv, H), linear=True, cols=(q + kv, q + 2 * kv)),
        Tensor(("self_attn", "o_proj", "kernel"), p + "self_attn.o_proj.weight", (H, q), linear=True),
        Tensor(("self_attn", "qk_norm", "weight"), p + "self_attn.q_norm.weight", (D,), cols=(0, D)),
        Tensor(("self_attn", "qk_norm", "weight"), p + "self_attn.k_norm.weight", (D,), cols=(D, 2 * D)),
    ]
    if cfg.is_moe_layer(i):
        out.append(Tensor(("mlp", "gate", "kernel"), p + "mlp.gate.weight", (cfg.num_experts, H), linear=True))
    else:
        F = cfg.intermediate_size
        out += [
            Tensor(("mlp", "gate_proj", "kernel"), p + "mlp.gate_proj.weight", (F, H), linear=True),
            Tensor(("mlp", "up_proj", "kernel"), p + "mlp.up_proj.weight", (F, H), linear=True),
            Tensor(("mlp", "down_proj", "kernel"), p + "mlp.down_proj.weight", (H, F), linear=True),
        ]
    return out


def expert_tensors(cfg: ModelConfig, i: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
    """Expert `e` of MoE layer `i`: gate, up and down projections ([out, in] each)."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    q = f"model.layers.{i}.mlp.experts.{e}."
    return (Tensor((), q + "gate_proj.weight", (I, H), linear=True),
            Tensor((), q + "up_proj.weight", (I, H), linear=True),
            Tensor((), q + "down_proj.weight", (H, I), linear=True))


def fused_expert_tensors(cfg: ModelConfig, i: int) -> tuple[Tensor, Tensor]:
    """transformers' in-memory layout of a layer's experts, when saved unconverted:
    gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    p = f"model.layers.{i}.mlp.experts."
    return (Tensor((), p + "gate_up_proj", (E, 2 * I, H), linear=True),
            Tensor((), p + "down_proj", (E, H, I), linear=True))
