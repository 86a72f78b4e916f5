"""`model_type` -> family adapter: the one place that lists the supported families."""

from __future__ import annotations

from types import ModuleType

from dynaexq_jax.models import (deepseek_v3, glm4_moe, gpt_oss, minimax_m2, mixtral, olmoe, phimoe, qwen2_moe, qwen3_5_moe,
                                qwen3_moe, qwen3_next)
from dynaexq_jax.models.config import ConfigError

# An adapter serves its MODEL_TYPE, or each of its MODEL_TYPES (checkpoint layouts of one family).
ADAPTERS: dict[str, ModuleType] = {t: m for m in (qwen3_moe, mixtral, olmoe, qwen2_moe, phimoe, gpt_oss, qwen3_next,
                                                  deepseek_v3, glm4_moe, minimax_m2, qwen3_5_moe)
                                   for t in getattr(m, "MODEL_TYPES", (m.MODEL_TYPE,))}


def adapter_for(hf_config: dict) -> ModuleType:
    """The adapter module for a `config.json` dict, or a one-line error naming what is supported."""
    model_type = hf_config.get("model_type")
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"config.json has model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))} "
            "(e.g. Qwen/Qwen3-30B-A3B, mistralai/Mixtral-8x7B-v0.1)"
        )
    return ADAPTERS[model_type]


def adapter(cfg) -> ModuleType:
    """The adapter of a `ModelConfig`."""
    return ADAPTERS[cfg.model_type]
