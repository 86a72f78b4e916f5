"""`model_type` -> family adapter: the one place that lists the supported families, and the
front door from a `config.json` to a `ModelConfig` (`read_config`).

It sits above the adapters: they import `config` and `common`, never this module, and
`config` imports neither.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from dynaexq_jax import inputs
from dynaexq_jax.models import (
    FamilyAdapter,
    deepseek_v3,
    glm4_moe,
    gpt_oss,
    minimax_m2,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from dynaexq_jax.models.config import ConfigError, ModelConfig

# The members every adapter must define: `FamilyAdapter`'s attributes and methods.
MEMBERS = tuple(FamilyAdapter.__annotations__) + tuple(
    name for name, value in vars(FamilyAdapter).items() if callable(value) and not name.startswith("_"))


def register(*adapters: ModuleType) -> dict[str, FamilyAdapter]:
    """{MODEL_TYPE: adapter}, each checked against `FamilyAdapter`: a missing member or a second
    adapter for one model_type is a TypeError naming it (a programming error, found at import)."""
    out: dict[str, FamilyAdapter] = {}
    for adapter in adapters:
        missing = [m for m in MEMBERS if not hasattr(adapter, m)]
        if missing:
            raise TypeError(f"family adapter {adapter.__name__} lacks {', '.join(missing)} (see models.FamilyAdapter)")
        not_callable = [m for m in MEMBERS
                        if m not in FamilyAdapter.__annotations__ and not callable(getattr(adapter, m))]
        if not_callable or not isinstance(adapter.MODEL_TYPE, str):
            raise TypeError(f"family adapter {adapter.__name__}: {', '.join(not_callable) or 'MODEL_TYPE'} is not "
                            "what models.FamilyAdapter says")
        for model_type in getattr(adapter, "MODEL_TYPES", (adapter.MODEL_TYPE,)):  # one family, several layouts
            if model_type in out:
                raise TypeError(f"two family adapters for model_type {model_type!r}: "
                                f"{out[model_type].__name__} and {adapter.__name__}")
            out[model_type] = adapter
    return out


ADAPTERS = register(qwen3_moe, mixtral, olmoe, qwen2_moe, phimoe, gpt_oss, qwen3_next, deepseek_v3, glm4_moe,
                    minimax_m2, qwen3_5_moe)


def adapter_for(hf_config: dict) -> FamilyAdapter:
    """The adapter module for a `config.json` dict, or a one-line error naming what is supported."""
    model_type = hf_config.get("model_type")
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"config.json has model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))} "
            "(e.g. Qwen/Qwen3-30B-A3B, mistralai/Mixtral-8x7B-v0.1)"
        )
    return ADAPTERS[model_type]


def adapter(cfg: ModelConfig) -> FamilyAdapter:
    """The adapter of a `ModelConfig`."""
    return ADAPTERS[cfg.model_type]


def read_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a checkpoint directory holding one) through its family's adapter."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}; point --model at a Hugging Face checkpoint directory")
    d = inputs.read_json(path, "restore it from the model's original release", error=ConfigError)
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object of config fields")
    return adapter_for(d).config_from_hf(d)
