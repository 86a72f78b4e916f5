"""Next-token selection: greedy, or temperature / top-k / top-p sampling.

Greedy decoding (temperature 0, or top-k 1) is a static choice of the step: an argmax, with no
vocabulary sort. Otherwise the knobs are arrays, not Python constants, so changing them never
recompiles a step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -(2**63) <= self.seed < 2**63:  # what jax.random.key takes
            raise UserError(f"seed must fit in 64 bits (-2**63 <= seed < 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def as_arrays(self):
        """(temperature, top_k, top_p) as device scalars, the traced knobs of `sample`."""
        return tuple(jax.device_put(v) for v in (np.float32(self.temperature), np.int32(self.top_k),
                                                  np.float32(self.top_p)))


NON_FINITE = -1  # the token of a row whose logits hold NaN or Inf: for the host to raise on, never to print


def flag_non_finite(logits, tokens):
    """`tokens` [B] with NON_FINITE where a row of `logits` [B, V] is not all finite: argmax of
    NaN is token 0, often EOS, so a broken model would otherwise end its reply looking fine."""
    return jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), tokens, NON_FINITE)


def sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] float32 -> token ids [B] int32 (temperature 0 still gives the argmax)."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    kth = jnp.take(desc, jnp.clip(top_k - 1, 0, V - 1), axis=-1)[:, None]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
