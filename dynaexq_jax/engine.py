"""Batched, KV-cached generation with jitted prefill and decode steps.

Shapes are bucketed: prompts are left-padded to a power-of-two length and the cache to a
multiple of `CACHE_BUCKET`, so a decode step compiles once per (batch, cache length) and is
then reused for every token. Steps are compiled ahead of time, so their compile time is
reported apart from the run time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.loader import Checkpoint
from dynaexq_jax.model import KVCache, Qwen3Moe
from dynaexq_jax.policies import StaticRuntime
from dynaexq_jax.sampling import SamplingParams, sample

MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128


class ContextError(UserError):
    """A request does not fit the model's context window."""


def prompt_bucket(n: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def cache_bucket(n: int) -> int:
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (EOS included when generated)
    stats: dict
    expert_counts: np.ndarray  # [moe_layers, experts] routed pairs of real tokens, whole run


def left_pad(batch: Sequence[Sequence[int]], length: int):
    """-> tokens, positions, valid: [B, length] with each sequence right-aligned."""
    B = len(batch)
    tokens = np.zeros((B, length), np.int32)
    valid = np.zeros((B, length), bool)
    for b, seq in enumerate(batch):
        if len(seq):
            tokens[b, length - len(seq) :] = seq
            valid[b, length - len(seq) :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, valid


def peak_device_bytes() -> int | None:
    """The allocator's peak on the default device; None where the backend reports none (CPU)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


class Engine:
    """Runs a loaded checkpoint. `runtime` (see `policies`) owns the expert pytree each step
    uses; by default every expert as loaded, unchanging."""

    def __init__(self, checkpoint: Checkpoint, runtime=None):
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.params = checkpoint.params
        self.runtime = runtime or StaticRuntime(checkpoint.experts)
        self.model = Qwen3Moe(self.cfg, checkpoint.dtype)
        self._compiled: dict[tuple, Callable] = {}
        self.compile_s = 0.0

        def forward(params, experts, cache, tokens, positions, valid, last_only=False):
            return self.model.apply({"params": params}, tokens, positions, valid, cache, experts, last_only)

        def step(params, experts, cache, tokens, positions, valid, key, temperature, top_k, top_p):
            logits, cache, trace = forward(params, experts, cache, tokens, positions, valid, last_only=True)
            nxt = sample(logits[:, -1], key, temperature, top_k, top_p)
            return nxt, cache, trace["counts"], experts.hi_pairs(trace["counts"])

        self._forward = jax.jit(forward)
        self._step = jax.jit(step, donate_argnums=(2,))

    def _compile(self, name: str, fn, *args):
        key = (name,) + tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[2:]))
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    def _check_context(self, longest: int, new_tokens: int):
        limit = self.cfg.max_position_embeddings
        if longest >= limit:
            raise ContextError(f"a prompt has {longest} tokens but the model's context is {limit}; shorten the prompt")
        if longest + new_tokens > limit:
            raise ContextError(
                f"{longest} prompt tokens + {new_tokens} new tokens exceed the model's context of {limit}; "
                f"lower --max-new-tokens to {limit - longest}"
            )

    def logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len_i, vocab] (float32) at every position of each token sequence."""
        longest = max(len(s) for s in batch)
        self._check_context(longest, 0)
        P = prompt_bucket(longest)
        tokens, positions, valid = left_pad(batch, P)
        cache = KVCache.empty(self.cfg, len(batch), P, self.checkpoint.dtype)
        args = (self.params, self.runtime.experts, cache, tokens, positions, valid)
        logits, _, _ = self._compile("forward", self._forward, *args)(*args)
        logits = np.asarray(logits)
        return [logits[b, P - len(s) :] for b, s in enumerate(batch)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> Generation:
        """Generate for a batch of token-id prompts. `on_tokens([B] ids)` is called per step."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token; pass a non-empty prompt")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = set(self.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        B, longest = len(prompts), max(len(p) for p in prompts)
        self._check_context(longest, max_new_tokens)
        P = prompt_bucket(longest)
        S = cache_bucket(P + max_new_tokens)
        tokens, positions, valid = left_pad(prompts, P)
        lengths = np.array([len(p) for p in prompts], np.int32)
        knobs = sampling.as_arrays()
        key = jax.random.key(sampling.seed)

        rt = self.runtime
        cache = KVCache.empty(self.cfg, B, S, self.checkpoint.dtype)
        prefill_args = (self.params, rt.experts, cache, tokens, positions, valid, key) + knobs
        prefill = self._compile("prefill", self._step, *prefill_args)
        one = np.ones((B, 1), bool)
        decode_args = (self.params, rt.experts, cache, np.zeros((B, 1), np.int32), lengths[:, None], one, key)
        decode = self._compile("decode", self._step, *decode_args + knobs)

        t0 = time.perf_counter()
        nxt, cache, counts, hi = prefill(*prefill_args)
        nxt_host = np.asarray(nxt)
        prefill_s = time.perf_counter() - t0
        counts = np.asarray(counts)
        pairs, hi_pairs = float(counts.sum()), float(hi)
        total_counts = counts.copy()
        rt.observe(counts, int(lengths.sum()))

        out = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            for b in np.flatnonzero(~done):
                out[b].append(int(nxt_host[b]))
                done[b] = nxt_host[b] in eos
            if on_tokens is not None:
                on_tokens(nxt_host)
            if done.all() or step == max_new_tokens - 1:
                break
            rt.before_step()
            step_key = jax.random.fold_in(key, step + 1)
            nxt, cache, counts, hi = decode(
                self.params, rt.experts, cache, nxt[:, None], (lengths + step)[:, None], one, step_key, *knobs
            )
            nxt_host, counts = np.asarray(nxt), np.asarray(counts)
            pairs += float(counts.sum())
            hi_pairs += float(hi)
            total_counts += counts
            rt.observe(counts, B)
        decode_s = time.perf_counter() - t1

        generated = sum(len(o) for o in out)
        decoded = generated - B  # each prompt's first token comes from prefill
        stats = {
            "batch_size": B,
            "prompt_tokens": int(lengths.sum()),
            "generated_tokens": generated,
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": float(lengths.sum()) / prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": decoded / decode_s if decoded else None,
            "compile_s": self.compile_s,
            "hi_hit_rate": hi_pairs / pairs if pairs else None,
            "peak_device_bytes": peak_device_bytes(),
        }
        stats.update(rt.stats())
        return Generation(tokens=out, stats=stats, expert_counts=total_counts)
