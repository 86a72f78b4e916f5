"""Training a Qwen3-MoE from scratch: initialisation, loss, a jitted AdamW step, evaluation.

Parameters are trained in float32 (the CPU has no fast bf16) and exported in bf16 with
`hf_export.save_checkpoint` (experts through `host_experts`). Differentiation is w.r.t. both
the decoder's parameter tree and the `TrainExperts` pytree; the decoder runs with
`blocked_ffn` as its expert FFN.

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

from dynaexq_jax.errors import UserError
from dynaexq_jax.experts.expert_state import HostExperts
from dynaexq_jax.experts.matmul import swiglu
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.models.layers import Routing, mm

INIT_STD = 0.02  # transformers' Qwen3MoeConfig.initializer_range
BLOCK_ROWS = 64  # rows per expert block in `blocked_ffn`


@flax.struct.dataclass
class TrainExperts:
    """Every MoE layer's expert weights, stacked: the trainable expert pytree."""

    gate_up: jax.Array  # [L_moe, E, H, 2I] (gate columns first, then up)
    down: jax.Array  # [L_moe, E, I, H]


def host_experts(experts: TrainExperts) -> HostExperts:
    """Host numpy copies, one array per MoE layer: what `hf_export.save_checkpoint` takes."""
    return HostExperts(gate_up=list(np.asarray(experts.gate_up)), down=list(np.asarray(experts.down)))


