"""The one decoder (`decoder`, `layers`, `deltanet`), its configuration (`config`), and a small
adapter per model family (`qwen3_moe`, `mixtral`, ...) that the registry lists (`registry`).

Every adapter offers the same small interface, `FamilyAdapter`; nothing outside `models/`
knows which family it reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from dynaexq_jax.models.common import Tensor
    from dynaexq_jax.models.config import ModelConfig


class FamilyAdapter(Protocol):
    """What a model family's adapter module (`models/<family>.py`) offers. `registry.register`
    checks it when the registry lists the module: a member missing, or a second adapter for one
    `MODEL_TYPE`, is an error at import.

    An adapter maps one Hugging Face `model_type` onto the one decoder: config.json's fields to
    a `ModelConfig` (refusing in one line, a `config.ConfigError`, what the decoder cannot run),
    and the name, shape and layout of every checkpoint tensor as `common.Tensor` tables, which
    `io.loader` reads with and `io.hf_export` writes with. Build it on `models.common` (field
    reading, the checks every family gets, Llama-style tensor names) and keep in it only the
    family's own mapping and quirks; the decoder's knobs it sets are `ModelConfig` fields, never
    code paths of its own. Its `config_from_hf` is decorated with `common.adapter(family,
    CONFIG_KEYS)`, its table of the fields its config.json names otherwise, so a value out of
    range (`config.BOUNDS`) is refused naming the key as its checkpoints spell it. A new family:
    write the module, add it to the list in `registry.py`, add its published config.json's keys
    to tests/test_families.py's `READ`, and test it against transformers' own model on a tiny
    checkpoint (tests/test_families.py).

    Optional members, read where they apply: `expert_bias_tensors(cfg, i) -> (gate_up bias,
    down bias)` for a family whose config sets `expert_bias`; `IGNORED_PREFIXES`, checkpoint
    tensor-name prefixes the loader skips (e.g. a multi-token-prediction head).
    """

    MODEL_TYPE: str  # config.json's model_type, unique among the adapters
    # Expert `e` of MoE layer `i`: (gate, up, down) tensors, [out, in] each; None for a family
    # whose checkpoints hold only the fused layout (`fused_expert_tensors`).
    expert_tensors: Callable[[ModelConfig, int, int], tuple[Tensor, Tensor, Tensor]] | None

    def config_from_hf(self, d: dict) -> ModelConfig:
        """config.json's dict -> the decoder's config (`common.checked`), or a ConfigError."""

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        """The config.json fields transformers needs to load a checkpoint of this shape."""

    def top_tensors(self, cfg: ModelConfig) -> list[Tensor]:
        """The tensors outside the decoder layers (embeddings, final norm, LM head)."""

    def layer_tensors(self, cfg: ModelConfig, i: int) -> list[Tensor]:
        """Decoder layer `i`'s non-expert tensors (paths inside the layer's params)."""

    def fused_expert_tensors(self, cfg: ModelConfig, i: int) -> tuple[Tensor, Tensor]:
        """MoE layer `i`'s experts as transformers holds them in memory: gate_up and down."""
