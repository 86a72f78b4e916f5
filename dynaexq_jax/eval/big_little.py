"""Thresholds of big-little routing for a target little share, measured on sample text.

A rule's threshold is a kept share (`models.big_little`); which share of tokens clears it
depends on the model and the text. `thresholds` runs the plain model once on sample
sequences, reads every (MoE layer, token)'s kept share from the routing it records, and
returns per target share the threshold that marks that share of them little: under "first"
the quantile of the first MoE layer's shares (tokens), under "router" of all layers'
(token-layers). The share a run then reaches on other text is measured, not assumed: see
the engine's `big_little` stats (`little_columns` sums them up over runs). The flags live in
`launch.options` (`BigLittleOptions`, `BigLittleSweep`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.models.big_little import RULES


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Big-little settings of an evaluation or benchmark sweep: one run per target share."""

    little_k: int | None  # None: half the model's experts per token
    rule: str
    floor: float
    shares: tuple[float, ...]  # target little shares; 0 is the plain run


def kept_shares(engine, seqs: Sequence[Sequence[int]], little_k: int) -> np.ndarray:
    """[moe_layers, real tokens] kept share of each token at each MoE layer, on `engine`
    (an `Engine`: the decoder's routing is read in one pass)."""
    from dynaexq_jax.models.decoder import KVCache
    from dynaexq_jax.runtime.engine import batch_bucket, left_pad, prompt_bucket

    P = prompt_bucket(max(len(s) for s in seqs))
    tokens, positions, valid = left_pad(seqs, P, batch_bucket(len(seqs)))
    cache = KVCache.empty(engine.cfg, *tokens.shape, engine.checkpoint.dtype)
    chosen = jax.jit(lambda p, e, c, t, pos, v: engine.decoder(p, e, c, t, pos, v, fresh=True)[2].chosen)(
        engine.params, engine.policy.experts, cache, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    chosen = np.asarray(chosen)[:, valid.reshape(-1)]  # [L, N, E]: -1 where not chosen
    k = engine.cfg.experts_per_token
    top = -np.sort(-chosen, axis=-1)[..., :k]  # the chosen probabilities, best first
    return top[..., :little_k].sum(-1) / np.maximum(top.sum(-1), np.finfo(np.float32).tiny)


def thresholds(engine, seqs: Sequence[Sequence[int]], little_k: int, rule: str,
               shares: Sequence[float]) -> dict[float, float]:
    """{target little share: threshold} (share 0: inf, no token little)."""
    if rule not in RULES:
        raise UserError(f"importance rule {rule!r} is not one of {', '.join(RULES)}")
    for s in shares:
        if not 0.0 <= s <= 1.0:
            raise UserError(f"little share {s} is not between 0 and 1; give shares like 0,0.25,0.5,0.75")
    scores = kept_shares(engine, seqs, little_k)
    scores = scores[0] if rule == "first" else scores.reshape(-1)
    # Shares tie at 1.0 (a dropped expert with no mass); a quantile sitting on a tie marks all of it.
    return {s: math.inf if s == 0 else float(np.quantile(scores, 1.0 - s, method="higher")) for s in shares}


def little_columns(runs: Sequence[dict]) -> dict:
    """Big-little's measured share and savings over generations' stats (medians over the runs;
    None for plain runs), per token the run computed (prompt and generated)."""
    if "big_little" not in runs[0]:
        return {"little_share": None, "pairs_saved_per_token": None, "expert_bytes_saved_per_token": None}
    med = lambda k: statistics.median(r["big_little"][k] / r["big_little"]["tokens"] for r in runs)
    return {"little_share": statistics.median(r["big_little"]["little_share"] for r in runs),
            "pairs_saved_per_token": med("pairs_saved"), "expert_bytes_saved_per_token": med("bytes_saved")}
