"""Big-little routing (MoBiLE): unimportant tokens run the same MoE with fewer experts.

A "big" token keeps its router's top-k experts; a "little" token keeps only its top
`little_k` of them. Shapes never change: a little token's other k - little_k pairs are masked
(weight 0 and not valid), so `experts.matmul.routed_ffn` sorts them past every tile (no rows,
no weight reads), the offload policy is never asked for their experts (no transfers), and the
routing statistics, hotness included, count only the pairs that were computed.

The evidence is the router's own: a token's *kept share* at a layer is the router
probability of its top `little_k` experts over that of its top k (in [little_k/k, 1]; 1 means
the dropped experts carried nothing). Importance rules (`BigLittle.rule`):

  "router"  per layer: little where this layer's kept share >= `threshold`.
  "first"   once per token: its kept share at the first MoE layer, reused by every layer, so
            the mode of every later layer is known before that layer's router runs (what a
            prefetcher plans with).

Fallback: a token marked little whose kept share at a layer is below `floor` (the little
model would drop real mass there) is computed big at that layer. Under "router" a token is
marked only where its share reaches the threshold, so with floor <= threshold it never falls
back.

Weights of a little token follow the family's routing with top-`little_k`: renormalised to sum
to 1 where the family renormalises its top-k (`norm_topk_prob`: Qwen3-MoE, Mixtral), the
router's own probabilities where it does not (OLMoE, Qwen2-MoE without it), and for
Phi-3.5-MoE's sparsemixer the first pick's own gate (its second pick never changes the first).

`BigLittle` is static configuration (a frozen, hashable dataclass): a step compiled with it is
a distinct program from the plain step, and promotions and swaps between steps never retrace.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import flax.struct
import jax
import jax.numpy as jnp

from dynaexq_jax.errors import UserError

RULES = ("router", "first")


@dataclasses.dataclass(frozen=True)
class BigLittle:
    """The knobs: little tokens keep `little_k` experts; `rule` and `threshold` decide which
    tokens are little (kept share >= threshold; above 1 marks none); `floor` is the fallback."""

    little_k: int
    rule: str = "router"
    threshold: float = 0.7  # about a quarter of the shipped model's token-layers at little_k = k/2
    floor: float = 0.0

    def __post_init__(self):
        if self.rule not in RULES:
            raise UserError(f"importance rule {self.rule!r} is not one of {', '.join(RULES)}; pass --importance "
                            f"{RULES[0]} or {RULES[1]}")
        if not isinstance(self.little_k, int) or self.little_k < 1:
            raise UserError(f"--little-k must be a positive integer, got {self.little_k!r}")
        if not math.isfinite(self.threshold) and self.threshold != math.inf:
            raise UserError(f"--little-threshold must be a number (inf marks no token little), got {self.threshold}")
        if not 0.0 <= self.floor <= 1.0:
            raise UserError(f"--little-floor is a kept share between 0 and 1, got {self.floor}")

    def checked(self, experts_per_token: int) -> "BigLittle":
        """This setting for a model routing `experts_per_token` experts per token."""
        if self.little_k > experts_per_token:
            raise UserError(f"--little-k {self.little_k} is more than the model's {experts_per_token} experts per "
                            f"token; pass --little-k between 1 and {experts_per_token}")
        return self


@flax.struct.dataclass
class LittleRouting:
    """One MoE layer's big-little decisions, kept for the statistics (stacked over layers like
    `layers.Routing`)."""

    marked: jax.Array  # [..., T] bool real tokens the rule marked little at this layer
    fallback: jax.Array  # [..., T] bool ... computed big after all (kept share below the floor)
    dropped_pairs: jax.Array  # [...] int32 routed pairs of real tokens not computed
    skipped: jax.Array  # [..., E] bool experts only dropped pairs chose: weights not read


def kept_share(probs, top_i, little_k: int):
    """probs [T, E] router softmax, top_i [T, k] best first -> [T] float32 share of the top-k
    probability held by the top `little_k`."""
    p = jnp.take_along_axis(probs, top_i, axis=-1)
    return jnp.sum(p[:, :little_k], -1) / jnp.maximum(jnp.sum(p, -1), jnp.finfo(jnp.float32).tiny)


def little_weights(cfg, top_p, little_k: int):
    """A little token's combine weights [T, k] (zero past `little_k`), the family's way."""
    kept = jnp.where(jnp.arange(top_p.shape[-1]) < little_k, top_p, 0)
    if cfg.router == "softmax_topk" and cfg.norm_topk_prob:
        return kept / jnp.sum(kept, axis=-1, keepdims=True)
    if cfg.router == "sigmoid_topk" and cfg.norm_topk_prob:  # to the routed scaling, as the router's own weights
        return kept / jnp.sum(kept, axis=-1, keepdims=True) * cfg.routed_scaling_factor
    return kept


def choose(cfg, bl: BigLittle, probs, top_p, top_i, token_valid, first, is_first):
    """Apply big-little routing to one MoE layer's choice.

    probs [T, E], top_p, top_i [T, k] (`layers.route`'s), token_valid [T]; first [T]: the
    tokens' kept share at the first MoE layer (anything when `is_first`, a traced bool: this
    is the first MoE layer and sets it). -> (pair_valid [T, k], weights [T, k], first [T],
    LittleRouting)."""
    chex.assert_rank((probs, top_p, top_i, token_valid, first), (2, 2, 2, 1, 1))
    T, k = top_i.shape
    share = kept_share(probs, top_i, bl.little_k)
    first = jnp.where(is_first, share, first)
    score = share if bl.rule == "router" else first
    marked = token_valid & (score >= bl.threshold)
    fallback = marked & (share < bl.floor)
    little = marked & ~fallback
    valid = token_valid[:, None] & ((jnp.arange(k) < bl.little_k) | ~little[:, None])
    if bl.little_k < k:
        top_p = jnp.where(little[:, None], little_weights(cfg, top_p, bl.little_k), top_p)
    E = probs.shape[-1]
    onehot = top_i[:, :, None] == jnp.arange(E)  # [T, k, E]
    wanted = jnp.any(onehot & token_valid[:, None, None], axis=(0, 1))
    read = jnp.any(onehot & valid[:, :, None], axis=(0, 1))
    dropped = jnp.sum(token_valid[:, None] & ~valid, dtype=jnp.int32)
    return valid, top_p, first, LittleRouting(marked, fallback, dropped, wanted & ~read)


def summary(bl: BigLittle, k: int, moe_layers: int, *, tokens: int, marked: int, fallbacks: int, little_tokens: int,
            dropped_pairs: int, bytes_saved: float) -> dict:
    """The engine's `big_little` stats from its counters (token-layers are tokens x MoE layers)."""
    token_layers = tokens * moe_layers
    return {
        "little_k": bl.little_k, "rule": bl.rule, "threshold": bl.threshold, "floor": bl.floor,
        "tokens": tokens,
        "little_tokens": little_tokens,  # marked little at the first MoE layer
        "big_tokens": tokens - little_tokens,
        "little_token_layers": marked - fallbacks,  # computed little
        "big_token_layers": token_layers - marked + fallbacks,
        "fallbacks": fallbacks,  # token-layers marked little, computed big
        "little_share": (marked - fallbacks) / token_layers if token_layers else None,
        "pairs": token_layers * k,  # routed pairs of real tokens the plain mode computes
        "pairs_saved": dropped_pairs,
        "bytes_saved": bytes_saved,  # expert weights not read (at the tier that served them)
    }
