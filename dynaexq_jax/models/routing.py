"""Sigmoid routing with a score-correction bias and group-limited top-k (DeepSeek-V3, GLM-4.5,
MiniMax-M2), beside the softmax routers in `layers.route`.

Each expert's score is sigmoid(logit). The choice adds a learned per-expert bias to the scores
(`e_score_correction_bias`, which balances the load without entering the weights); with
n_group > 1 the experts are split into n_group equal groups, each group rated by the sum of its
two best biased scores, and only the topk_group best groups compete. The k chosen experts are
weighted by their unbiased scores, renormalised to sum to 1 if norm_topk_prob (plus 1e-20, as
released), times routed_scaling_factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dynaexq_jax.models.config import ModelConfig


def sigmoid_topk(cfg: ModelConfig, logits, correction):
    """logits [T, E], correction [E] (float32) -> scores [T, E] (float32: what routing
    statistics record), top_p, top_i [T, k] (the chosen experts, best choice first, and their
    combine weights)."""
    T, E = logits.shape
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + correction.astype(jnp.float32)
    if cfg.n_group > 1:
        G = cfg.n_group
        best_two = jax.lax.top_k(choice.reshape(T, G, E // G), 2)[0]  # [T, G, 2]
        _, groups = jax.lax.top_k(jnp.sum(best_two, -1), cfg.topk_group)  # [T, topk_group]
        kept = jnp.any(groups[:, :, None] == jnp.arange(G), axis=1)  # [T, G]
        choice = jnp.where(jnp.repeat(kept, E // G, axis=1), choice, -jnp.inf)
    _, top_i = jax.lax.top_k(choice, cfg.experts_per_token)
    top_p = jnp.take_along_axis(scores, top_i, axis=-1)
    if cfg.norm_topk_prob:
        top_p = top_p / (jnp.sum(top_p, axis=-1, keepdims=True) + 1e-20)
    return scores, top_p * cfg.routed_scaling_factor, top_i
