"""Models of real shapes with random weights, for benchmarks without a checkpoint download.

Random routers route almost uniformly, unlike trained ones. `skew_router` makes expert
popularity heavy-tailed: in every MoE layer, a random ranking of the experts scales router row
`e` by `rank_e ** -skew` (rank 1 = hottest). With hidden states of similar norm, an expert's
logit spread grows with its row norm, so high-ranked experts win the top-k far more often;
`skew=0` keeps the uniform router. Moving the hot set (`--routing-shift-every`) draws a new
ranking: only the router arrays change, so no step retraces.

Expert weights are made one layer at a time on use (`LazyLayers`), so building the host bank
never holds a second bf16 copy of every expert.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import HostExperts, LayerSource
from dynaexq_jax.io import store
from dynaexq_jax.io.loader import Checkpoint, np_dtype
from dynaexq_jax.models import registry
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.decoder import Decoder

# What gpt-oss-20b and -120b share (config.json fields as on the Hub).
_GPT_OSS = dict(
    model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64,
    num_attention_heads=64, num_key_value_heads=8, num_experts_per_tok=4, attention_bias=True, sliding_window=128,
    swiglu_limit=7.0, rms_norm_eps=1e-5, rope_theta=150000, tie_word_embeddings=False, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                      original_max_position_embeddings=4096),
    quantization_config=dict(quant_method="mxfp4", modules_to_not_convert=[
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]),
)

QWEN3_NEXT_80B = dict(
    architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=151936, hidden_size=2048,
    intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_value_head_dim=128, num_experts=512, num_experts_per_tok=10,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], partial_rotary_factor=0.25, rope_theta=10000000, rope_scaling=None, rms_norm_eps=1e-6,
    hidden_act="silu", attention_bias=False, tie_word_embeddings=False, max_position_embeddings=262144,
    bos_token_id=151643, eos_token_id=151645,
)

# deepseek-ai/DeepSeek-V3's config.json as published on the Hub (DeepSeek-R1 shares every field
# but the version tags): 61 layers, the first 3 dense, 256 routed experts top-8 in 8 groups
# (best 4 kept) + 1 shared, MLA with a 512 + 64 latent, YaRN x40, block-wise FP8 weights.
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, ep_size=1, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
    first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True,
    hidden_act="silu", max_position_embeddings=163840, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
    bos_token_id=0, eos_token_id=1, pretraining_tp=1, tie_word_embeddings=False, rope_theta=10000,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, type="yarn"),
    attention_bias=False, attention_dropout=0.0, num_nextn_predict_layers=1, torch_dtype="bfloat16",
    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                             weight_block_size=[128, 128]),
)

# zai-org/GLM-4.5-Air's config.json as published on the Hub: 46 layers, the first dense, 128
# routed experts top-8 + 1 shared, no q/k norms (GLM-4.5 has them), RoPE on half of each head.
GLM_4_5_AIR = dict(
    architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", attention_bias=True, attention_dropout=0.0,
    pad_token_id=151329, eos_token_id=[151329, 151336, 151338], head_dim=128, hidden_act="silu", hidden_size=4096,
    partial_rotary_factor=0.5, initializer_range=0.02, intermediate_size=10944, max_position_embeddings=131072,
    moe_intermediate_size=1408, norm_topk_prob=True, num_attention_heads=96, n_group=1, topk_group=1,
    n_routed_experts=128, n_shared_experts=1, routed_scaling_factor=1.0, num_experts_per_tok=8,
    first_k_dense_replace=1, num_hidden_layers=46, num_key_value_heads=8, rms_norm_eps=1e-5, rope_scaling=None,
    rope_theta=1000000, num_nextn_predict_layers=1, tie_word_embeddings=False, torch_dtype="bfloat16",
    use_cache=True, use_qk_norm=False, vocab_size=151552,
)

# MiniMaxAI/MiniMax-M2's config.json as published on the Hub (the fields that select the model;
# its auto_map and the multi-token-prediction settings aside): 62 layers, 256 experts top-8 with
# sigmoid scores and a routing bias, q/k norms over the whole projections, RoPE on 64 of 128 dims,
# block-wise FP8 weights.
MINIMAX_M2 = dict(
    architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", attn_type_list=[1] * 62, head_dim=128,
    hidden_act="silu", hidden_size=3072, intermediate_size=1536, max_position_embeddings=196608,
    num_attention_heads=48, num_experts_per_tok=8, num_hidden_layers=62, num_key_value_heads=8,
    num_local_experts=256, qk_norm_type="per_layer", rms_norm_eps=1e-6, rope_theta=5000000, rotary_dim=64,
    scoring_func="sigmoid", shared_intermediate_size=0, tie_word_embeddings=False, torch_dtype="bfloat16",
    use_cache=True, use_qk_norm=True, use_routing_bias=True, vocab_size=200064,
    quantization_config=dict(activation_scheme="dynamic", fmt="float8_e4m3fn", quant_method="fp8",
                             weight_block_size=[128, 128],
                             modules_to_not_convert=["gate", "e_score_correction_bias", "lm_head"]),
)

# Qwen/Qwen3.5-35B-A3B's config.json as published on the Hub (the vision tower's settings, which
# a text prompt never reads, as there too): 40 layers, three gated-DeltaNet layers to each gated
# attention one, 256 experts top-8 + a shared expert; the text model's fields are transformers'
# Qwen3_5MoeTextConfig defaults, which transformers documents as this model's.
QWEN3_5_35B_A3B = dict(
    architectures=["Qwen3_5MoeForConditionalGeneration"], model_type="qwen3_5_moe", image_token_id=248056,
    video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054, tie_word_embeddings=False,
    text_config=dict(
        model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048, num_hidden_layers=40,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, hidden_act="silu", max_position_embeddings=262144,
        rms_norm_eps=1e-6, attention_bias=False, attn_output_gate=True, full_attention_interval=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
        num_experts_per_tok=8, router_aux_loss_coef=0.001, mtp_num_hidden_layers=1, eos_token_id=248044,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=10000000,
                                                        partial_rotary_factor=0.25, mrope_section=[11, 11, 10],
                                                        mrope_interleaved=True)),
    vision_config=dict(model_type="qwen3_5_moe_vision", depth=27, hidden_size=1152, intermediate_size=4304,
                       num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                       out_hidden_size=2048, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh"),
)

PRESETS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # The published shapes of the other families (config.json fields as on the Hub).
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
        tie_word_embeddings=False, max_position_embeddings=32768,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        intermediate_size=1024, norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096,
    ),
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, intermediate_size=5632,
        norm_topk_prob=False, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False,
        tie_word_embeddings=False, max_position_embeddings=8192,
    ),
    "phi-3.5-moe": dict(
        model_type="phimoe", vocab_size=32064, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
        intermediate_size=6400, attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=131072, tie_word_embeddings=False,
        max_position_embeddings=131072,
        # longrope as released, with stand-in factors (they change no shape and no byte)
        rope_scaling=dict(type="longrope", short_factor=[1.0] * 64, long_factor=[1.0] * 64,
                          short_mscale=1.243163121016122, long_mscale=1.243163121016122,
                          original_max_position_embeddings=4096),
    ),
    # gpt-oss as released (MXFP4 experts on the Hub; a preset's experts are random at the
    # compute dtype): sliding-window layers alternate with full ones, sinks, biases, YaRN.
    "gpt-oss-20b": dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32,
                        layer_types=["sliding_attention", "full_attention"] * 12),
    "gpt-oss-120b": dict(_GPT_OSS, num_hidden_layers=36, num_local_experts=128,
                         layer_types=["sliding_attention", "full_attention"] * 18),
    # Qwen3-Next-80B-A3B as released (config.json on the Hub): three gated-DeltaNet layers to each
    # gated softmax-attention one, 512 experts top-10 + a shared expert. The multi-token-prediction
    # head it ships is not part of the model served.
    "qwen3-next-80b-a3b": QWEN3_NEXT_80B,
    "deepseek-v3": DEEPSEEK_V3,
    "glm-4.5-air": GLM_4_5_AIR,
    "minimax-m2": MINIMAX_M2,
    "qwen3.5-35b-a3b": QWEN3_5_35B_A3B,
    # DeepSeek-V3's latent attention as released (the 512 + 64 latent, 128 + 64 query and 128 value
    # dims per head, but 16 heads) and its routing structure (groups, a dense first layer), at CPU size.
    "deepseek-v3-smoke": dict(
        DEEPSEEK_V3, vocab_size=512, hidden_size=512, intermediate_size=1024, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, n_group=4,
        topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=256,
        max_position_embeddings=16384, quantization_config=None),
    # Qwen3-Next's structure (layer pattern, head ratios, shared expert) at CPU size.
    "qwen3-next-smoke": dict(
        QWEN3_NEXT_80B, vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
        shared_expert_intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, max_position_embeddings=4096,
    ),
    # Same layer shapes, 4 layers and a small vocabulary: a CPU-sized smoke preset.
    "qwen3-moe-smoke": dict(
        model_type="qwen3_moe", vocab_size=512, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=512,
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
    ),
}

INIT_STD = 0.02
GENERATOR = 2  # bump when the experts a seed makes change (the converted-expert cache keys presets by it)


def preset_config(name: str) -> ModelConfig:
    """A preset name, or the path of a config.json (or of its directory)."""
    if name in PRESETS:
        return registry.adapter_for(PRESETS[name]).config_from_hf(PRESETS[name])
    path = Path(name)
    if path.exists():
        return registry.read_config(path)
    raise UserError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)} or a config.json path")


class LazyLayers(LayerSource):
    """Per-MoE-layer random expert arrays [E, K, N], made deterministically on access.

    Drawing ~29 billion normal samples for a 30B model would dominate a benchmark's start-up,
    so a small pool of random matrices is drawn once and expert `e` of layer `i` is pool
    matrix `(i * E + e) % POOL` rolled along K by its own offset: distinct experts, the same
    statistics, a copy's cost (two slice copies on the host, a gather on the device).
    """

    POOL = 4
    memory_kind = "generated"  # a host bank over it makes each expert on demand

    def __init__(self, shape: tuple[int, int, int], num_layers: int, seed: int, dtype):
        self.shape, self.num_layers, self.dtype, self.seed = tuple(shape), num_layers, np.dtype(dtype), seed
        self._device_pool = {}
        self._columns = {}  # stride -> the pool's every stride-th column

    @functools.cached_property
    def pool(self) -> list[np.ndarray]:
        """The pool matrices, drawn on first use: a run whose experts all come from the
        converted cache never draws them (half a second of a warm start on the CPU)."""
        rng = np.random.default_rng(self.seed)
        return [(rng.standard_normal(self.shape[1:], np.float32) * INIT_STD).astype(self.dtype)
                for _ in range(self.POOL)]

    def _check(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(layer)

    def _pick(self, layer: int, e: int) -> tuple[int, int]:
        """(pool matrix, roll along K) of expert `e` of `layer`."""
        i = layer * self.shape[0] + e
        return i % self.POOL, (i * 7919) % self.shape[1]

    def _roll_into(self, out: np.ndarray, layer: int, e: int, pool=None) -> None:
        # np.roll(pool, s, axis=0) without its temporary: out[s:] = pool[:K - s], out[:s] = pool[K - s:].
        p, s = self._pick(layer, e)
        src = (pool or self.pool)[p]
        K = self.shape[1]
        out[s:] = src[: K - s]
        out[:s] = src[K - s :]

    def __getitem__(self, layer: int) -> np.ndarray:
        self._check(layer)
        out = np.empty(self.shape, self.dtype)
        for e in range(self.shape[0]):
            self._roll_into(out[e], layer, e)
        return out

    def expert(self, layer: int, e: int) -> np.ndarray:
        self._check(layer)
        out = np.empty(self.shape[1:], self.dtype)
        self._roll_into(out, layer, e)
        return out

    def columns(self, layer: int, stride: int) -> np.ndarray:
        self._check(layer)
        if stride not in self._columns:  # each pool matrix's columns, gathered once
            self._columns[stride] = [np.ascontiguousarray(m[:, ::stride]) for m in self.pool]
        E, K, N = self.shape
        out = np.empty((E, K, len(range(0, N, stride))), self.dtype)
        for e in range(E):
            self._roll_into(out[e], layer, e, pool=self._columns[stride])
        return out

    def on_device(self, layer: int, device=None, experts: slice | np.ndarray = slice(None)) -> jax.Array:
        self._check(layer)
        device = device or jax.devices()[0]
        if device not in self._device_pool:  # each pool matrix twice along K: a roll is one slice
            self._device_pool[device] = jax.device_put(np.stack([np.concatenate([m, m]) for m in self.pool]), device)
        ids = np.arange(self.shape[0])[experts]
        picks = np.array([self._pick(layer, int(e)) for e in ids], np.int32)  # [E', 2]
        return _rolled(self._device_pool[device], jax.device_put(picks, device), self.shape[1])


@functools.partial(jax.jit, static_argnums=2)
def _rolled(doubled, picks, K: int):
    """[E, K, N]: expert e is rows K - s .. 2K - s of doubled[p] for (p, s) = picks[e] (np.roll by s)."""
    N = doubled.shape[-1]
    one = lambda p: jax.lax.dynamic_slice(doubled, (p[0], K - p[1], 0), (1, K, N))[0]
    return jax.vmap(one)(picks)


# Non-expert weights are copied out of one pool of normal draws, each array from its own offset
# (a prime-length pool: no two rows of a matrix repeat in step), at memcpy speed: drawing a 30B
# model's 1.5 billion non-expert values one by one took most of a preset's start-up.
_PARAM_POOL = 16_777_213


def random_params(cfg: ModelConfig, dtype, seed: int) -> dict:
    """Non-expert parameters on the default device: the model's own tree, weights ~ N(0, 0.02),
    norms 1. Each array is made on the host and moved at once, so the host holds one at a time
    and each reuses the pages the last one freed (a process's first gigabyte of fresh pages costs
    ~1.5 s on the 2-core CPU machines)."""
    shapes = Decoder(cfg, dtype).param_shapes()
    rng = np.random.default_rng(seed)
    npd = np_dtype(dtype)
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    pool = (rng.standard_normal(min(total, _PARAM_POOL), np.float32) * INIT_STD).astype(npd)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        dt = np.float32 if leaf.dtype == jnp.float32 else npd  # where the decoder keeps float32 (sigmoid routers)
        if "norm" in name:  # unit scale: zero-centred norms (Qwen3-Next's, but its DeltaNet output norm) store w - 1
            centred = cfg.norm == "zero_centred_rms" and "linear_attn" not in name
            return (np.zeros if centred else np.ones)(leaf.shape, dt)
        out = np.empty(math.prod(leaf.shape), dt)
        start = int(rng.integers(len(pool)))
        for i in range(0, len(out), len(pool)):  # the pool from `start` on, around, as often as it takes
            n = min(len(pool), len(out) - i)
            head = min(n, len(pool) - start)
            out[i : i + head] = pool[start : start + head]
            out[i + head : i + n] = pool[: n - head]
        return out.reshape(leaf.shape)

    return jax.tree_util.tree_map_with_path(lambda path, leaf: jax.device_put(init(path, leaf)), shapes)


def _routers(params: dict, cfg: ModelConfig):
    """(segment index, its stacked router kernel [n, H, E]) of every MoE segment."""
    return [(s, params["layers"][s]["mlp"]["gate"]["kernel"])
            for s, seg in enumerate(cfg.segments) if seg.kind == "moe"]


def _with_routers(params: dict, kernels: dict) -> dict:
    """`params` with the router kernels of segments `kernels` {segment: [n, H, E]} replaced."""
    layers = list(params["layers"])
    for s, k in kernels.items():
        layers[s] = {**layers[s], "mlp": {**layers[s]["mlp"], "gate": {**layers[s]["mlp"]["gate"], "kernel": k}}}
    return {**params, "layers": tuple(layers)}


def _zipf_scale(rng, num_experts: int, skew: float) -> np.ndarray:
    rank = rng.permutation(num_experts) + 1
    scale = rank.astype(np.float32) ** -skew
    return scale / np.sqrt(np.mean(scale**2))  # keep the mean logit spread


def skew_router(params: dict, cfg: ModelConfig, skew: float, seed: int) -> dict:
    """Scale each MoE layer's router rows by a random Zipf-like ranking (see module doc)."""
    if skew == 0:
        return params
    rng = np.random.default_rng((seed, 7))
    out = {}
    for s, kernel in _routers(params, cfg):  # [n, H, E]
        scale = np.stack([_zipf_scale(rng, cfg.num_experts, skew) for _ in range(kernel.shape[0])])  # [n, E]
        out[s] = jax.device_put((np.asarray(kernel, np.float32) * scale[:, None, :]).astype(kernel.dtype))
    return _with_routers(params, out)


