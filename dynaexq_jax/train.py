"""Training a Qwen3-MoE from scratch: initialisation, loss, a jitted AdamW step, evaluation.

Parameters are trained in float32 (the CPU has no fast bf16) and exported in bf16 with
`hf_export.save_checkpoint`. Differentiation is w.r.t. both the non-expert Flax params and
the `DenseExperts` pytree.

Loss = next-token cross-entropy over valid (input, target) pairs
     + `lb_coef` * load-balancing loss (Switch Transformer style):
       num_experts * sum_e f_e * P_e, averaged over MoE layers, where f_e is the share of
       routed (token, expert) pairs that went to e and P_e the mean router probability of e
       over valid tokens. It is 1.0 under perfectly uniform routing. f comes from the
       non-differentiable top-k counts; the gradient flows through P. (transformers'
       `load_balancing_loss_func` normalises f per top-k slot instead, so its uniform value
       is `experts_per_token`, not 1.)
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynaexq_jax.models.config import Qwen3MoeConfig
from dynaexq_jax.experts.expert_state import DenseExperts
from dynaexq_jax.models.decoder import KVCache, Qwen3Moe

INIT_STD = 0.02  # transformers' Qwen3MoeConfig.initializer_range
BLOCK_ROWS = 64  # rows per expert block in BlockedExperts


@flax.struct.dataclass
class BlockedExperts(DenseExperts):
    """The same expert arrays as `DenseExperts`, with a training-friendly `ffn`.

    `jax.lax.ragged_dot` (what `DenseExperts.ffn` uses) is lowered on the CPU into dense
    per-group dots, ~E times the work, forward and backward. Here the sorted (token, expert)
    pairs are padded per expert to whole blocks of `BLOCK_ROWS` rows, each block gathers its
    expert's weights and one batched matmul does all blocks (MegaBlocks-style). Exact: no
    pair is dropped, padding rows are zero; results equal `DenseExperts.ffn` up to float
    rounding.
    """

    def ffn(self, moe_layer: int, x, expert_ids, weights):
        wgu, wd = self.gate_up[moe_layer], self.down[moe_layer]
        E = wgu.shape[0]
        T, k = expert_ids.shape
        P, b = T * k, BLOCK_ROWS
        nb = -(-P // b) + E  # static bound on sum_e ceil(size_e / b)
        flat = expert_ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sorted_e = flat[order]
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        padded = -(-sizes // b) * b
        pad_start = jnp.cumsum(padded) - padded
        start = jnp.cumsum(sizes) - sizes
        dest = pad_start[sorted_e] + jnp.arange(P, dtype=jnp.int32) - start[sorted_e]  # [P] row in blocks
        token_of = order // k
        xs = jnp.zeros((nb * b, x.shape[-1]), x.dtype).at[dest].set(x[token_of], unique_indices=True)
        block_e = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb, dtype=jnp.int32) * b, side="right")
        block_e = jnp.minimum(block_e, E - 1)  # blocks past the last group hold zero rows only
        h = jnp.einsum("nbh,nhf->nbf", xs.reshape(nb, b, -1), wgu[block_e].astype(x.dtype))
        g, u = jnp.split(h, 2, axis=-1)
        y = jnp.einsum("nbi,nih->nbh", jax.nn.silu(g) * u, wd[block_e].astype(x.dtype)).reshape(nb * b, -1)
        y = y[dest] * weights.reshape(-1)[order][:, None].astype(y.dtype)
        return jnp.zeros_like(x).at[token_of].add(y.astype(x.dtype))


def _path_key(key, path) -> jax.Array:
    """A key per parameter, from its path name (stable whatever the tree's leaf order)."""
    name = jax.tree_util.keystr(path)
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def init_params(cfg: Qwen3MoeConfig, seed: int, std: float = INIT_STD) -> tuple[dict, DenseExperts]:
    """Deterministic float32 (params, experts) from a seed.

    Like transformers' `_init_weights` for Qwen3-MoE: every linear kernel, the embedding and
    the router ~ N(0, std); RMSNorm weights = 1; expert weights ~ N(0, std). (Flax's own
    defaults differ: nn.Dense is lecun_normal, std 1/sqrt(fan_in); nn.Embed std 1/sqrt(H).)
    """
    key = jax.random.key(seed)
    model = Qwen3Moe(cfg, jnp.float32)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    n_moe = len(cfg.moe_layers)
    zeros = DenseExperts(
        gate_up=tuple(jnp.zeros((E, H, 2 * I)) for _ in range(n_moe)),
        down=tuple(jnp.zeros((E, I, H)) for _ in range(n_moe)),
    )
    tokens = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(key, tokens, tokens, tokens > -1, KVCache.empty(cfg, 1, 2, jnp.float32), zeros)
    )["params"]

    def leaf(path, s):
        last = getattr(path[-1], "key", None)
        if last == "weight":  # RMSNorm
            return jnp.ones(s.shape, s.dtype)
        return std * jax.random.normal(_path_key(key, path), s.shape, s.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    ekey = jax.random.fold_in(key, 0x5EED)
    experts = BlockedExperts(
        gate_up=tuple(std * jax.random.normal(jax.random.fold_in(ekey, 2 * m), (E, H, 2 * I)) for m in range(n_moe)),
        down=tuple(std * jax.random.normal(jax.random.fold_in(ekey, 2 * m + 1), (E, I, H)) for m in range(n_moe)),
    )
    return params, experts


def load_balancing_loss(counts: jax.Array, probs: jax.Array, num_tokens: jax.Array) -> jax.Array:
    """num_experts * sum_e f_e * P_e, averaged over layers. counts, probs: [layers, E].

    counts: routed pairs per expert (any scale; normalised to shares f); probs: router
    probabilities summed over `num_tokens` valid tokens (P = probs / num_tokens).
    """
    E = counts.shape[-1]
    counts = jax.lax.stop_gradient(counts)
    f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    P = probs / jnp.maximum(num_tokens, 1.0)
    return jnp.mean(E * jnp.sum(f * P, axis=-1))


def forward(model: Qwen3Moe, params, experts, tokens, valid):
    """Training forward over [B, T] tokens from position 0 -> (logits [B, T, V], trace)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = KVCache.empty(model.cfg, B, T, model.dtype)
    logits, _, trace = model.apply({"params": params}, tokens, positions, valid, cache, experts)
    return logits, trace


def token_nll(model, params, experts, batch, valid):
    """batch, valid: [B, T+1]. -> (nll [B, T] of each next token, pair mask [B, T], trace)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, trace = forward(model, params, experts, inputs, valid[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    mask = (valid[:, :-1] & valid[:, 1:]).astype(jnp.float32)
    return nll * mask, mask, trace


def loss_fn(params, experts, model, batch, valid, lb_coef: float):
    nll, mask, trace = token_nll(model, params, experts, batch, valid)
    ce = jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0)
    n_tokens = jnp.sum(valid[:, :-1].astype(jnp.float32))
    lb = load_balancing_loss(trace["counts"], trace["probs"], n_tokens)
    return ce + lb_coef * lb, {"ce": ce, "lb": lb}


def _global_norm(tree):
    tree_ns = getattr(optax, "tree", None)  # optax.global_norm is deprecated in newer optax
    return tree_ns.norm(tree) if tree_ns is not None and hasattr(tree_ns, "norm") else optax.global_norm(tree)


class TrainState(NamedTuple):
    params: dict
    experts: DenseExperts
    opt_state: optax.OptState
    step: jax.Array


def make_optimizer(lr: float, total_steps: int, warmup_steps: int | None = None, weight_decay: float = 0.1,
                   clip: float = 1.0, min_lr_ratio: float = 0.1) -> optax.GradientTransformation:
    """AdamW (b2 0.95) with linear warmup then cosine decay to `min_lr_ratio * lr`, global-norm clipping.

    Weight decay applies to matrices only (not to RMSNorm weights).
    """
    if warmup_steps is None:
        warmup_steps = max(1, min(200, total_steps // 20))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio
    )
    decay_mask = lambda tree: jax.tree.map(lambda a: a.ndim >= 2, tree)
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
    )


def init_state(params, experts, optimizer) -> TrainState:
    return TrainState(params, experts, optimizer.init((params, experts)), jnp.zeros((), jnp.int32))


def make_train_step(cfg: Qwen3MoeConfig, optimizer, lb_coef: float = 0.01):
    """-> jitted step(state, batch [B, T+1] int32, valid [B, T+1] bool) -> (state, metrics)."""
    model = Qwen3Moe(cfg, jnp.float32)

    def step(state: TrainState, batch, valid):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, aux), grads = grad_fn(state.params, state.experts, model, batch, valid, lb_coef)
        updates, opt_state = optimizer.update(grads, state.opt_state, (state.params, state.experts))
        params, experts = optax.apply_updates((state.params, state.experts), updates)
        metrics = {"loss": loss, "grad_norm": _global_norm(grads), **aux}
        return TrainState(params, experts, opt_state, state.step + 1), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(cfg: Qwen3MoeConfig, dtype=jnp.float32):
    """-> jitted eval(params, experts, batch, valid) -> (summed nll, pair count, counts [layers, E])."""
    model = Qwen3Moe(cfg, dtype)

    def ev(params, experts, batch, valid):
        nll, mask, trace = token_nll(model, params, experts, batch, valid)
        return jnp.sum(nll), jnp.sum(mask), trace["counts"]

    return jax.jit(ev)


def evaluate(eval_step, params, experts, windows: np.ndarray, batch_size: int):
    """Mean next-token NLL over [N, T+1] windows (all valid) and routed pair counts."""
    total, count, counts = 0.0, 0.0, None
    for i in range(0, len(windows), batch_size):
        b = windows[i : i + batch_size]
        valid = np.ones(b.shape, bool)
        if len(b) < batch_size:  # pad to a fixed shape (one compile); padded rows are invalid
            pad = batch_size - len(b)
            b = np.concatenate([b, np.zeros((pad, b.shape[1]), b.dtype)])
            valid = np.concatenate([valid, np.zeros((pad, b.shape[1]), bool)])
        s, n, c = eval_step(params, experts, b, valid)
        total += float(s)
        count += float(n)
        counts = np.asarray(c) if counts is None else counts + np.asarray(c)
    return total / max(count, 1.0), count, counts


__all__ = [
    "BLOCK_ROWS",
    "BlockedExperts",
    "INIT_STD",
    "TrainState",
    "evaluate",
    "init_params",
    "init_state",
    "load_balancing_loss",
    "loss_fn",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
]
