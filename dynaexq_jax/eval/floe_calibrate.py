"""FloE's offline calibration: channel thresholds for a target sparsity, and the early layers'
inter-expert predictor, from calibration text.

Thresholds: the text is run through the `floe` engine at sparsity 0 with the up projections
compressed as they will be served, recording |up(x)| of every routed (token, expert) pair. A
(layer, expert)'s threshold is the `sparsity` quantile of its pairs' |up(x)| over all channels,
so on text like the calibration text that share of its channels falls below it. An expert
the text never routes to gets its layer's median threshold (counted in `unseen_experts`).

Predictor (FloE's inter-expert predictor, early layers): for the first `early_layers` MoE
layers, a one-hidden-layer MLP on the layer's normed hidden state (the input of its experts)
predicting the next MoE layer's experts (multi-label, sigmoid cross-entropy), trained with
optax Adam on the same text. Later layers use the next layer's own router on the current
hidden state (the paper's choice, and `prefetch`'s). Recall of the top-k guess against the
experts actually chosen is measured on the last fifth of the recorded tokens (held out), for
the MLP and for the router rule side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynaexq_jax.errors import UserError
from dynaexq_jax.eval.evaluate import _batches, calibration_sequences
from dynaexq_jax.policies.floe import FloeOptions
from dynaexq_jax.runtime import engine as engine_lib
from dynaexq_jax.runtime.build import build_engine


def text_sha(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode() + b"\0")
    return h.hexdigest()


@dataclasses.dataclass
class Recording:
    """Per MoE layer: |up(x)| samples per expert, and per real token its hidden state and experts."""

    absu: list[dict[int, list[np.ndarray]]]
    hidden: list[list[np.ndarray]]  # [moe_layers] of [tokens, H] chunks
    experts: list[list[np.ndarray]]  # [moe_layers] of [tokens, k] chunks
    max_pairs: int
    pairs_seen: np.ndarray  # [L, E]

    def __call__(self, m, u, top_i, valid, hn):
        k = top_i.shape[-1]
        tokens = valid.reshape(-1, k)[:, 0]
        self.hidden[m].append(np.asarray(hn, np.float32).reshape(-1, hn.shape[-1])[tokens])
        self.experts[m].append(top_i.reshape(-1, k)[tokens])
        flat, ok = top_i.reshape(-1), valid.reshape(-1)
        a = np.abs(u)
        for e in np.unique(flat[ok]):
            rows = a[ok & (flat == e)]
            self.pairs_seen[m, e] += len(rows)
            kept = sum(len(r) for r in self.absu[m].setdefault(int(e), []))
            if kept < self.max_pairs:  # the first `max_pairs` pairs per expert bound host memory
                self.absu[m][int(e)].append(rows[: self.max_pairs - kept])


def record(ckpt, docs: Sequence[str], opts: FloeOptions, *, window: int = 256, batch_size: int = 8,
           max_pairs: int = 4096) -> Recording:
    seqs = calibration_sequences(ckpt.tokenizer, docs, ckpt.eos_token_ids, window)
    if not seqs:
        raise UserError("the calibration text holds no tokens; pass a JSONL of {\"text\"} or a text file")
    length = engine_lib.prompt_bucket(max(map(len, seqs)))
    plain = dataclasses.replace(opts, sparsity=0.0, thresholds=None)
    engine, _ = build_engine(ckpt, "floe", budget=None, batch=batch_size, longest_prompt=length, max_new_tokens=1,
                             floe=plain)
    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    rec = Recording([{} for _ in range(L)], [[] for _ in range(L)], [[] for _ in range(L)], max_pairs,
                    np.zeros((L, E), np.int64))
    engine.policy.recorder = rec
    for idx in _batches(list(range(len(seqs))), batch_size):
        engine.logits([seqs[i] for i in idx])
    return rec


def thresholds(rec: Recording, sparsity: float) -> tuple[np.ndarray, int]:
    """[L, E] float32 thresholds, and how many experts the text never routed to."""
    L, E = rec.pairs_seen.shape
    thr = np.full((L, E), np.nan, np.float32)
    for m in range(L):
        for e, chunks in rec.absu[m].items():
            thr[m, e] = np.quantile(np.concatenate(chunks).reshape(-1), sparsity)
    unseen = int(np.isnan(thr).sum())
    for m in range(L):
        row = thr[m]
        row[np.isnan(row)] = np.nanmedian(row) if np.isfinite(row).any() else 0.0
    return thr, unseen


# ------------------------------------------------------------------------------ predictor


def _mlp(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _recall(scores: np.ndarray, target: np.ndarray, k: int) -> float:
    guess = np.argsort(-scores, axis=-1)[:, :k]
    hits = (guess[:, :, None] == target[:, None, :]).any(-1).sum()
    return float(hits / target.size)


def train_predictor(rec: Recording, router: Callable[[int, np.ndarray], np.ndarray], num_experts: int, *,
                    early_layers: int, hidden: int = 256, steps: int = 300, lr: float = 3e-3,
                    seed: int = 0) -> tuple[dict, dict]:
    """MLPs for MoE layers [0, early_layers) predicting layer m + 1's experts from layer m's
    hidden state. `router(m + 1, x)` -> the next layer's router logits [T, E] (the baseline).
    -> (params {"layer{m}": {w1, b1, w2, b2}}, {"layer{m}": {"mlp_recall", "router_recall"}})."""
    opt = optax.adam(lr)

    @jax.jit
    def step(p, state, x, y):
        g = jax.grad(lambda p: optax.sigmoid_binary_cross_entropy(_mlp(p, x), y).mean())(p)
        upd, state = opt.update(g, state, p)
        return optax.apply_updates(p, upd), state

    params, report = {}, {}
    L = len(rec.hidden)
    for m in range(min(early_layers, L - 1)):
        x = np.concatenate(rec.hidden[m]).astype(np.float32)
        tgt = np.concatenate(rec.experts[m + 1])
        k = tgt.shape[-1]
        y = np.zeros((len(tgt), num_experts), np.float32)
        np.put_along_axis(y, tgt, 1.0, axis=-1)
        split = max(1, int(0.8 * len(x)))
        xt, yt = jnp.asarray(x[:split]), jnp.asarray(y[:split])
        key1, key2 = jax.random.split(jax.random.key(seed + m))
        H = x.shape[-1]
        p = {"w1": jax.random.normal(key1, (H, hidden)) / np.sqrt(H), "b1": jnp.zeros(hidden),
             "w2": jax.random.normal(key2, (hidden, num_experts)) / np.sqrt(hidden), "b2": jnp.zeros(num_experts)}
        state = opt.init(p)
        for _ in range(steps):
            p, state = step(p, state, xt, yt)
        xh, th = x[split:], tgt[split:]
        report[f"layer{m}"] = {"mlp_recall": _recall(np.asarray(_mlp(p, jnp.asarray(xh))), th, k),
                               "router_recall": _recall(router(m + 1, xh), th, k), "held_out_tokens": len(xh)}
        params[f"layer{m}"] = {n: np.asarray(v, np.float32) for n, v in p.items()}
    return params, report


def router_fn(ckpt) -> Callable[[int, np.ndarray], np.ndarray]:
    """MoE layer m's router logits for hidden states x [T, H], from the checkpoint's params."""
    cfg = ckpt.config
    where = [(s, j) for s, seg in enumerate(cfg.segments) for j in range(seg.count)]

    def logits(m, x):
        s, j = where[cfg.moe_layers[m]]
        gate = ckpt.params["layers"][s]["mlp"]["gate"]
        out = x @ np.asarray(gate["kernel"][j], np.float32)
        return out + np.asarray(gate["bias"][j], np.float32) if "bias" in gate else out

    return logits
