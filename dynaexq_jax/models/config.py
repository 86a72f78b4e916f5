"""The decoder's configuration: what the one decoder needs to know, checked field by field.

Each family's adapter maps its `config.json` fields onto a `ModelConfig` and rejects what the
decoder cannot run; `registry.read_config` reads a checkpoint's config.json through it. This
module knows no family.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from dynaexq_jax.errors import UserError


class ConfigError(UserError):
    """A checkpoint's config.json names something this model cannot run."""


# config.json keys of the fields whose names differ, as transformers spells them (messages name
# what the user edits).
CONFIG_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "num_kv_heads": "num_key_value_heads", "experts_per_token": "num_experts_per_tok"}
# Numeric fields that must be > 0; every other number must be >= 0.
_POSITIVE = frozenset({"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "decoder_sparse_step", "max_position_embeddings", "rms_norm_eps", "rope_theta", "clip_qkv",
                       "sliding_window", "rope_factor", "swiglu_limit", "partial_rotary_factor", "n_group",
                       "topk_group", "routed_scaling_factor"})
_KINDS = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string",
          "tuple[int, ...]": "a list of integers", "tuple[float, ...]": "a list of finite numbers"}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 mscale ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _bad(field: str, value, what: str) -> ConfigError:
    key = CONFIG_KEYS.get(field, field)
    return ConfigError(f"config.json has {key}={value!r}, but it must be {what}; correct it in config.json "
                       "(the model's original release has the right value)")


