"""Thresholds of big-little routing for a target little share, measured on sample text.

A rule's threshold is a kept share (`models.big_little`); which share of tokens clears it
depends on the model and the text. `thresholds` runs the plain model once on sample
sequences, reads every (MoE layer, token)'s kept share from the routing it records, and
returns per target share the threshold that marks that share of them little: under "first"
the quantile of the first MoE layer's shares (tokens), under "router" of all layers'
(token-layers). The share a run then reaches on other text is measured, not assumed: see
the engine's `big_little` stats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.models.big_little import RULES, BigLittle


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


# ----------------------------------------------------------------------------- command lines


def add_arguments(parser, *, sweep: bool) -> None:
    """The scripts' big-little flags: one setting (generate.py) or a sweep of shares (bench, eval)."""
    g = parser.add_argument_group("big-little routing (MoBiLE: unimportant tokens keep fewer experts)")
    g.add_argument("--big-little", action="store_true",
                   help="route tokens the importance rule marks unimportant to their top --little-k experts only"
                        + (" (adds a row per --little-shares level beside each plain row)" if sweep else ""))
    g.add_argument("--little-k", type=int, help="experts a little token keeps (default: half the model's top-k)")
    g.add_argument("--importance", choices=RULES,
                   help="router (default): per layer, little where the top --little-k hold at least the threshold "
                        "share of the top-k router probability; first: that share at the first MoE layer, reused "
                        "by every layer (prefetch plans with it)")
    if sweep:
        g.add_argument("--little-shares", default="0,0.25,0.5,0.75",
                       help="target shares of little tokens; thresholds calibrated on sample text (0 = plain)")
    else:
        g.add_argument("--little-threshold", type=float,
                       help="kept share from which a token is little (default 0.7; above 1: none)")
    g.add_argument("--little-floor", type=float,
                   help="fallback: a little token whose kept share at a layer is below this is computed big there "
                        "(default 0: never)")


def check_knobs(args) -> None:
    """Before any weight is read: a big-little knob without --big-little is a mistake, not a
    silent no-op, and each knob's value is checked (little_k against the model later)."""
    flags = ("--little-k", "--importance", "--little-threshold", "--little-floor")
    knobs = {f: getattr(args, f.lstrip("-").replace("-", "_"), None) for f in flags}
    if not args.big_little:
        for flag, value in knobs.items():
            if value is not None:
                raise UserError(f"{flag} applies to --big-little; add --big-little or drop {flag}")
        return
    d = BigLittle(1)
    BigLittle(1 if knobs["--little-k"] is None else knobs["--little-k"], knobs["--importance"] or d.rule,
              d.threshold if knobs["--little-threshold"] is None else knobs["--little-threshold"],
              d.floor if knobs["--little-floor"] is None else knobs["--little-floor"])


def from_args(args, experts_per_token: int) -> BigLittle | None:
    """generate.py's setting, checked against the model's top-k."""
    check_knobs(args)
    if not args.big_little:
        return None
    d = BigLittle(1)
    bl = BigLittle(args.little_k if args.little_k is not None else max(1, experts_per_token // 2),
                   args.importance or d.rule, d.threshold if args.little_threshold is None else args.little_threshold,
                   d.floor if args.little_floor is None else args.little_floor)
    return bl.checked(experts_per_token)


def sweep_from_args(args) -> Sweep | None:
    """bench.py's and eval.py's sweep (little_k checked against the model when it is built)."""
    check_knobs(args)
    if not args.big_little:
        return None
    try:
        shares = tuple(float(s) for s in args.little_shares.split(","))
    except ValueError:
        shares = ()
    if not shares or not all(0.0 <= s < 1.0 for s in shares):
        raise UserError(f"--little-shares {args.little_shares!r}: give shares in [0, 1) separated by commas, "
                        "e.g. 0,0.25,0.5,0.75")
    return Sweep(args.little_k, args.importance or BigLittle(1).rule, args.little_floor or 0.0, shares)
