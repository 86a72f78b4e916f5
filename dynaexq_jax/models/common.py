"""What the family adapters share: the `Tensor` of their tables, reading config fields into
`ModelConfig`, the checks every family gets, and the tensor names of the Llama-style decoder
most families keep (embeddings, norms, q/k/v/o, dense MLPs). A family's adapter keeps only its
own mapping and quirks (`models.FamilyAdapter`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from dynaexq_jax.models.config import (
    FLOAT32_MAX,
    KEYS,
    ConfigError,
    FieldError,
    ModelConfig,
    field_value,
    yarn_mscale,
)

QK_NORMS = ("per_head", "full", None)


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


def check_model_type(d: dict, model_type: str) -> None:
    if d.get("model_type") != model_type:
        raise ConfigError(f"config.json has model_type={d.get('model_type')!r}, not {model_type!r}")


def refuse(d: dict, field: str, why: str) -> None:
    """A one-line ConfigError for a field set to something this model cannot run."""
    raise ConfigError(f"config.json sets {field}={d.get(field)!r}, which is not supported: {why}")


def rope_theta(d: dict, default: float) -> float:
    """RoPE base frequency; any rope scaling type but the default is refused (naming the field)."""
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = d.get(field) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json has {field}={rope!r}, but it must be an object or null; "
                          f"remove {field!r} to run at the model's native context")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"config.json asks for rope scaling {rope_type!r} in {field!r}, which is not supported; "
            f"remove {field!r} to run at the model's native context"
        )
    return opt(rope, "rope_theta", opt(d, "rope_theta", default))


def rope_dict(d: dict) -> tuple[str, dict]:
    """(the field config.json names its RoPE settings in, those settings): `rope_parameters`
    (transformers 5.x) or `rope_scaling` (the releases), {} when neither is set."""
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = d.get(field) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json has {field}={rope!r}, but it must be an object or null")
    return field, rope


def yarn_rope(d: dict, default_theta: float, family: str, max_positions: int) -> dict:
    """ModelConfig's RoPE fields from `rope_parameters` / `rope_scaling`: default or "yarn" (as
    transformers computes it; `max_positions` is the family's default context, for a yarn
    without `factor`). Any other scaling type is a one-line error naming the field."""
    field, rope = rope_dict(d)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out = dict(rope_theta=opt(rope, "rope_theta", opt(d, "rope_theta", default_theta)))
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        raise ConfigError(f"config.json asks for rope scaling {rope_type!r} in {field!r}, which is not supported "
                          f"for {family} (only 'yarn'); remove {field!r} to run at the model's native context")
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"config.json's {field} (yarn) lacks 'original_max_position_embeddings'")
    original = field_value("rope_original_max", original)
    if original < 1:
        raise FieldError("rope_original_max", original, "at least 1 under YaRN")
    factor = rope.get("factor")
    if factor is None:  # transformers' fallback: the context's growth over the original one
        factor = field_value("max_position_embeddings", opt(d, "max_position_embeddings", max_positions)) / original
    factor = field_value("rope_factor", factor)
    # transformers' rule: `attention_factor` if given, else the temperature of `factor`, as a
    # ratio mscale / mscale_all_dim when both are given.
    attention = rope.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale_all_dim is not None:
            mscale_all_dim = field_value("rope_mscale_all_dim", mscale_all_dim)
        if mscale is not None and not (isinstance(mscale, (int, float)) and not isinstance(mscale, bool)
                                       and 0 <= mscale <= FLOAT32_MAX):
            raise ConfigError(f"config.json has {field}.mscale={mscale!r}, but it must be a number from 0 to "
                              f"{FLOAT32_MAX}; correct it in config.json (the model's original release has the right "
                              "value)")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else yarn_mscale(factor))
    return dict(out, rope_scaling="yarn", rope_original_max=original, rope_factor=factor,
                rope_beta_fast=_or(rope.get("beta_fast"), 32.0), rope_beta_slow=_or(rope.get("beta_slow"), 1.0),
                rope_truncate=opt(rope, "truncate", True), rope_attention_factor=attention,
                rope_mscale_all_dim=opt(rope, "mscale_all_dim", 0.0))


def _or(value, default):
    """transformers' `value or default` for a number: null and 0 mean the default (false is no number)."""
    return default if value is None or (value == 0 and not isinstance(value, bool)) else value