def _integral(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _typed(field: str, value, annotation: str):
    """`value` as the field's annotated type (`int`, `float | None`, ...), or a ConfigError.
    Strict: JSON's "64" is not 64, false is not 0, and 1.5 is not an integer."""
    kind, *rest = (k.strip() for k in annotation.split("|"))
    if value is None and rest == ["None"]:
        return None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and _integral(value):
        return int(value)
    if kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if kind == "tuple[int, ...]" and isinstance(value, (list, tuple)) and all(map(_integral, value)):
        return tuple(int(v) for v in value)
    if kind == "tuple[float, ...]" and isinstance(value, (list, tuple)) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return tuple(float(v) for v in value)
    raise _bad(field, value, _KINDS.get(kind, kind) + (" or null" if rest == ["None"] else ""))


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of consecutive decoder layers of one kind, computed by one `lax.scan`."""

    kind: str  # "moe" or "dense"
    first: int  # index of its first decoder layer
    count: int
    first_moe: int  # index of its first layer among the MoE layers (moe segments)
    attention: str = "full"  # "full" (softmax attention, KV cache) or "linear" (gated DeltaNet, recurrent state)
    first_state: int = 0  # index of its first layer among the layers of its attention kind (its cache rows)


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
    # What differs between families, each read by the layers (defaults: Qwen3-MoE).
    qk_norm: str | None = "per_head"  # RMSNorm of q and k: "per_head" ([D] weights), "full" (whole projection), None
    qkv_bias: bool = False  # bias on the q, k and v projections
    o_bias: bool = False  # bias on the attention output projection
    clip_qkv: float | None = None  # q, k and v clamped to [-clip_qkv, clip_qkv] after the q/k norms
    router: str = "softmax_topk"  # softmax over the experts, then top-k (renormalised if norm_topk_prob)
    shared_expert_size: int = 0  # intermediate size of an always-resident shared expert per MoE layer (0: none)
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x @ gate) [H, 1]
    norm: str = "rms"  # the layers' and the final norm: "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    lm_head_bias: bool = False
    router_jitter: float = 0.0  # the "sparsemixer" router's jitter eps (Phi-3.5-MoE's router_jitter_noise)
    # RoPE scaling: None, or "longrope" (Phi-3.5): per-frequency divisors and a cos/sin scale, the
    # short ones while a call's sequence is within rope_original_max tokens, the long ones past it.
    rope_scaling: str | None = None
    rope_original_max: int = 0
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_short_mscale: float = 1.0
    rope_long_mscale: float = 1.0
    # "yarn" (gpt-oss): inv_freq blended between interpolated (/ rope_factor) and original
    # frequencies by a linear ramp over the dims whose rotation counts lie between
    # rope_beta_slow and rope_beta_fast within rope_original_max tokens; cos/sin times
    # rope_attention_factor.
    rope_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0
    # gpt-oss: a learned per-head logit in every attention softmax (the "sink"), a sliding window
    # of `sliding_window` keys on the layers `sliding_layers`, a bias on the router, biases on
    # the experts' gate_up and down projections, and the clamped SwiGLU ("clamped_swiglu":
    # gate clamped above at swiglu_limit, up to +-swiglu_limit, (up + 1) * gate * sigmoid(alpha * gate)).
    attention_sinks: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    router_bias: bool = False
    expert_bias: bool = False
    expert_activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Qwen3-Next: gated DeltaNet layers (`models.deltanet`) at `linear_layers`, softmax attention
    # elsewhere; a sigmoid output gate on the softmax attention (q_proj emits q and the gate per
    # head), RoPE on the first `partial_rotary_factor` of each head's dims.
    linear_layers: tuple[int, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    attn_output_gate: bool = False
    partial_rotary_factor: float = 1.0
    # Qwen3.5-MoE stores the DeltaNet input projections apart (in_proj_qkv, _z, _b, _a), read here
    # side by side in that order ("split"); Qwen3-Next's in_proj_qkvz / in_proj_ba group them per
    # key head ("grouped").
    linear_projection: str = "grouped"
    # Multi-head latent attention (DeepSeek-V3, `models.mla`), on when kv_lora_rank > 0: keys and
    # values are up-projected from a kv_lora_rank latent, cached as that latent plus one shared
    # rotary key of head_dim (= qk_rope_head_dim) values; queries through a q_lora_rank
    # bottleneck (0: one projection). Softmax scale (qk_nope_head_dim + head_dim)^-1/2, times
    # yarn_mscale(rope_factor, rope_mscale_all_dim)^2 under YaRN with rope_mscale_all_dim > 0;
    # rotary dims stored in interleaved pairs (rope_interleave) are de-interleaved before
    # rotating (the same dot products).
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    rope_mscale_all_dim: float = 0.0
    # Multi-token-prediction layers the checkpoint stores after the decoder's (DeepSeek-V3's and
    # GLM-4.5's `num_nextn_predict_layers`): for speculative decoding, not loaded.
    mtp_layers: int = 0
    # "sigmoid_topk" routers (DeepSeek-V3, GLM-4.5, MiniMax-M2; `models.routing`): experts chosen
    # by sigmoid score + a per-expert correction bias (`e_score_correction_bias`, float32) within
    # the topk_group best of n_group groups; weighted by their sigmoid scores (renormalised if
    # norm_topk_prob) times routed_scaling_factor. The router runs in float32, as released.
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        # Adapters pass config.json's values as they are, so this is the one place that checks
        # the type and range of every field: a damaged config.json is one error line, never a
        # traceback or a model that runs wrong (int("64") and bool("false") would hide both).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (f.name == "head_dim" and value is None):
                object.__setattr__(self, f.name, _typed(f.name, value, f.type))
        if self.head_dim is None:  # transformers' rule when config.json has no head_dim
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if f.name in _POSITIVE and not value > 0:
                    raise _bad(f.name, value, "greater than 0")
                if not value >= 0:
                    raise _bad(f.name, value, "at least 0")
        self._check_shape()

    def _check_shape(self) -> None:
        """Fields that must agree with each other."""
        if self.num_heads % self.num_kv_heads:
            raise _bad("num_kv_heads", self.num_kv_heads, f"a divisor of num_attention_heads={self.num_heads}")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if outside:
            raise _bad("mlp_only_layers", list(self.mlp_only_layers),
                       f"layer indices from 0 to num_hidden_layers-1={self.num_layers - 1}")
        if self.moe_layers:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise _bad("experts_per_token", self.experts_per_token, f"from 1 to num_experts={self.num_experts}")
            if self.moe_intermediate_size < 1:
                raise _bad("moe_intermediate_size", self.moe_intermediate_size,
                           "greater than 0 in a model with experts")
        outside = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
        if outside:
            raise _bad("sliding_layers", list(self.sliding_layers),
                       f"layer indices from 0 to num_hidden_layers-1={self.num_layers - 1}")
        if self.sliding_layers and self.sliding_window is None:
            raise _bad("sliding_window", None, "a positive integer when layers use sliding attention")
        outside = [i for i in self.linear_layers if not 0 <= i < self.num_layers]
        if outside:
            raise _bad("linear_layers", list(self.linear_layers),
                       f"layer indices from 0 to num_hidden_layers-1={self.num_layers - 1}")
        if self.linear_layers:
            for f in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                      "linear_conv_kernel"):
                if getattr(self, f) < 1:
                    raise _bad(f, getattr(self, f), "greater than 0 in a model with linear attention layers")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise _bad("linear_num_value_heads", self.linear_num_value_heads,
                           f"a multiple of linear_num_key_heads={self.linear_num_key_heads}")
        if self.linear_projection not in ("grouped", "split"):
            raise _bad("linear_projection", self.linear_projection, "'grouped' or 'split'")
        if self.router == "sigmoid_topk" and self.moe_layers:
            if self.num_experts % self.n_group or (self.n_group > 1 and self.num_experts // self.n_group < 2):
                raise _bad("n_group", self.n_group, f"a divisor of n_routed_experts={self.num_experts} leaving at "
                           "least 2 experts per group")
            if self.topk_group > self.n_group:
                raise _bad("topk_group", self.topk_group, f"at most n_group={self.n_group}")
            if self.experts_per_token > self.topk_group * (self.num_experts // self.n_group):
                raise _bad("experts_per_token", self.experts_per_token,
                           f"at most the {self.topk_group * (self.num_experts // self.n_group)} experts of the "
                           f"topk_group={self.topk_group} groups a token may use")
        if self.mla:
            for f in ("qk_nope_head_dim", "v_head_dim"):
                if getattr(self, f) < 1:
                    raise _bad(f, getattr(self, f), "greater than 0 in a model with latent attention")
            if self.head_dim % 2:
                raise _bad("qk_rope_head_dim", self.head_dim, "an even number of rotary dims")
        if len(self.moe_layers) < self.num_layers and self.intermediate_size < 1:
            raise _bad("intermediate_size", self.intermediate_size, "greater than 0 in a model with dense layers")

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Each full-attention layer's window in keys (0: the whole context), by its KV cache row."""
        return tuple(self.sliding_window if i in self.sliding_layers else 0 for i in self.full_layers)

    @property
    def full_layers(self) -> tuple[int, ...]:
        """Indices of the softmax-attention layers (each has a row of the KV cache)."""
        return tuple(i for i in range(self.num_layers) if i not in self.linear_layers)

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention (`models.mla`)."""
        return self.kv_lora_rank > 0

    @property
    def rotary_dim(self) -> int:
        """Dims of each head RoPE rotates (the first ones; the rest pass unrotated)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers whose MLP is a sparse MoE block."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def segments(self) -> tuple[Segment, ...]:
        """Maximal runs of layers of one kind, in order. Each run is one scan in the step, so
        a 48-layer model compiles its layer once."""
        out, moe_seen, seen = [], 0, {"full": 0, "linear": 0}
        for i in range(self.num_layers):
            kind = "moe" if self.is_moe_layer(i) else "dense"
            attention = "linear" if i in self.linear_layers else "full"
            if out and (out[-1].kind, out[-1].attention) == (kind, attention):
                out[-1] = dataclasses.replace(out[-1], count=out[-1].count + 1)
            else:
                out.append(Segment(kind, i, 1, moe_seen, attention, seen[attention]))
            moe_seen += kind == "moe"
            seen[attention] += 1
        return tuple(out)
