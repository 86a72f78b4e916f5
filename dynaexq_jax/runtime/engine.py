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
from dynaexq_jax.io.loader import Checkpoint
from dynaexq_jax.models.decoder import KVCache, Qwen3Moe
from dynaexq_jax.policies import StaticRuntime
from dynaexq_jax.runtime.sampling import SamplingParams, sample

MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128


class ContextError(UserError):
    """A request does not fit the model's context window."""


def prompt_bucket(n: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def cache_bucket(n: int) -> int:
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


@dataclasses.dataclass
class Session:
    """One conversation (batch 1): its KV cache and the token ids the cache holds, so the
    next turn computes only what is new. Made by `Engine.new_session`."""

    cache: KVCache
    ids: list[int]
    max_chunk: int  # longest prefill chunk: bounds the step's workspace as the memory plan assumes


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


def check_context(cfg, longest: int, new_tokens: int) -> None:
    limit = cfg.max_position_embeddings
    if longest >= limit:
        raise ContextError(f"a prompt has {longest} tokens but the model's context is {limit}; shorten the prompt")
    if longest + new_tokens > limit:
        raise ContextError(
            f"{longest} prompt tokens + {new_tokens} new tokens exceed the model's context of {limit}; "
            f"lower --max-new-tokens to {limit - longest}"
        )


def check_request(cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Validate a generation request; returns the longest prompt's length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token; pass a non-empty prompt")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    check_context(cfg, longest, max_new_tokens)
    return longest


def collect_tokens(first: np.ndarray, max_new_tokens: int, eos, on_tokens, step) -> list[list[int]]:
    """Generated ids per row: `first` [B] (sampled by prefill), then `step(i)` -> the next [B]
    host ids, until every row has produced an EOS (kept) or `max_new_tokens` ids."""
    ids = first
    out = [[] for _ in range(len(first))]
    done = np.zeros(len(first), bool)
    for i in range(max_new_tokens):
        for b in np.flatnonzero(~done):
            out[b].append(int(ids[b]))
            done[b] = ids[b] in eos
        if on_tokens is not None:
            on_tokens(ids)
        if done.all() or i == max_new_tokens - 1:
            break
        ids = step(i)
    return out


def timing_stats(out: list[list[int]], prefilled: np.ndarray, prefill_s: float, decode_s: float) -> dict:
    """The throughput figures every engine reports. `prefilled`: [B] tokens each row prefilled."""
    generated = sum(len(o) for o in out)
    decoded = generated - len(out)  # each row's first token comes from prefill
    return {
        "batch_size": len(out),
        "prompt_tokens": int(prefilled.sum()),
        "generated_tokens": generated,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": float(prefilled.sum()) / prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": decoded / decode_s if decoded else None,
    }


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
        self.workspace_bytes = 0  # XLA's temporaries of the largest compiled step

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
            # What the memory plan's workspace margin must cover; checked in tests, reported.
            self.workspace_bytes = max(self.workspace_bytes, self._compiled[key].memory_analysis().temp_size_in_bytes)
        return self._compiled[key]

    def logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len_i, vocab] (float32) at every position of each token sequence."""
        longest = max(len(s) for s in batch)
        check_context(self.cfg, longest, 0)
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
        longest = check_request(self.cfg, prompts, max_new_tokens)
        eos = set(self.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        B = len(prompts)
        P = prompt_bucket(longest)
        S = cache_bucket(P + max_new_tokens)
        tokens, positions, valid = left_pad(prompts, P)
        lengths = np.array([len(p) for p in prompts], np.int32)
        knobs = sampling.as_arrays()
        key = jax.random.key(sampling.seed)

        rt = self.runtime
        runtime_before = rt.stats()
        cache = KVCache.empty(self.cfg, B, S, self.checkpoint.dtype)
        prefill_args = (self.params, rt.experts, cache, tokens, positions, valid, key) + knobs
        prefill = self._compile("prefill", self._step, *prefill_args)
        decode = self._compile_decode(cache, B, key, knobs)

        t0 = time.perf_counter()
        nxt, cache, counts, hi = prefill(*prefill_args)
        nxt_host = np.asarray(nxt)
        prefill_s = time.perf_counter() - t0
        trace = _Trace(np.asarray(counts), float(hi), runtime_before)
        rt.observe(trace.counts, int(lengths.sum()))
        out, cache, decode_s = self._decode(decode, nxt, nxt_host, cache, lengths, max_new_tokens, key, knobs, eos, on_tokens, trace)
        return self._generation(out, lengths, prefill_s, decode_s, trace)

    def new_session(self, context: int, max_chunk: int) -> Session:
        """An empty conversation of up to `context` tokens (rounded up to the cache bucket),
        whose turns are prefilled in chunks of at most `max_chunk` tokens (a power of two)."""
        if max_chunk < 1 or max_chunk & (max_chunk - 1):
            raise ValueError(f"max_chunk must be a power of two, got {max_chunk}")
        return Session(KVCache.empty(self.cfg, 1, cache_bucket(context), self.checkpoint.dtype), [], max_chunk)

    def chat_turn(
        self,
        session: Session,
        ids: Sequence[int],
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> Generation:
        """Generate the reply to `ids`, the whole conversation so far (batch 1), reusing the
        session's KV cache for the longest prefix it already holds.

        Only the tokens after that prefix are prefilled. A template that rewrites an earlier
        turn (Qwen3 drops past thinking) rewinds the cache to where the token ids part, so the
        model always sees exactly `ids`. The greedy reply equals `generate([ids])`'s.
        """
        ids = [int(t) for t in ids]
        if not ids:
            raise UserError("a chat turn needs at least one token")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_context(self.cfg, len(ids), max_new_tokens)
        if len(ids) + max_new_tokens > session.cache.length:
            raise ContextError(
                f"the conversation has {len(ids)} tokens + {max_new_tokens} new, over the session's context of "
                f"{session.cache.length}; start with a larger --context or a shorter --max-new-tokens"
            )
        eos = set(self.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        knobs = sampling.as_arrays()
        key = jax.random.key(sampling.seed)
        rt = self.runtime
        # Keep at least the last token to prefill: its logits give the first reply token.
        keep = min(_common_prefix(session.ids, ids), len(ids) - 1)
        # Rewinding is moving the write index: slots past it still hold old keys and values,
        # but every slot a query can see (up to its own) is rewritten before it is read.
        cache = session.cache.replace(index=jnp.int32(keep))
        session.ids = []  # the cache is donated below; an interrupted turn must not reuse it
        chunks = _chunks(len(ids) - keep, session.max_chunk)
        steps = []
        start = keep
        for n in chunks:
            args = (self.params, rt.experts, cache, np.asarray([ids[start : start + n]], np.int32),
                    np.arange(start, start + n, dtype=np.int32)[None], np.ones((1, n), bool), key) + knobs
            steps.append(self._compile("prefill", self._step, *args))
            start += n
        decode = self._compile_decode(cache, 1, key, knobs)

        t0 = time.perf_counter()
        trace = _Trace(np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts)), 0.0, self.runtime.stats())
        start = keep
        for n, step in zip(chunks, steps):
            rt.before_step()
            nxt, cache, counts, hi = step(
                self.params, rt.experts, cache, np.asarray([ids[start : start + n]], np.int32),
                np.arange(start, start + n, dtype=np.int32)[None], np.ones((1, n), bool), key, *knobs,
            )
            counts = np.asarray(counts)
            trace.add(counts, float(hi))
            rt.observe(counts, n)
            start += n
        nxt_host = np.asarray(nxt)
        prefill_s = time.perf_counter() - t0
        lengths = np.array([len(ids)], np.int32)
        out, cache, decode_s = self._decode(decode, nxt, nxt_host, cache, lengths, max_new_tokens, key, knobs, eos, on_tokens, trace)
        session.cache = cache
        session.ids = ids + out[0][:-1]  # the last reply token is sampled but not yet in the cache
        gen = self._generation(out, np.array([len(ids) - keep], np.int32), prefill_s, decode_s, trace)
        gen.stats["reused_tokens"] = keep
        return gen

    def _compile_decode(self, cache, B, key, knobs):
        one = np.ones((B, 1), bool)
        args = (self.params, self.runtime.experts, cache, np.zeros((B, 1), np.int32), np.zeros((B, 1), np.int32), one, key)
        return self._compile("decode", self._step, *args + knobs)

    def _decode(self, decode, nxt, nxt_host, cache, lengths, max_new_tokens, key, knobs, eos, on_tokens, trace):
        """The decode loop after a prefill that sampled `nxt`: -> (ids per row, cache, seconds)."""
        rt = self.runtime
        B = len(lengths)
        one = np.ones((B, 1), bool)

        def step(i):
            nonlocal nxt, cache
            rt.before_step()
            step_key = jax.random.fold_in(key, i + 1)
            nxt, cache, counts, hi = decode(
                self.params, rt.experts, cache, nxt[:, None], (lengths + i)[:, None], one, step_key, *knobs
            )
            counts = np.asarray(counts)
            trace.add(counts, float(hi))
            rt.observe(counts, B)
            return np.asarray(nxt)

        t1 = time.perf_counter()
        out = collect_tokens(nxt_host, max_new_tokens, eos, on_tokens, step)
        return out, cache, time.perf_counter() - t1

    def _generation(self, out, prefilled, prefill_s, decode_s, trace) -> Generation:
        """`prefilled`: [B] tokens each row prefilled."""
        stats = {
            **timing_stats(out, prefilled, prefill_s, decode_s),
            "compile_s": self.compile_s,
            "workspace_measured_bytes": self.workspace_bytes,
            "hi_hit_rate": trace.hi_pairs / trace.pairs if trace.pairs else None,
            "peak_device_bytes": peak_device_bytes(),
        }
        after = self.runtime.stats()
        for k in RUNTIME_COUNTERS:
            if k in after:
                after[k] -= trace.runtime_before[k]
        stats.update(after)
        return Generation(tokens=out, stats=stats, expert_counts=trace.counts)


# Runtime counters that accumulate over an engine's life; a request reports its own share.
RUNTIME_COUNTERS = ("promotions", "demotions", "h2d_bytes", "transfer_wait_s", "failed_promotions")


class _Trace:
    """Routing totals over one request: pair counts [moe_layers, E] and high-precision pairs,
    and the runtime's counters when the request started."""

    def __init__(self, counts: np.ndarray, hi_pairs: float, runtime_stats: dict):
        self.counts = counts.copy()
        self.pairs = float(counts.sum())
        self.hi_pairs = hi_pairs
        self.runtime_before = runtime_stats

    def add(self, counts: np.ndarray, hi_pairs: float) -> None:
        self.counts += counts
        self.pairs += float(counts.sum())
        self.hi_pairs += hi_pairs


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chunks(n: int, max_chunk: int) -> list[int]:
    """Split `n` tokens into power-of-two chunks of at most `max_chunk`, largest first: no
    padding enters the cache, and each chunk size compiles once."""
    sizes = []
    while n:
        size = min(max_chunk, 1 << (n.bit_length() - 1))
        sizes.append(size)
        n -= size
    return sizes