def fp8_or_none(d: dict, family: str) -> None:
    """No quantization_config, or block-wise FP8 as DeepSeek-V3 and MiniMax-M2 ship (F8_E4M3
    weights with float32 `weight_scale_inv` per block; `io.loader` dequantizes them on load).
    Anything else is a one-line error naming the field."""
    q = d.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method != "fp8":
        raise ConfigError(f"config.json has quantization_config with quant_method={method!r}, which is not supported "
                          f"for {family}: use its block-wise FP8 release (quant_method 'fp8', dequantized on load) or "
                          "a bf16 checkpoint (no quantization_config)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config.json's quantization_config has weight_block_size={block!r}; FP8 weights are read "
                          "with one scale per block, e.g. [128, 128] as released (per-tensor FP8 is not supported)")
    if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
        raise ConfigError(f"config.json's quantization_config has fmt={q.get('fmt')!r}; only e4m3 FP8 weights "
                          "(F8_E4M3, as released) are supported")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"config.json's quantization_config has activation_scheme={q.get('activation_scheme')!r}; "
                          "only 'dynamic' (weights-only scales, as released) is supported")


def silu_only(d: dict, field: str = "hidden_act") -> None:
    if d.get(field, "silu") != "silu":
        raise ConfigError(f"config.json has {field}={d[field]!r}; only 'silu' is supported")


def opt(d: dict, key: str, default):
    """A field that may be absent or null: transformers then takes its default. Values pass as
    they are: `ModelConfig` checks every field's type and range."""
    value = d.get(key)
    return default if value is None else value


# ----------------------------------------------------------------------------- config.json keys

# A field's config.json key: a name, or a function of the config dict for a key that lives in
# one of several places (RoPE settings in `rope_parameters` or `rope_scaling`).
Key = str | Callable[[dict], str]


def _rope_field(d: dict) -> str:
    return "rope_parameters" if d.get("rope_parameters") else "rope_scaling"


def rope_key(name: str, top_level: str | None = None) -> Callable[[dict], str]:
    """The key of RoPE setting `name` inside `rope_parameters` / `rope_scaling`; `top_level`: the
    key the setting has outside them, used when the RoPE object does not hold it."""
    def key(d: dict) -> str:
        rope = d.get(_rope_field(d))
        if top_level is not None and not (isinstance(rope, dict) and rope.get(name) is not None):
            return top_level
        return f"{_rope_field(d)}.{name}"
    return key


def first_key(*names: str) -> Callable[[dict], str]:
    """The first of `names` config.json sets (a field read from whichever is given)."""
    return lambda d: next((n for n in names if d.get(n) is not None), names[0])


# The RoPE fields, as every family keeps them (a family's table adds its own keys).
ROPE_KEYS: dict[str, Key] = {
    "rope_theta": rope_key("rope_theta", "rope_theta"), "rope_factor": rope_key("factor"),
    "rope_beta_fast": rope_key("beta_fast"), "rope_beta_slow": rope_key("beta_slow"),
    "rope_original_max": rope_key("original_max_position_embeddings", "original_max_position_embeddings"),
    "rope_attention_factor": rope_key("attention_factor"), "rope_mscale_all_dim": rope_key("mscale_all_dim"),
    "rope_truncate": rope_key("truncate"), "rope_short_factor": rope_key("short_factor"),
    "rope_long_factor": rope_key("long_factor"), "rope_short_mscale": rope_key("short_mscale"),
    "rope_long_mscale": rope_key("long_mscale"),
    "partial_rotary_factor": rope_key("partial_rotary_factor", "partial_rotary_factor"),
}


def config_keys(d: dict, table: dict[str, Key]) -> dict[str, str]:
    """{field: its config.json key in `d`} for every field of `table`, the RoPE fields and `KEYS`."""
    merged = {**KEYS, **ROPE_KEYS, **table}
    return {f: k(d) if callable(k) else k for f, k in merged.items()}


