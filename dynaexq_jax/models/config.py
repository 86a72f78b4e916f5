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


class FieldError(ConfigError):
    """A `ModelConfig` field whose value is of the wrong type or out of range.

    Families spell fields differently in config.json (Mixtral's experts are `num_local_experts`,
    DeepSeek-V3's rotary head dim `qk_rope_head_dim`), so the error keeps the field, and `what`
    the value must be with `{name}` slots for the other fields it refers to (`refs`): the family's
    adapter renders it with the keys as its checkpoints spell them (`common.adapter`). Its own
    message spells them as transformers does for most families (`KEYS`).
    """

    def __init__(self, field: str, value, what: str, **refs):
        self.field, self.value, self.what, self.refs = field, value, what, refs
        super().__init__(self.render(lambda f: KEYS.get(f, f)))

    def render(self, key, value=None) -> str:
        """The message with `key(field)` for each field's name (`value`: the value to show, default ours)."""
        what = self.what.format(**{f: f"{key(f)}={v!r}" for f, v in self.refs.items()})
        shown = repr(self.value if value is None else value)
        if len(shown) > 80:  # a long list: its start says which it is
            shown = shown[:72] + " ..."
        return (f"config.json has {key(self.field)}={shown}, but it must be {what}; correct it in config.json "
                "(the model's original release has the right value)")


# config.json keys of the fields whose names differ, as transformers spells them for most families.
KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads", "experts_per_token": "num_experts_per_tok"}

INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(float32).max: the decoder computes in float32 at most


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range of a numeric field. A bound is a number or the name of another field; `above`
    makes the low bound exclusive (a value must exceed it), `below` the high one."""

    low: float | str
    high: float | str
    above: bool = False
    below: bool = False

    def holds(self, value, low, high) -> bool:
        return (value > low if self.above else value >= low) and (value < high if self.below else value <= high)

    def what(self, low, high) -> str:
        lo = f"greater than {low}" if self.above else f"at least {low}"
        hi = f"below {high}" if self.below else f"at most {high}"
        return f"from {low} to {high}" if not (self.above or self.below) else f"{lo} and {hi}"


# Every numeric field's range, both ends. The sizes' upper ends lie far above any released model
# (the largest have 128 layers, 512 experts, hidden 25600, 10M positions) yet keep every count
# in int32 and every per-layer and per-expert table small, so a damaged value is refused here
# instead of running out of memory, overflowing a kernel's table or looping for hours. Floats
# must stay finite in float32; a few have the range their meaning gives (a share of head dims,
# a norm's epsilon).
_SIZE, _DIM, _COUNT = 1 << 24, 1 << 16, 1 << 10
BOUNDS = {
    "vocab_size": Bound(1, INT32_MAX),
    "hidden_size": Bound(1, _DIM * 16),
    "num_layers": Bound(1, _COUNT),
    "num_heads": Bound(1, _DIM),
    "num_kv_heads": Bound(1, "num_heads"),
    "head_dim": Bound(1, _DIM),
    "num_experts": Bound(0, _COUNT * 16),
    "experts_per_token": Bound(0, _COUNT * 16),
    "moe_intermediate_size": Bound(0, _SIZE),
    "intermediate_size": Bound(0, _SIZE),
    "decoder_sparse_step": Bound(1, "num_layers"),
    "rms_norm_eps": Bound(0, 1, above=True, below=True),
    "rope_theta": Bound(1, FLOAT32_MAX, above=True),
    "max_position_embeddings": Bound(1, _SIZE),
    "clip_qkv": Bound(0, FLOAT32_MAX, above=True),
    "shared_expert_size": Bound(0, _SIZE * 64),
    "router_jitter": Bound(0, 1),
    "rope_original_max": Bound(0, "max_position_embeddings"),
    "rope_short_mscale": Bound(0, FLOAT32_MAX, above=True),
    "rope_long_mscale": Bound(0, FLOAT32_MAX, above=True),
    "rope_factor": Bound(0, FLOAT32_MAX, above=True),
    "rope_beta_fast": Bound(0, FLOAT32_MAX, above=True),
    "rope_beta_slow": Bound(0, "rope_beta_fast", above=True),
    "rope_attention_factor": Bound(0, FLOAT32_MAX, above=True),
    "sliding_window": Bound(1, "max_position_embeddings"),
    "swiglu_alpha": Bound(0, FLOAT32_MAX),
    "swiglu_limit": Bound(0, FLOAT32_MAX, above=True),
    "linear_num_key_heads": Bound(0, _DIM),
    "linear_num_value_heads": Bound(0, _DIM),
    "linear_key_head_dim": Bound(0, _DIM),
    "linear_value_head_dim": Bound(0, _DIM),
    "linear_conv_kernel": Bound(0, _COUNT),
    "partial_rotary_factor": Bound(0, 1, above=True),
    "q_lora_rank": Bound(0, _DIM),
    "kv_lora_rank": Bound(0, _DIM),
    "qk_nope_head_dim": Bound(0, _DIM),
    "v_head_dim": Bound(0, _DIM),
    "rope_mscale_all_dim": Bound(0, FLOAT32_MAX),
    "mtp_layers": Bound(0, _COUNT),
    "n_group": Bound(1, _COUNT * 16),
    "topk_group": Bound(1, "n_group"),
    "routed_scaling_factor": Bound(0, FLOAT32_MAX, above=True),
}
# Lists of floats: each element's range (RoPE divisors per frequency).
ELEMENT_BOUNDS = {"rope_short_factor": Bound(0, FLOAT32_MAX, above=True),
                  "rope_long_factor": Bound(0, FLOAT32_MAX, above=True)}
_KINDS = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string",
          "tuple[int, ...]": "a list of integers", "tuple[float, ...]": "a list of finite numbers"}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 mscale ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _integral(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _typed(field: str, value, annotation: str):
    """`value` as the field's annotated type (`int`, `float | None`, ...), or a FieldError.
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
    raise FieldError(field, value, _KINDS.get(kind, kind) + (" or null" if rest == ["None"] else ""))


