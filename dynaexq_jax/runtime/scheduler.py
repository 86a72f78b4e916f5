"""Continuous batching: a fixed number of sequence slots that requests join and leave between steps.

The slots are the rows of one KV cache, [layers, 2, max_batch, KVH, context, D], planned in the
budget with the engine (`build_engine(batch=max_batch, ...)`). Each row is its own sequence:
its tokens sit at slots 0.. of the row, its write index is its own (`KVCache.index` [B]), so a
row that joins never moves the others. One loop, on its own thread:

- a request waits in a bounded queue (`QueueFull` past it) until a row is free;
- its prompt is prefilled into its row in chunks of `max_chunk` tokens (the first one left-padded
  to its bucket), at most `max_chunk` prompt tokens per decode step of the rows already
  generating, so a long prompt never stalls them (with no row generating, every waiting prompt
  at once); the last chunk samples its first token and the row joins the next step;
- one decode step advances every generating row; a row leaves when it samples an end-of-sequence
  id or reaches its `max_tokens` (decided on the device), when it samples one of its own stop ids
  or its consumer says stop (a stop string; both decided on the host, the step already in flight
  for it wasted), or when it is cancelled (a client gone, a drain's deadline): then its row is
  free for the next request.

Every shape is fixed (rows, context) or bucketed (chunks: powers of two >= 16), so joining and leaving
never compile anything new once each chunk size has run (`warm_up` compiles them all). As in
`Engine.generate`, step i+1 is dispatched before step i's tokens are read, in one read; routing
statistics of all traffic are read every `policy.observe_every` steps, so hotness is learned from
every request together. Greedy rows equal `Engine.generate` of the same prompt alone; a seeded
sampled row draws what the engine draws for it alone (the same key per step, the same shapes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.models.decoder import KVCache
from dynaexq_jax.runtime.engine import (
    MIN_PROMPT_BUCKET,
    ContextError,
    Engine,
    NonFiniteError,
    RoutingStats,
    _setup,
    cache_bucket,
    left_pad,
    prompt_bucket,
    stop_array,
)
from dynaexq_jax.runtime.sampling import NON_FINITE, SamplingParams, flag_non_finite, sample


class QueueFull(UserError):
    """Every slot is busy and the queue is full."""


class Closed(UserError):
    """The scheduler is draining or stopped: it takes no new request."""


@flax.struct.dataclass
class SlotState:
    """Each row's generation, all on the device; a request's knobs are set when it joins."""

    tokens: jax.Array  # [B] int32 last sampled token (the next step's input)
    positions: jax.Array  # [B] int32 position, and cache slot, the next token takes
    rows: jax.Array  # [B] bool rows generating
    generated: jax.Array  # [B] int32 tokens sampled so far
    logprob: jax.Array  # [B] float32 log-probability of `tokens` under the model (temperature 1)
    max_tokens: jax.Array  # [B] int32
    temperature: jax.Array  # [B] float32 (0: greedy)
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    seed: jax.Array  # [B] uint32

    @classmethod
    def empty(cls, rows: int) -> "SlotState":
        i, f = jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.float32)
        return cls(i, i, jnp.zeros((rows,), bool), i, f, i, f, i, jnp.ones((rows,), jnp.float32),
                   jnp.zeros((rows,), jnp.uint32))


def _pick(logits, temperature, top_k, top_p, seed, step, stop, greedy: bool):
    """logits [B, V] -> (tokens [B], whether each row stops, their log-probabilities [B]). Each
    row samples with its own key, `fold_in(key(seed), step)`, as `Engine.generate` does alone."""
    if greedy:
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        def one(row, t, k, p, s, i):  # the engine's keys: the seed's for the prompt, folded with the step after
            key = jax.random.key(s)
            key = jax.lax.cond(i > 0, lambda: jax.random.fold_in(key, i), lambda: key)
            return sample(row[None], key, t, k, p)[0]

        nxt = jax.vmap(one)(logits, temperature, top_k, top_p, seed, step)
    nxt = flag_non_finite(logits, nxt)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.maximum(nxt, 0)[:, None], axis=-1)[:, 0]
    return nxt, jnp.any(nxt[:, None] == stop[None, :], axis=1) | (nxt == NON_FINITE), logp


def _decode(decoder, params, experts, cache, stats, state: SlotState, stop, *, greedy, big_little=None):
    """One token for every generating row."""
    valid = state.rows[:, None]
    logits, new, routing = decoder(params, experts, cache, state.tokens[:, None], state.positions[:, None], valid,
                                   last_only=True, big_little=big_little)
    # A row not generating keeps its write index: a joining row's prefill continues there, and
    # what this step wrote at it is rewritten before any query reads it.
    new = new.replace(index=jnp.where(state.rows, new.index, cache.index))
    nxt, stopped, logp = _pick(logits[:, -1], state.temperature, state.top_k, state.top_p, state.seed,
                               state.generated, stop, greedy)
    on = state.rows
    generated = state.generated + on
    state = state.replace(tokens=jnp.where(on, nxt, state.tokens), positions=state.positions + on,
                          rows=on & ~stopped & (generated < state.max_tokens), generated=generated,
                          logprob=jnp.where(on, logp, state.logprob))
    return new, stats.add(routing, valid, experts), state


def _prefill(decoder, params, experts, cache, stats, state: SlotState, stop, tokens, ints, floats, *, greedy,
             big_little=None):
    """A chunk of one row's prompt. tokens [1, T], left-padded (only a prompt's first chunk has
    padding); ints [8] int32: row, the chunk's first cache slot, the position of its first real
    token, its padding tokens, whether it is the prompt's last chunk, max_tokens, top_k, seed (its
    bits); floats [2]: temperature, top_p. The last chunk samples the row's first token and sets
    the row generating."""
    row, slot, pos, lead, last, max_tokens, top_k, seed = (ints[i] for i in range(8))
    temperature, top_p = floats[0], floats[1]
    T = tokens.shape[1]
    at = jnp.arange(T, dtype=jnp.int32)[None]
    valid = at >= lead
    positions = jnp.maximum(pos + at - lead, 0)
    start = jnp.where(slot == 0, cache.length, cache.start[row])  # a new sequence holds nothing yet
    # Linear-attention states ([layers, B, ...]) are the row's own; a new sequence starts from zeros.
    state_of = lambda a: None if a is None else jnp.where(
        slot == 0, jnp.zeros((), a.dtype), jax.lax.dynamic_slice_in_dim(a, row, 1, axis=1))
    put_state = lambda a, v: None if a is None else jax.lax.dynamic_update_slice_in_dim(a, v, row, axis=1)
    sub = KVCache(kv=jax.lax.dynamic_slice_in_dim(cache.kv, row, 1, axis=2), start=start[None], index=slot,
                  conv=state_of(cache.conv), recurrent=state_of(cache.recurrent))
    logits, sub, routing = decoder(params, experts, sub, tokens, positions, valid, last_only=True,
                                   big_little=big_little)
    cache = KVCache(kv=jax.lax.dynamic_update_slice_in_dim(cache.kv, sub.kv, row, axis=2),
                    start=cache.start.at[row].set(sub.start[0]), index=cache.index.at[row].set(slot + T),
                    conv=put_state(cache.conv, sub.conv), recurrent=put_state(cache.recurrent, sub.recurrent))
    seed = jax.lax.bitcast_convert_type(seed, jnp.uint32)
    nxt, stopped, logp = _pick(logits[:, -1], temperature[None], top_k[None], top_p[None], seed[None],
                               jnp.zeros((1,), jnp.int32), stop, greedy)
    last = last > 0
    put = lambda a, v: a.at[row].set(v)
    state = state.replace(
        tokens=put(state.tokens, nxt[0]), positions=put(state.positions, pos + T - lead),
        rows=put(state.rows, last & ~stopped[0] & (max_tokens > 1)),
        generated=put(state.generated, last.astype(jnp.int32)), logprob=put(state.logprob, logp[0]),
        max_tokens=put(state.max_tokens, max_tokens), temperature=put(state.temperature, temperature),
        top_k=put(state.top_k, top_k), top_p=put(state.top_p, top_p), seed=put(state.seed, seed),
    )
    return cache, stats.add(routing, valid, experts), state


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of a prompt to prefill: `ids[start:stop]` at cache slot `slot`, after `lead` padding tokens."""

    start: int
    stop: int
    slot: int
    lead: int

    @property
    def size(self) -> int:
        return self.lead + self.stop - self.start