def lookup(d: dict, key: str):
    """The value at a dotted key (`rope_scaling.factor`) of `d`, or None."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def adapter(family: str, keys: dict[str, Key] | Callable[[dict], dict[str, str]] | None = None):
    """Decorate a family adapter's `config_from_hf(d)`: a required field config.json lacks, or a
    field of the wrong type or out of range (`config.FieldError`), is one ConfigError naming the
    config.json key as this family's checkpoints spell it. `keys`: {ModelConfig field: key} where
    the family's key differs from the field's name and from `KEYS`, or a function of `d` giving
    every field's key (a family that reads another's fields from a nested object)."""
    def wrap(fn):
        @functools.wraps(fn)
        def config_from_hf(d: dict, *args, **kwargs) -> ModelConfig:
            try:
                return fn(d, *args, **kwargs)
            except KeyError as e:
                raise ConfigError(f"config.json lacks the field {e.args[0]!r} that {family} needs") from None
            except FieldError as e:
                names = keys(d) if callable(keys) else config_keys(d, keys or {})
                key = lambda field: names.get(field, field)  # noqa: E731
                raise ConfigError(e.render(key, lookup(d, key(e.field)))) from None
        return config_from_hf
    return wrap


def checked(cfg: ModelConfig) -> ModelConfig:
    """The decoder runs what the adapter chose (`ModelConfig` itself checks config.json's values)."""
    if cfg.qk_norm not in QK_NORMS:
        raise ConfigError(f"qk_norm={cfg.qk_norm!r} is not one of {QK_NORMS}")
    from dynaexq_jax.models.layers import EXPERT_ACTIVATIONS, NORMS, ROPE_SCALINGS, ROUTERS

    if cfg.router not in ROUTERS:
        raise ConfigError(f"router={cfg.router!r} is not one of {ROUTERS}")
    if cfg.expert_activation not in EXPERT_ACTIVATIONS:
        raise ConfigError(f"expert_activation={cfg.expert_activation!r} is not one of {EXPERT_ACTIVATIONS}")
    if cfg.norm not in NORMS:
        raise ConfigError(f"norm={cfg.norm!r} is not one of {NORMS}")
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ConfigError(f"rope_scaling={cfg.rope_scaling!r} is not one of {ROPE_SCALINGS}")
    if cfg.lm_head_bias and cfg.tie_word_embeddings:
        raise ConfigError("config.json sets lm_head_bias with tie_word_embeddings, which is not supported; "
                          "untie the embeddings or drop the bias")
    return cfg


# ----------------------------------------------------------------------------- tensor names


def hf_fields(d: dict, model_type: str, *, rms_norm_eps: float, max_positions: int, head_dim=None) -> dict:
    """`ModelConfig` fields every family reads alike from config.json, each checked (`config.field_value`),
    with the family's defaults where transformers' differ (a missing required field is a KeyError,
    which `adapter` reports)."""
    read = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=opt(d, "num_key_value_heads", d["num_attention_heads"]),
        head_dim=opt(d, "head_dim", head_dim),
        rms_norm_eps=opt(d, "rms_norm_eps", rms_norm_eps),
        tie_word_embeddings=opt(d, "tie_word_embeddings", False),
        max_position_embeddings=opt(d, "max_position_embeddings", max_positions),
    )
    # Checked now: adapters compute with them (layer patterns, rotary dims) before the config is built.
    return dict({f: field_value(f, v) for f, v in read.items()}, model_type=model_type)


def hf_config(cfg: ModelConfig, architecture: str, model_type: str, **family) -> dict:
    """config.json for transformers: the fields every family names alike, plus `family`'s own."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "num_experts_per_tok": cfg.experts_per_token,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        **family,
    }


def top_tensors(cfg: ModelConfig) -> list[Tensor]:
    """Embeddings, final norm and LM head (absent when tied), as Llama-style checkpoints name them."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = [Tensor(("embed_tokens", "embedding"), "model.embed_tokens.weight", (V, H))]
    out += _norm(cfg, "norm", "model.norm.")
    if not cfg.tie_word_embeddings:
        out.append(Tensor(("lm_head", "kernel"), "lm_head.weight", (V, H), linear=True))
        if cfg.lm_head_bias:
            out.append(Tensor(("lm_head", "bias"), "lm_head.bias", (V,)))
    return out


