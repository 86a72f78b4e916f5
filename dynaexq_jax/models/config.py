"""Qwen3-MoE model configuration, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dynaexq_jax.errors import UserError


class ConfigError(UserError):
    """A checkpoint's config.json names something this model cannot run."""


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers whose MLP is a sparse MoE block."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3MoeConfig":
        model_type = d.get("model_type")
        if model_type != "qwen3_moe":
            raise ConfigError(
                f"config.json has model_type={model_type!r}; this engine runs 'qwen3_moe' "
                "checkpoints only (e.g. Qwen/Qwen3-30B-A3B)"
            )
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
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
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads", num_heads)),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                num_experts=int(d.get("num_experts", d.get("num_local_experts", 0))),
                experts_per_token=int(d["num_experts_per_tok"]),
                moe_intermediate_size=int(d["moe_intermediate_size"]),
                intermediate_size=int(d.get("intermediate_size", 0)),
                norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r} that Qwen3-MoE needs") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}"
            )
        if cfg.experts_per_token > cfg.num_experts and cfg.moe_layers:
            raise ConfigError(
                f"num_experts_per_tok={cfg.experts_per_token} exceeds num_experts={cfg.num_experts}"
            )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3MoeConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}; point --model at a Hugging Face checkpoint directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict:
        """The config.json fields transformers needs to load a checkpoint of this shape."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "moe_intermediate_size": self.moe_intermediate_size,
            "intermediate_size": self.intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
        }