def plan_chunks(n: int, max_chunk: int) -> list[Chunk]:
    """A prompt of `n` tokens as chunks of `max_chunk`, the remainder first, left-padded to its
    bucket (a power of two >= 16): every chunk after it is full, and a row compiles one step per
    bucket size, never one per prompt length."""
    first = n - max_chunk * ((n - 1) // max_chunk)  # 1..max_chunk
    size = min(prompt_bucket(first), max_chunk)
    chunks = [Chunk(0, first, 0, size - first)]
    while chunks[-1].stop < n:
        prev = chunks[-1]
        chunks.append(Chunk(prev.stop, prev.stop + max_chunk, prev.slot + prev.size, 0))
    return chunks


def _release(state: SlotState, keep):
    """Stop the rows not in `keep` [B] bool (their requests ended on the host)."""
    return state.replace(rows=state.rows & keep)


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's generation. `on_update(seq)` is called on the scheduler's thread after new
    tokens and once at the end (`finish_reason` set); it returns True to end the sequence early
    (a stop string). `stop_token_ids`: this sequence's own stop ids, beside the scheduler's
    end-of-sequence ids. `cancel(reason)` (any thread) frees its row at the next step."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    on_update: Callable[["Sequence"], bool] | None = None
    stop_token_ids: frozenset[int] = frozenset()
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # "stop" (an end-of-sequence id, a stop id or string), "length", "error", or cancel()'s reason:
    # "cancelled" (the client went away), "abort" (a drain ran out of time)
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop id of `stop_token_ids` that ended it
    error: Exception | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    cancelled: str | None = None  # cancel()'s reason, until the scheduler ends the sequence with it
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancelled = self.cancelled or reason


@dataclasses.dataclass
class _Slot:
    seq: Sequence
    chunks: collections.deque  # (offset, size) of the prompt still to prefill
    decoding: bool = False


class Histogram:
    """Observations counted into cumulative buckets, as Prometheus histograms are."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # observations <= each bound
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclasses.dataclass
class Counters:
    """What the scheduler has done since it started (read by /metrics)."""

    requests: int = 0
    finished: dict = dataclasses.field(default_factory=lambda: collections.Counter())
    decode_steps: int = 0
    shared_decode_steps: int = 0  # decode steps that advanced more than one sequence
    decode_rows: int = 0  # sequence-steps decoded (sum of generating rows over steps)
    prefill_chunks: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: Histogram = dataclasses.field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    token_s: Histogram = dataclasses.field(default_factory=lambda: Histogram(LATENCY_BUCKETS))  # per request, mean
    window_s: float = 10.0
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)  # (time, tokens) in the window

    def add_tokens(self, now: float, n: int) -> None:
        self.generated_tokens += n
        self.recent.append((now, n))
        self.tokens_per_s(now)

    def tokens_per_s(self, now: float) -> float:
        """Tokens generated per second over the last `window_s`."""
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / self.window_s


def engine_shape(*, max_batch: int, context: int, max_chunk: int) -> dict:
    """`build_engine`'s sizing keywords for a scheduler: its plan holds `max_batch` rows of
    `slots_for(context, max_chunk)` cache slots, and a prefill chunk's workspace."""
    return {"batch": max_batch, "longest_prompt": max_chunk, "max_new_tokens": context}


def slots_for(context: int, max_chunk: int) -> int:
    """Cache slots a row holds for sequences of `context` tokens: a first chunk's padding
    included, as `build.plan_for` plans a prompt of `max_chunk` tokens followed by `context`."""
    return cache_bucket(prompt_bucket(max_chunk) + context)


class Scheduler:
    """Continuous batching over `engine` (built with `engine_shape(...)` of the same sizes, so
    the budget holds the rows' cache) with `max_batch` rows of `context` tokens. `start()` runs
    the loop on a thread; `submit` queues a `Sequence` (raises `QueueFull` past `max_queue`
    waiting); `drain()` takes no new one (`Closed`), `abort()` ends every one still queued or
    running, `close()` drains and stops."""

    def __init__(self, engine: Engine, *, max_batch: int, context: int, max_chunk: int = 64, max_queue: int = 64,
                 eos_token_ids=None):
        if not isinstance(engine, Engine):
            raise UserError("continuous batching runs the engine's own steps; the offload, prefetch and floe "
                            "policies run layer by layer: serve with --policy dynaexq, static or full")
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        if max_chunk < 1 or max_chunk & (max_chunk - 1):
            raise UserError(f"the prefill chunk must be a power of two, got {max_chunk}")
        if not 2 <= context <= engine.cfg.max_position_embeddings:
            raise ContextError(f"a sequence's context must be in 2..{engine.cfg.max_position_embeddings} tokens "
                               f"(the model's), got {context}")
        self.engine, self.max_batch, self.max_chunk, self.max_queue = engine, max_batch, max_chunk, max_queue
        self.context = slots_for(context, max_chunk)
        self.limit = min(context, engine.cfg.max_position_embeddings)  # prompt + new tokens of one sequence
        self.eos = set(engine.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.counters = Counters()
        self._queue: collections.deque[Sequence] = collections.deque()
        self._slots: list[_Slot | None] = [None] * max_batch
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        eng = engine
        self._decode_fn = jax.jit(functools.partial(_decode, eng.decoder), static_argnames=("greedy", "big_little"),
                                  donate_argnums=(2,))
        self._prefill_fn = jax.jit(functools.partial(_prefill, eng.decoder), static_argnames=("greedy", "big_little"),
                                   donate_argnums=(2,))
        self._release_fn = jax.jit(_release)
        with _setup():
            self.cache = KVCache.empty(eng.cfg, max_batch, self.context, eng.checkpoint.dtype).replace(
                index=jnp.zeros((max_batch,), jnp.int32))
            self.state = SlotState.empty(max_batch)
            self.stats = eng._stats0()
            self.stop = stop_array(self.eos)
        self._released = False  # rows ended on the host since the last step: the device must stop them
        self._prepared = False
        self._seen = None  # routing statistics (host) at the last observation
        self._since = 0  # steps since then (a prompt token counts as one)

    # ------------------------------------------------------------------ requests
    def check(self, seq: Sequence) -> None:
        """Whether `seq` can ever run here (raises `UserError` saying why not)."""
        if not seq.ids:
            raise UserError("the prompt has no tokens; send a non-empty prompt")
        if seq.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {seq.max_tokens}")
        if max(seq.ids) >= self.engine.cfg.vocab_size or min(seq.ids) < 0:
            raise UserError(f"token ids must be in [0, {self.engine.cfg.vocab_size})")
        if not 0 <= seq.sampling.top_k < 2**31:  # a row's knobs are int32 on the device
            raise UserError(f"top_k must be in [0, 2**31), got {seq.sampling.top_k}")
        if len(seq.ids) + seq.max_tokens > self.limit:
            raise ContextError(f"{len(seq.ids)} prompt tokens + {seq.max_tokens} new tokens exceed the server's "
                               f"context of {self.limit} tokens per sequence; shorten the prompt or lower max_tokens")

    def submit(self, seq: Sequence) -> Sequence:
        self.check(seq)
        with self._cv:
            if self._closing:
                raise Closed("the server is shutting down; retry on another instance")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"all {self.max_batch} sequence slots are busy and {len(self._queue)} requests are "
                                "queued; retry later")
            self._queue.append(seq)
            self.counters.requests += 1
            self._cv.notify()
        return seq

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def compiled_steps(self) -> int:
        """Steps the engine has compiled (the scheduler's and its own): flat once warmed up."""
        return len(self.engine._compiled)

    # ------------------------------------------------------------------ life
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="dynaexq-scheduler", daemon=True)
        self._thread.start()
        return self

    def drain(self) -> None:
        """Take no new request (`submit` raises `Closed`); the queued and running ones go on, and
        the loop stops when none is left."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def abort(self, reason: str = "abort") -> None:
        """End every queued and running sequence at the next step, `finish_reason` `reason`."""
        with self._cv:
            for seq in list(self._queue) + [s.seq for s in self._slots if s is not None]:
                seq.cancel(reason)
            self._cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no new request, finish the queued and running ones, then stop the loop."""
        self.drain()
        if self._thread is not None:
            self._thread.join(timeout)

    def warm_up(self) -> None:
        """Compile every step the loop can run (decode and each chunk size, greedy and sampled),
        so no request waits on a compile."""
        for greedy in (True, False):
            self._step("decode", greedy)
            size = min(MIN_PROMPT_BUCKET, self.max_chunk)
            while size <= self.max_chunk:
                self._step("prefill", greedy, size)
                size *= 2

    def _step(self, name: str, greedy: bool, size: int = 0):
        eng = self.engine
        args = (eng.params, eng.policy.experts, self.cache, self.stats, self.state, self.stop)
        if name == "decode":
            return eng._compile("serve_decode", self._decode_fn, *args, greedy=greedy)
        chunk = (jax.ShapeDtypeStruct((1, size), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32),
                 jax.ShapeDtypeStruct((2,), jnp.float32))
        return eng._compile("serve_prefill", self._prefill_fn, *args, *chunk, greedy=greedy)

    def _run(self) -> None:
        eng = self.engine
        try:
            # (state, stats, [(row, seq)]) of the last dispatched step, read after the next is dispatched
            pending = None
            while True:
                with self._cv:
                    while not (pending or self._queue or self.running) and not self._closing:
                        self._cv.wait()
                    if self._closing and not (pending or self._queue or self.running):
                        break
                    first = self._queue[0].ids if self._queue and not self._prepared else None
                if first is not None:  # outside the lock: submitting never waits on this
                    self._prepare(first)
                self._admit()
                emitters = self._dispatch()
                if pending is not None:
                    self._collect(*pending)
                pending = (self.state, self.stats, emitters) if emitters else None
        except BaseException as e:  # a broken step: fail every request rather than hang it
            self.error = e
            with self._cv:
                self._closing = True
                waiting = list(self._queue) + [s.seq for s in self._slots if s is not None]
                self._queue.clear()
                self._slots = [None] * self.max_batch
            for seq in waiting:
                seq.error = e if isinstance(e, UserError) else RuntimeError(f"the engine failed: {e!r}")
                self._finish(seq, "error")
        finally:
            eng.policy.after_request()

    def _prepare(self, ids: list[int]) -> None:
        """Before the first step: the policy fills what must be resident; one with nothing to go
        on routes the first request's prompt on its fallbacks, as `Engine.generate` does."""
        eng = self.engine
        host = left_pad([ids], prompt_bucket(len(ids)), 1)
        with _setup():
            eng.policy.prepare(lambda: eng._routing_of(eng._run_score(host)))
        self._prepared = True

    # ------------------------------------------------------------------ one step
    def _admit(self) -> None:
        with self._cv:
            for seq in [seq for seq in self._queue if seq.cancelled]:  # gone while waiting
                self._queue.remove(seq)
                self._finish(seq, seq.cancelled)
            for row, slot in enumerate(self._slots):
                if slot is None and self._queue:
                    seq = self._queue.popleft()
                    self._slots[row] = _Slot(seq, collections.deque(plan_chunks(len(seq.ids), self.max_chunk)))

    def _dispatch(self) -> list:
        """Release ended rows, run one decode step and up to `max_chunk` prompt tokens of prefill.
        -> the (row, sequence) pairs whose next token the new state holds."""
        eng = self.engine
        emitters = []
        keep = np.array([s is not None and s.decoding and not s.seq.cancelled for s in self._slots])
        for row, slot in enumerate(self._slots):
            if slot is not None and slot.seq.cancelled:
                self._free(row, slot.seq.cancelled)
        decoding = [(row, s.seq) for row, s in enumerate(self._slots) if s is not None and s.decoding]
        if self._released:
            with _setup():
                self.state = self._release_fn(self.state, jax.device_put(keep))
            self._released = False
        if decoding:
            greedy = all(seq.sampling.greedy for _, seq in decoding)
            eng.policy.between_steps()
            step = self._step("decode", greedy)
            self.cache, self.stats, self.state = step(eng.params, eng.policy.experts, self.cache, self.stats,
                                                      self.state, self.stop)
            emitters += decoding
            c = self.counters
            c.decode_steps += 1
            c.decode_rows += len(decoding)
            c.shared_decode_steps += len(decoding) > 1
            self._since += 1
        # Prompt tokens this step: a chunk between decode steps, every waiting prompt when none decodes.
        budget = self.max_chunk if decoding else self.max_chunk * self.max_batch
        waiting = [(row, s) for row, s in enumerate(self._slots) if s is not None and s.chunks]
        for row, slot in sorted(waiting, key=lambda rs: rs[1].seq.submitted):  # first come, first prefilled
            while slot.chunks and slot.chunks[0].size <= budget:
                chunk = slot.chunks.popleft()
                budget -= chunk.size
                seq, last = slot.seq, not slot.chunks
                s = seq.sampling
                with _setup():
                    tokens = np.zeros((1, chunk.size), np.int32)
                    tokens[0, chunk.lead:] = seq.ids[chunk.start:chunk.stop]
                    seed = np.array(s.seed % 2**32, np.uint32).view(np.int32)  # the key's bits, as jax.random.key(seed)
                    ints = np.array([row, chunk.slot, chunk.start, chunk.lead, last, seq.max_tokens, s.top_k, seed],
                                    np.int32)
                    floats = np.array([s.temperature, s.top_p], np.float32)
                    tokens, ints, floats = (jax.device_put(a) for a in (tokens, ints, floats))
                step = self._step("prefill", s.greedy, chunk.size)
                self.cache, self.stats, self.state = step(eng.params, eng.policy.experts, self.cache, self.stats,
                                                          self.state, self.stop, tokens, ints, floats)
                self.counters.prefill_chunks += 1
                self.counters.prompt_tokens += chunk.stop - chunk.start
                self._since += chunk.stop - chunk.start
                if last:
                    slot.decoding = True
                    emitters.append((row, seq))
        return emitters

    def _free(self, row: int, reason: str | None) -> None:
        seq = self._slots[row].seq
        self._slots[row] = None
        self._released = True
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason, seq.finished = reason, time.perf_counter()
        c = self.counters
        c.finished[reason] += 1
        if seq.first_token is not None and len(seq.tokens) > 1:
            c.token_s.observe((seq.finished - seq.first_token) / (len(seq.tokens) - 1))
        if seq.on_update is not None:
            seq.on_update(seq)
        seq.done.set()

    def _collect(self, state: SlotState, stats: RoutingStats, emitters) -> None:
        """Read a dispatched step's tokens (the next one already runs) and hand them out."""
        eng = self.engine
        every = eng.policy.observe_every
        observe = bool(every) and self._since >= every
        if observe:
            tokens, logprob, now = eng._read((state.tokens, state.logprob, stats))
        else:
            tokens, logprob = eng._read((state.tokens, state.logprob))
        t = time.perf_counter()
        count = 0
        for row, seq in emitters:
            slot = self._slots[row]
            if slot is None or slot.seq is not seq or seq.finish_reason is not None:
                continue  # ended on the host while this step ran: its token is dropped
            tok = int(tokens[row])
            if tok == NON_FINITE:
                seq.error = NonFiniteError.at(len(seq.tokens), row)
                self._free(row, "error")
                continue
            if seq.first_token is None:
                seq.first_token = t
                self.counters.ttft_s.observe(t - seq.submitted)
            seq.tokens.append(tok)
            seq.logprobs.append(float(logprob[row]))
            count += 1
            if tok in seq.stop_token_ids:
                seq.stop_token = tok
            stop = seq.on_update(seq) if seq.on_update is not None else False
            if tok in self.eos or seq.stop_token is not None or stop:
                self._free(row, "stop")
            elif len(seq.tokens) >= seq.max_tokens:
                self._free(row, "length")
        self.counters.add_tokens(t, count)
        if observe:
            self._observe(now)

    def _observe(self, now: RoutingStats) -> None:
        if self._seen is None:
            mass, tokens = now.mass, int(now.tokens)
        else:
            mass, tokens = now.mass - self._seen.mass, int(now.tokens - self._seen.tokens)
        self.engine.policy.observe(np.asarray(mass, np.float64), tokens, self._since)
        self._seen, self._since = now, 0

    def routing_now(self) -> RoutingStats:
        """The routing statistics of all traffic so far (host), read from the device."""
        with jax.transfer_guard_device_to_host("allow"):
            return jax.tree.map(np.asarray, self.stats)


__all__ = ["Closed", "QueueFull", "Scheduler", "Sequence", "SlotState", "engine_shape", "plan_chunks", "slots_for"]