def _norm(cfg: ModelConfig, path: str, prefix: str) -> list[Tensor]:
    """A norm's weight, and its bias if it is a LayerNorm."""
    H = cfg.hidden_size
    out = [Tensor((path, "weight"), prefix + "weight", (H,))]
    if cfg.norm == "layer":
        out.append(Tensor((path, "bias"), prefix + "bias", (H,)))
    return out


def norm_tensors(cfg: ModelConfig, p: str) -> list[Tensor]:
    """The layer's two norms."""
    return (_norm(cfg, "input_layernorm", p + "input_layernorm.")
            + _norm(cfg, "post_attention_layernorm", p + "post_attention_layernorm."))


def attention_tensors(cfg: ModelConfig, p: str) -> list[Tensor]:
    """`self_attn.{q,k,v,o}_proj` (biases where the config has them) into the fused qkv_proj,
    and `self_attn.{q,k}_norm` into the fused qk_norm: per head ([D] each) or over the whole
    projection ([heads * D] each), whichever `cfg.qk_norm` says."""
    H, D = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    qg = 2 * q if cfg.attn_output_gate else q  # gated (Qwen3-Next): q_proj emits each head's q, then its gate
    a = p + "self_attn."
    parts = (("q", 0, qg), ("k", qg, qg + kv), ("v", qg + kv, qg + 2 * kv))
    out = [Tensor(("self_attn", "qkv_proj", "kernel"), f"{a}{n}_proj.weight", (b - s, H), linear=True, cols=(s, b))
           for n, s, b in parts]
    if cfg.qkv_bias:
        out += [Tensor(("self_attn", "qkv_proj", "bias"), f"{a}{n}_proj.bias", (b - s,), cols=(s, b))
                for n, s, b in parts]
    out.append(Tensor(("self_attn", "o_proj", "kernel"), a + "o_proj.weight", (H, q), linear=True))
    if cfg.o_bias:
        out.append(Tensor(("self_attn", "o_proj", "bias"), a + "o_proj.bias", (H,)))
    norm = ("self_attn", "qk_norm", "weight")
    if cfg.qk_norm == "per_head":
        out += [Tensor(norm, a + "q_norm.weight", (D,), cols=(0, D)),
                Tensor(norm, a + "k_norm.weight", (D,), cols=(D, 2 * D))]
    elif cfg.qk_norm == "full":
        out += [Tensor(norm, a + "q_norm.weight", (q,), cols=(0, q)),
                Tensor(norm, a + "k_norm.weight", (kv,), cols=(q, q + kv))]
    return out


def mlp_tensors(path: tuple[str, ...], prefix: str, size: int, hidden: int,
                names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
    """A dense SwiGLU MLP at `path` in the layer's params, named `prefix{gate,up,down}.weight`."""
    g, u, d = names
    return [Tensor(path + ("gate_proj", "kernel"), f"{prefix}{g}.weight", (size, hidden), linear=True),
            Tensor(path + ("up_proj", "kernel"), f"{prefix}{u}.weight", (size, hidden), linear=True),
            Tensor(path + ("down_proj", "kernel"), f"{prefix}{d}.weight", (hidden, size), linear=True)]


def expert_tensors(cfg: ModelConfig, prefix: str, names=("gate_proj", "up_proj", "down_proj")):
    """One expert's gate, up and down projections ([out, in] each), named `prefix{name}.weight`."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    g, u, d = names
    return (Tensor((), f"{prefix}{g}.weight", (I, H), linear=True),
            Tensor((), f"{prefix}{u}.weight", (I, H), linear=True),
            Tensor((), f"{prefix}{d}.weight", (H, I), linear=True))


def fused_expert_tensors(cfg: ModelConfig, prefix: str) -> tuple[Tensor, Tensor]:
    """transformers' in-memory layout of a layer's experts, when saved unconverted:
    `prefix`gate_up_proj [E, 2I, H] (gate rows first) and `prefix`down_proj [E, H, I]."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    return (Tensor((), prefix + "gate_up_proj", (E, 2 * I, H), linear=True),
            Tensor((), prefix + "down_proj", (E, H, I), linear=True))