def random_checkpoint(cfg: ModelConfig, dtype=jnp.bfloat16, *, seed: int = 0, routing_skew: float = 0.0) -> Checkpoint:
    """A Checkpoint of `cfg`'s shapes with random weights; experts stay on the host, lazily."""
    params = skew_router(random_params(cfg, dtype, seed), cfg, routing_skew, seed)
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    n = len(cfg.moe_layers)
    npd = np_dtype(dtype)
    biases = {}
    if cfg.expert_bias:
        rng = np.random.default_rng((seed, 3))
        biases = {k: (rng.standard_normal(shape, np.float32) * INIT_STD).astype(npd)
                  for k, shape in (("gate_up_bias", (n, E, 2 * I)), ("down_bias", (n, E, H)))}
    experts = HostExperts(
        gate_up=LazyLayers((E, H, 2 * I), n, seed * 2 + 1, npd),
        down=LazyLayers((E, I, H), n, seed * 2 + 2, npd),
        **biases,
    )
    # The experts depend on their shapes, dtype and seed only (not on the routers' skew): what
    # the converted-expert cache keys a preset by, so a second run maps what the first converted.
    recipe = (GENERATOR, cfg.model_type, n, E, H, I, str(npd), seed)
    return Checkpoint(
        config=cfg, params=params, experts=experts, dtype=jnp.dtype(dtype),
        eos_token_ids=(), tokenizer=None, path=Path(f"<random seed {seed}>"),
        generated=store.Generated(f"preset-{cfg.model_type}", recipe),
    )


