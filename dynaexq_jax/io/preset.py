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

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.models.config import Qwen3MoeConfig
from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import DenseExperts
from dynaexq_jax.io.loader import Checkpoint, np_dtype, to_device
from dynaexq_jax.models.decoder import KVCache, Qwen3Moe

PRESETS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=40960,
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


def preset_config(name: str) -> Qwen3MoeConfig:
    """A preset name, or the path of a config.json (or of its directory)."""
    if name in PRESETS:
        return Qwen3MoeConfig.from_dict(PRESETS[name])
    path = Path(name)
    if path.exists():
        return Qwen3MoeConfig.from_file(path)
    raise UserError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)} or a config.json path")


class LazyLayers:
    """Per-MoE-layer random expert arrays [E, K, N], made deterministically on access.

    Drawing ~29 billion normal samples for a 30B model would dominate a benchmark's start-up,
    so a small pool of random matrices is drawn once and each expert is a pool matrix rolled
    along K by its own offset: distinct experts, the same statistics, a copy's cost.
    """

    POOL = 4

    def __init__(self, shape: tuple[int, int, int], num_layers: int, seed: int, dtype):
        self.shape, self.num_layers, self.dtype = shape, num_layers, dtype
        rng = np.random.default_rng(seed)
        self.pool = [(rng.standard_normal(shape[1:], np.float32) * INIT_STD).astype(dtype) for _ in range(self.POOL)]

    def __len__(self):
        return self.num_layers

    def __getitem__(self, layer: int) -> np.ndarray:
        if not 0 <= layer < self.num_layers:
            raise IndexError(layer)
        E, K = self.shape[:2]
        out = np.empty(self.shape, self.dtype)
        for e in range(E):
            i = layer * E + e
            out[e] = np.roll(self.pool[i % self.POOL], (i * 7919) % K, axis=0)
        return out

    def __iter__(self):
        return (self[i] for i in range(self.num_layers))


def random_params(cfg: Qwen3MoeConfig, dtype, seed: int) -> dict:
    """Non-expert parameters: the model's own init tree, weights ~ N(0, 0.02), norms 1."""
    model = Qwen3Moe(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = KVCache.empty(cfg, 1, 1, dtype)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, tokens, tokens > -1, cache, _NoExperts(cfg))
    )["params"]
    rng = np.random.default_rng(seed)
    npd = np_dtype(dtype)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.ones(leaf.shape, npd)
        return (rng.standard_normal(leaf.shape, np.float32) * INIT_STD).astype(npd)

    return jax.tree_util.tree_map_with_path(init, shapes)


class _NoExperts:
    """Shape-only stand-in for the experts while tracing the parameter tree."""

    def __init__(self, cfg):
        self.cfg = cfg

    def ffn(self, moe_layer, x, expert_ids, weights):
        return jnp.zeros_like(x)


def skew_router(params: dict, cfg: Qwen3MoeConfig, skew: float, seed: int) -> dict:
    """Scale each MoE layer's router rows by a random Zipf-like ranking (see module doc)."""
    if skew == 0:
        return params
    rng = np.random.default_rng((seed, 7))
    new = dict(params)
    for i in cfg.moe_layers:
        layer = dict(new[f"layers_{i}"])
        mlp = dict(layer["mlp"])
        kernel = mlp["gate"]["kernel"]  # [H, E]
        rank = rng.permutation(cfg.num_experts) + 1
        scale = (rank.astype(np.float32) ** -skew)
        scale = scale / np.sqrt(np.mean(scale**2))  # keep the mean logit spread
        mlp["gate"] = {"kernel": (np.asarray(kernel, np.float32) * scale).astype(kernel.dtype)}
        layer["mlp"] = mlp
        new[f"layers_{i}"] = layer
    return new


def random_checkpoint(cfg: Qwen3MoeConfig, dtype=jnp.bfloat16, *, seed: int = 0, routing_skew: float = 0.0) -> Checkpoint:
    """A Checkpoint of `cfg`'s shapes with random weights; experts stay on the host, lazily."""
    host = skew_router(random_params(cfg, dtype, seed), cfg, routing_skew, seed)
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    n = len(cfg.moe_layers)
    npd = np_dtype(dtype)
    experts = DenseExperts(
        gate_up=LazyLayers((E, H, 2 * I), n, seed * 2 + 1, npd),
        down=LazyLayers((E, I, H), n, seed * 2 + 2, npd),
    )
    return Checkpoint(
        config=cfg, params=to_device(host), experts=experts, dtype=jnp.dtype(dtype),
        eos_token_ids=(), tokenizer=None, path=Path(f"<random seed {seed}>"),
    )


class RouterShift:
    """Moves the hot set during a run: new router arrays, every other parameter shared."""

    def __init__(self, ckpt: Checkpoint, skew: float):
        self.cfg, self.skew = ckpt.config, skew
        # Undo nothing: re-ranking starts from the current routers' row norms divided out.
        self.base = {
            i: _unit_rows(np.asarray(ckpt.params[f"layers_{i}"]["mlp"]["gate"]["kernel"], np.float32))
            for i in ckpt.config.moe_layers
        }

    def params(self, params: dict, shift: int) -> dict:
        """`params` with the routers of ranking number `shift`."""
        rng = np.random.default_rng((shift, 11))
        new = dict(params)
        for i, base in self.base.items():
            rank = rng.permutation(self.cfg.num_experts) + 1
            scale = rank.astype(np.float32) ** -self.skew
            scale = scale / np.sqrt(np.mean(scale**2))
            old = params[f"layers_{i}"]["mlp"]["gate"]["kernel"]
            kernel = jax.device_put((base * scale).astype(old.dtype), old.sharding)
            new[f"layers_{i}"] = {**params[f"layers_{i}"], "mlp": {**params[f"layers_{i}"]["mlp"], "gate": {"kernel": kernel}}}
        return new


def _unit_rows(kernel: np.ndarray) -> np.ndarray:
    """Router [H, E] with every expert column scaled to the mean column norm."""
    norms = np.linalg.norm(kernel, axis=0)
    return kernel * (norms.mean() / norms)


__all__ = ["PRESETS", "RouterShift", "preset_config", "random_checkpoint", "skew_router"]