def _in_range(field: str, value, fields=None) -> None:
    """A FieldError unless `value` lies in the field's `BOUNDS` (each element's, for a list).
    Without `fields` (another field's value, by name) a bound naming another field is not checked."""
    bound = BOUNDS.get(field) or ELEMENT_BOUNDS.get(field)
    if bound is None or value is None:
        return
    refs = {}
    ends = []
    for end in (bound.low, bound.high):
        if isinstance(end, str):
            if fields is None:
                return
            refs[end] = fields[end]
            end = fields[end]
        ends.append(end)
    low, high = ends
    values = value if field in ELEMENT_BOUNDS else (value,)
    if not all(bound.holds(v, low, high) for v in values):
        what = bound.what("{%s}" % bound.low if isinstance(bound.low, str) else low,
                          "{%s}" % bound.high if isinstance(bound.high, str) else high)
        raise FieldError(field, list(value) if isinstance(value, tuple) else value,
                         ("a list of numbers each " if field in ELEMENT_BOUNDS else "") + what, **refs)


def field_value(field: str, value):
    """`value` checked as `ModelConfig.<field>` takes it: its type, and its range where that does
    not depend on another field. Adapters read the fields they compute with this way first."""
    f = _FIELDS[field]
    if field == "head_dim" and value is None:
        return None
    value = _typed(field, value, f.type)
    _in_range(field, value)
    return value


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
        # the type and both ends of the range of every field: a damaged config.json is one
        # error line, never a traceback or a model that runs wrong (int("64") and bool("false")
        # would hide both).
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, field_value(f.name, getattr(self, f.name)))
        if self.head_dim is None:  # transformers' rule when config.json has no head_dim
            head_dim = self.hidden_size // self.num_heads
            if head_dim < 2 or head_dim % 2:  # RoPE rotates pairs of dims
                raise FieldError("num_heads", self.num_heads, f"a count that leaves each head an even number of the "
                                 f"{{hidden_size}} dims (it leaves {head_dim}), or config.json must give head_dim",
                                 hidden_size=self.hidden_size)
            object.__setattr__(self, "head_dim", head_dim)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in BOUNDS:  # the ranges that depend on another field
            _in_range(name, values[name], values)
        self._check_shape()

    def _check_shape(self) -> None:
        """Fields that must agree with each other."""
        if self.num_heads % self.num_kv_heads:
            raise FieldError("num_kv_heads", self.num_kv_heads, "a divisor of {num_heads}", num_heads=self.num_heads)
        for field in ("mlp_only_layers", "sliding_layers", "linear_layers"):
            if any(not 0 <= i < self.num_layers for i in getattr(self, field)):
                raise FieldError(field, list(getattr(self, field)), "layer indices below {num_layers}",
                                 num_layers=self.num_layers)
        if self.moe_layers:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise FieldError("experts_per_token", self.experts_per_token, "from 1 to {num_experts}",
                                 num_experts=self.num_experts)
            if self.moe_intermediate_size < 1:
                raise FieldError("moe_intermediate_size", self.moe_intermediate_size,
                                 "greater than 0 in a model with experts")
        if self.sliding_layers and self.sliding_window is None:
            raise FieldError("sliding_window", None, "a positive integer when layers use sliding attention")
        if self.linear_layers:
            for f in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                      "linear_conv_kernel"):
                if getattr(self, f) < 1:
                    raise FieldError(f, getattr(self, f), "greater than 0 in a model with linear attention layers")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise FieldError("linear_num_value_heads", self.linear_num_value_heads,
                                 "a multiple of {linear_num_key_heads}", linear_num_key_heads=self.linear_num_key_heads)
        if self.linear_projection not in ("grouped", "split"):
            raise FieldError("linear_projection", self.linear_projection, "'grouped' or 'split'")
        if self.router == "sigmoid_topk" and self.moe_layers:
            if self.num_experts % self.n_group or (self.n_group > 1 and self.num_experts // self.n_group < 2):
                raise FieldError("n_group", self.n_group, "a divisor of {num_experts} leaving at least 2 experts per "
                                 "group", num_experts=self.num_experts)
            if self.experts_per_token > self.topk_group * (self.num_experts // self.n_group):
                raise FieldError("experts_per_token", self.experts_per_token,
                                 f"at most the {self.topk_group * (self.num_experts // self.n_group)} experts of the "
                                 "{topk_group} groups a token may use", topk_group=self.topk_group)
        rotary = self.rotary_dim
        if rotary < 2 or rotary % 2:  # RoPE rotates pairs of dims
            if self.partial_rotary_factor == 1:
                raise FieldError("head_dim", self.head_dim, "an even number (RoPE rotates pairs of dims)")
            raise FieldError("partial_rotary_factor", self.partial_rotary_factor, "a share of the {head_dim} head dims "
                             f"that is an even number of dims (it gives {rotary})", head_dim=self.head_dim)
        if self.mla:
            for f in ("qk_nope_head_dim", "v_head_dim"):
                if getattr(self, f) < 1:
                    raise FieldError(f, getattr(self, f), "greater than 0 in a model with latent attention")
        if self.rope_scaling == "longrope":
            for f in ("rope_short_factor", "rope_long_factor"):
                if len(getattr(self, f)) != rotary // 2:
                    raise FieldError(f, list(getattr(self, f)), f"a list of {rotary // 2} numbers, one per rotary "
                                     "frequency")
        if len(self.moe_layers) < self.num_layers and self.intermediate_size < 1:
            raise FieldError("intermediate_size", self.intermediate_size, "greater than 0 in a model with dense layers")

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


_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
