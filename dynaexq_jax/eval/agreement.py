"""How far one run's next-token distributions are from a reference run's on the same tokens:
the mean KL divergence and the top-1 agreement (float64 on the host)."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Mean KL(ref || got) of next-token distributions, and top-1 agreement, over the positions
    of each pair of [tokens, vocab] logits."""
    kl, agree, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        lr, lg = log_softmax(r.astype(np.float64)), log_softmax(g.astype(np.float64))
        kl += float((np.exp(lr) * (lr - lg)).sum())
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return kl / n, agree / n