class RouterShift:
    """Moves the hot set during a run: new router arrays, every other parameter shared."""

    def __init__(self, ckpt: Checkpoint, skew: float):
        self.cfg, self.skew = ckpt.config, skew
        # Re-ranking starts from the current routers with their row norms divided out.
        self.base = {s: _unit_rows(np.asarray(k, np.float32)) for s, k in _routers(ckpt.params, ckpt.config)}

    def params(self, params: dict, shift: int) -> dict:
        """`params` with the routers of ranking number `shift`."""
        rng = np.random.default_rng((shift, 11))
        out = {}
        for (s, old), base in zip(_routers(params, self.cfg), self.base.values()):
            scale = np.stack([_zipf_scale(rng, self.cfg.num_experts, self.skew) for _ in range(base.shape[0])])
            out[s] = jax.device_put((base * scale[:, None, :]).astype(old.dtype), old.sharding)
        return _with_routers(params, out)


def _unit_rows(kernel: np.ndarray) -> np.ndarray:
    """Routers [n, H, E] with every expert column scaled to the layer's mean column norm."""
    norms = np.linalg.norm(kernel, axis=1, keepdims=True)  # [n, 1, E]
    return kernel * (norms.mean(axis=2, keepdims=True) / norms)


__all__ = ["PRESETS", "RouterShift", "preset_config", "random_checkpoint", "skew_router"]