def _block_layout(expert_ids, token_valid, num_experts: int, num_blocks: int):
    """Where each routed pair goes among blocks of `BLOCK_ROWS` rows, one expert per block.

    -> order [P] (pairs sorted by expert), dest [P] (row of each sorted pair; pairs of invalid
    tokens get distinct rows past the last block, so writes drop them and reads fill zeros),
    block_expert [num_blocks] (blocks past the last used one hold zero rows only).
    """
    E, b = num_experts, BLOCK_ROWS
    # Pairs of invalid tokens form an extra group E, sorted after every expert.
    keys = jnp.where(token_valid[:, None], expert_ids, E).reshape(-1)  # [P]
    order = jnp.argsort(keys, stable=True)
    sorted_keys = keys[order]
    sizes = jnp.bincount(keys, length=E + 1).astype(jnp.int32)  # [E+1]
    start = jnp.cumsum(sizes) - sizes  # [E+1] first sorted position of each group
    padded = -(-sizes[:E] // b) * b  # [E] rows each expert takes, whole blocks
    padded_end = jnp.cumsum(padded)
    pad_start = jnp.concatenate([padded_end - padded, jnp.full((1,), num_blocks * b, jnp.int32)])
    rank = jnp.arange(keys.shape[0], dtype=jnp.int32) - start[sorted_keys]  # position within its group
    dest = pad_start[sorted_keys] + rank
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * b
    block_expert = jnp.searchsorted(padded_end, block_start, side="right", method="compare_all")
    return order, dest, jnp.minimum(block_expert, E - 1)


def blocked_ffn(experts: TrainExperts, moe_layer, x, expert_ids, weights, token_valid, residual, activation=swiglu):
    """A differentiable expert FFN for the decoder (the `ExpertFFN` signature).

    x [T, H]; expert_ids, weights [T, k]; token_valid [T]; residual [T, H]; `moe_layer` may be
    traced (the decoder's layer scan). -> residual + sum_j weights_j * expert_j(x) [T, H];
    pairs of invalid tokens add nothing.

    `jax.lax.ragged_dot` is lowered on the CPU into dense per-group dots, ~E times the work,
    forward and backward, and the inference FFN's tile loop has a data-dependent trip count
    (not reverse-differentiable). Here the sorted pairs are padded per expert to whole blocks,
    each block gathers its expert's weights and one batched matmul does all blocks
    (MegaBlocks-style). Exact: no valid pair is dropped, padding rows are zero.
    """
    E = experts.gate_up.shape[1]
    T, k = expert_ids.shape
    b = BLOCK_ROWS
    nb = -(-T * k // b) + E  # static bound on sum_e ceil(size_e / b)
    order, dest, block_expert = _block_layout(expert_ids, token_valid, E, nb)
    token_of = order // k  # [P] token of each sorted pair
    xs = jnp.zeros((nb * b, x.shape[-1]), x.dtype).at[dest].set(x[token_of], mode="drop", unique_indices=True)
    wgu = experts.gate_up[moe_layer, block_expert].astype(x.dtype)  # [nb, H, 2I]: one gather, no layer copy
    wd = experts.down[moe_layer, block_expert].astype(x.dtype)  # [nb, I, H]
    h = mm(xs.reshape(nb, b, -1), wgu, "nbh,nhf->nbf")
    y = mm(activation(h), wd, "nbi,nih->nbh").reshape(nb * b, -1)
    y = y.at[dest].get(mode="fill", fill_value=0) * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return residual.at[token_of].add(y.astype(residual.dtype))


def _path_key(key, path) -> jax.Array:
    """A key per parameter, from its path name (stable whatever the tree's leaf order)."""
    name = jax.tree_util.keystr(path)
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _is_norm(path) -> bool:
    """RMSNorm weights (incl. the fused q/k norm) are the leaves named "weight"."""
    return getattr(path[-1], "key", None) == "weight"


def init_params(cfg: ModelConfig, seed: int, std: float = INIT_STD) -> tuple[dict, TrainExperts]:
    """Deterministic float32 (params, experts) from a seed.

    Like transformers' `_init_weights` for Qwen3-MoE: every linear kernel, the embedding and
    the router ~ N(0, std); RMSNorm weights = 1; expert weights ~ N(0, std). (Flax's own
    defaults differ: nn.Dense is lecun_normal, std 1/sqrt(fan_in); nn.Embed std 1/sqrt(H).)
    Fused q|k|v kernels are i.i.d. N(0, std) like their three parts.
    """
    key = jax.random.key(seed)
    shapes = Decoder(cfg, jnp.float32).param_shapes()

    def leaf(path, s):
        if _is_norm(path):
            return jnp.ones(s.shape, s.dtype)
        return std * jax.random.normal(_path_key(key, path), s.shape, s.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    L, E, H, I = len(cfg.moe_layers), cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    ekey = jax.random.fold_in(key, 0x5EED)
    experts = TrainExperts(
        gate_up=std * jax.random.normal(jax.random.fold_in(ekey, 0), (L, E, H, 2 * I)),
        down=std * jax.random.normal(jax.random.fold_in(ekey, 1), (L, E, I, H)),
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


def training_decoder(cfg: ModelConfig, dtype=jnp.float32) -> Decoder:
    """The decoder on `TrainExperts`, also returning the summed router probabilities."""
    if cfg.expert_bias:
        raise UserError(f"training does not support {cfg.model_type}'s expert biases; train a model without them "
                        "(e.g. qwen3_moe)")
    return Decoder(cfg, dtype, ffn=blocked_ffn, router_probs=True, kernels=False)


def routed_counts(routing: Routing) -> jax.Array:
    """[moe_layers, E] float32: routed (real token, expert) pairs per expert."""
    return jnp.sum(routing.chosen >= 0, axis=1, dtype=jnp.float32)


def forward(model: Decoder, params, experts, tokens, valid):
    """Training forward over [B, T] tokens from position 0 -> (logits [B, T, V], Routing)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = KVCache.empty(model.cfg, B, T, model.dtype)
    logits, _, routing = model(params, experts, cache, tokens, positions, valid)
    return logits, routing


def token_nll(model, params, experts, batch, valid):
    """batch, valid: [B, T+1]. -> (nll [B, T] of each next token, pair mask [B, T], Routing)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, routing = forward(model, params, experts, inputs, valid[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    mask = (valid[:, :-1] & valid[:, 1:]).astype(jnp.float32)
    return nll * mask, mask, routing


def loss_fn(params, experts, model, batch, valid, lb_coef: float):
    nll, mask, routing = token_nll(model, params, experts, batch, valid)
    ce = jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0)
    n_tokens = jnp.sum(valid[:, :-1].astype(jnp.float32))
    lb = load_balancing_loss(routed_counts(routing), routing.router_probs, n_tokens)
    return ce + lb_coef * lb, {"ce": ce, "lb": lb}


def _global_norm(tree):
    tree_ns = getattr(optax, "tree", None)  # optax.global_norm is deprecated in newer optax
    return tree_ns.norm(tree) if tree_ns is not None and hasattr(tree_ns, "norm") else optax.global_norm(tree)


class TrainState(NamedTuple):
    params: dict
    experts: TrainExperts
    opt_state: optax.OptState
    step: jax.Array


def _decay_mask(tree):
    # By name, not rank: stacked per segment, a layer's norm weights are [layers, H] matrices.
    return jax.tree_util.tree_map_with_path(lambda path, a: not _is_norm(path), tree)


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
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay, mask=_decay_mask),
    )


def init_state(params, experts, optimizer) -> TrainState:
    return TrainState(params, experts, optimizer.init((params, experts)), jnp.zeros((), jnp.int32))


def make_train_step(cfg: ModelConfig, optimizer, lb_coef: float = 0.01):
    """-> jitted step(state, batch [B, T+1] int32, valid [B, T+1] bool) -> (state, metrics)."""
    model = training_decoder(cfg)

    def step(state: TrainState, batch, valid):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, aux), grads = grad_fn(state.params, state.experts, model, batch, valid, lb_coef)
        updates, opt_state = optimizer.update(grads, state.opt_state, (state.params, state.experts))
        params, experts = optax.apply_updates((state.params, state.experts), updates)
        metrics = {"loss": loss, "grad_norm": _global_norm(grads), **aux}
        return TrainState(params, experts, opt_state, state.step + 1), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(cfg: ModelConfig, dtype=jnp.float32):
    """-> jitted eval(params, experts, batch, valid) -> (summed nll, pair count, counts [layers, E])."""
    model = training_decoder(cfg, dtype)

    def ev(params, experts, batch, valid):
        nll, mask, routing = token_nll(model, params, experts, batch, valid)
        return jnp.sum(nll), jnp.sum(mask), routed_counts(routing)

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
    "INIT_STD",
    "TrainExperts",
    "TrainState",
    "blocked_ffn",
    "evaluate",
    "forward",
    "host_experts",
    "init_params",
    "init_state",
    "load_balancing_loss",
    "loss_fn",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "routed_counts",
    "training_decoder",
]
