"""The decoder's configuration, read from a Hugging Face `config.json` through a family adapter.

`ModelConfig` is what the one decoder needs to know; each family's adapter (see `registry`)
maps its `config.json` fields onto it and rejects what the decoder cannot run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dynaexq_jax.errors import UserError


class ConfigError(UserError):
    """A checkpoint's config.json names something this model cannot run."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of consecutive decoder layers of one kind, computed by one `lax.scan`."""

    kind: str  # "moe" or "dense"
    first: int  # index of its first decoder layer
    count: int
    first_moe: int  # index of its first layer among the MoE layers (moe segments)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
    model_type: str = "qwen3_moe"

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

    @property
    def segments(self) -> tuple[Segment, ...]:
        """Maximal runs of layers of one kind, in order. Each run is one scan in the step, so
        a 48-layer model compiles its layer once."""
        out, moe_seen = [], 0
        for i in range(self.num_layers):
            kind = "moe" if self.is_moe_layer(i) else "dense"
            if out and out[-1].kind == kind:
                out[-1] = dataclasses.replace(out[-1], count=out[-1].count + 1)
            else:
                out.append(Segment(kind, i, 1, moe_seen))
            moe_seen += kind == "moe"
        return tuple(out)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` (or a checkpoint directory holding one) through its family's adapter."""
        from dynaexq_jax.models import registry

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}; point --model at a Hugging Face checkpoint directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object of config fields")
        return registry.adapter_for(d).config_from_hf(d)
