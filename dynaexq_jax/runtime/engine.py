"""Batched, KV-cached generation with jitted prefill and decode steps, on the device's terms.

The decode loop never makes the device wait for the host:
- a step computes the next step's inputs itself (sampled tokens, positions, its PRNG step) and
  accumulates routing statistics on the device (`RoutingStats`);
- step i+1 is dispatched before step i's tokens are read: one lagged, explicit device->host
  read per step. Routing statistics are read only every `policy.observe_every` steps, at the
  same lag;
- between dispatches the policy lands finished copies and flips handles, never waiting.

Shapes are bucketed (prompts: powers of two >= 16 tokens; cache: multiples of 128 slots;
batch: powers of two, padding rows masked), so each step compiles once per bucket. Greedy
decoding is a static choice of the step (an argmax, no vocabulary sort).

Before a request's first step the policy fills what must be resident (`Policy.prepare`); a
policy with nothing to go on routes the request's own prompt once on its fallbacks first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.io.loader import Checkpoint
from dynaexq_jax.models import big_little as bl_lib
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.policies import Policy
from dynaexq_jax.runtime.sampling import NON_FINITE, SamplingParams, flag_non_finite, sample

MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128


class ContextError(UserError):
    """A request does not fit the model's context window."""


class NonFiniteError(UserError):
    """The model computed NaN or Inf logits: a damaged model, never a token to print."""

    @classmethod
    def at(cls, step: int, row: int) -> "NonFiniteError":
        return cls(f"the model's logits are NaN or Inf at generation step {step} (0 = the prompt) of sequence "
                   f"{row}; its weights or config.json are damaged, or the dtype overflows (try --dtype float32)")


def prompt_bucket(n: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def cache_bucket(n: int) -> int:
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


def batch_bucket(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


@flax.struct.dataclass
class RoutingStats:
    """Routing of real tokens, accumulated on the device over a request."""

    counts: jax.Array  # [moe_layers, E] int32 routed pairs (computed ones: big-little drops the rest)
    mass: jax.Array  # [moe_layers, E] float32 router probability of the chosen experts
    hi_pairs: jax.Array  # [] int32 pairs served by a high-precision tier
    tokens: jax.Array  # [] int32 real tokens
    # Big-little routing (`models.big_little`; zeros when off), in token-layers unless named:
    little_marked: jax.Array  # [] int32 token-layers the rule marked little
    fallbacks: jax.Array  # [] int32 ... computed big after all
    little_tokens: jax.Array  # [] int32 tokens marked little at the first MoE layer
    pairs_saved: jax.Array  # [] int32 routed pairs not computed
    bytes_saved: jax.Array  # [] float32 expert weight bytes not read (only dropped pairs chose them)

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int) -> "RoutingStats":
        z = lambda shape, dt: jnp.zeros(shape, dt)
        return cls(z((num_layers, num_experts), jnp.int32), z((num_layers, num_experts), jnp.float32),
                   z((), jnp.int32), z((), jnp.int32), z((), jnp.int32), z((), jnp.int32), z((), jnp.int32),
                   z((), jnp.int32), z((), jnp.float32))

    def add(self, routing, token_valid, experts) -> "RoutingStats":
        """Fold in a step's `Routing` (`chosen` [L, B*T, E]) of `token_valid` [B, T]."""
        picked = routing.chosen >= 0  # padding tokens chose nothing
        counts = jnp.sum(picked, axis=1, dtype=jnp.int32)  # [L, E]
        out = RoutingStats(
            self.counts + counts,
            self.mass + jnp.sum(jnp.maximum(routing.chosen, 0.0), axis=1),
            self.hi_pairs + jnp.sum(jnp.where(experts.served_high(), counts, 0)),
            self.tokens + jnp.sum(token_valid, dtype=jnp.int32),
            self.little_marked, self.fallbacks, self.little_tokens, self.pairs_saved, self.bytes_saved,
        )
        little = routing.little
        if little is None or little.marked.shape[0] == 0:
            return out
        # An expert's bytes at the tier serving it this step (a row of its tier).
        per_row = jnp.asarray([t.nbytes / t.rows for t in experts.tiers], jnp.float32)
        expert_bytes = jnp.where(experts.row_of >= 0, per_row[experts.tier_of], 0.0)  # [L, E]
        return out.replace(
            little_marked=out.little_marked + jnp.sum(little.marked, dtype=jnp.int32),
            fallbacks=out.fallbacks + jnp.sum(little.fallback, dtype=jnp.int32),
            little_tokens=out.little_tokens + jnp.sum(little.marked[0], dtype=jnp.int32),
            pairs_saved=out.pairs_saved + jnp.sum(little.dropped_pairs),
            bytes_saved=out.bytes_saved + jnp.sum(jnp.where(little.skipped, expert_bytes, 0.0)),
        )


@flax.struct.dataclass
class DecodeState:
    """What a decode step needs from the step before it, all on the device."""

    tokens: jax.Array  # [B] int32 last sampled token of each row
    positions: jax.Array  # [B] int32 position the next token takes
    rows: jax.Array  # [B] bool rows still generating (False: batch padding, or a stop token was sampled)
    step: jax.Array  # [] int32 decode steps taken (0 after prefill)


def _setup():
    """A request's setup (inputs, empty cache and statistics, compiles, warm start) copies to
    the device by design; the decode loop after it must not, except its lagged reads."""
    return jax.transfer_guard("allow")


def _pick(logits, key, knobs, greedy: bool):
    """-> (next tokens [B], whether each row stops). knobs: temperature, top_k, top_p, stop ids
    [n] (-1 padded). A row whose logits are not all finite gets NON_FINITE and stops; the host,
    which reads the tokens anyway, raises on it: no extra read per step."""
    *sampling, stop = knobs
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else sample(logits, key, *sampling)
    nxt = flag_non_finite(logits, nxt)
    return nxt, jnp.any(nxt[:, None] == stop[None, :], axis=1) | (nxt == NON_FINITE)


def _prefill(decoder, params, experts, cache, stats, tokens, positions, valid, key, knobs, *, greedy, fresh,
             big_little=None):
    logits, cache, routing = decoder(params, experts, cache, tokens, positions, valid, last_only=True, fresh=fresh,
                                     big_little=big_little)
    nxt, stopped = _pick(logits[:, -1], key, knobs, greedy)
    state = DecodeState(tokens=nxt, positions=positions[:, -1] + 1, rows=jnp.any(valid, axis=1) & ~stopped,
                        step=jnp.zeros((), jnp.int32))
    return cache, stats.add(routing, valid, experts), state


def _decode(decoder, params, experts, cache, stats, state: DecodeState, key, knobs, *, greedy, big_little=None):
    valid = state.rows[:, None]  # rows that stopped compute nothing more and count in no statistics
    logits, cache, routing = decoder(params, experts, cache, state.tokens[:, None], state.positions[:, None], valid,
                                     last_only=True, big_little=big_little)
    step = state.step + 1
    nxt, stopped = _pick(logits[:, -1], jax.random.fold_in(key, step), knobs, greedy)
    return cache, stats.add(routing, valid, experts), DecodeState(nxt, state.positions + 1, state.rows & ~stopped, step)


def stop_array(eos: set[int]):
    """Stop ids as a device array padded with -1 to a power of two (>= 4), so a step compiles
    once per handful of stop tokens."""
    n = max(4, 1 << (max(len(eos), 1) - 1).bit_length())
    return jax.device_put(np.array(sorted(eos) + [-1] * (n - len(eos)), np.int32))


def _logits(decoder, params, experts, cache, tokens, positions, valid, *, big_little=None):
    return decoder(params, experts, cache, tokens, positions, valid, fresh=True, big_little=big_little)[0]


def _score(decoder, params, experts, cache, tokens, positions, valid, *, big_little=None):
    """Log-probabilities of each next token: [B, T-1] float32, and the routing statistics."""
    logits, _, routing = decoder(params, experts, cache, tokens, positions, valid, fresh=True, big_little=big_little)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    stats = RoutingStats.zeros(routing.chosen.shape[0], routing.chosen.shape[-1])
    return picked, stats.add(routing, valid, experts)


@dataclasses.dataclass
class Session:
    """One conversation (batch 1): its KV cache and the token ids the cache holds, so the
    next turn computes only what is new. Made by `Engine.new_session`."""

    cache: KVCache
    ids: list[int]
    max_chunk: int  # longest prefill chunk: bounds the step's workspace as the memory plan assumes
    # Models with linear-attention layers: (tokens, (conv, recurrent)) a copy of their states after
    # the last turn's prompt, where a rewound conversation restarts (their state cannot be cut back).
    snapshot: tuple | None = None

    @property
    def length(self) -> int:
        """Tokens the conversation may hold, its reply included."""
        return self.cache.length


@dataclasses.dataclass(frozen=True)
class Steps:
    """An engine's steps as pure functions of explicit pytrees, with its model bound (`Engine.steps`):
    call them inside one's own `jax.jit`. `params` is `Engine.params`, `experts` is
    `Engine.policy.experts` (an `ExpertState`: a promotion is a new value of the same shape, never
    a retrace), `cache` is a `KVCache.empty(...)`, and tokens, positions and valid are [B, T] as
    `left_pad` makes them."""

    # Each takes a static keyword `big_little` (a `models.big_little.BigLittle`, default None: off).
    # (params, experts, cache, stats, tokens, positions, valid, key, knobs, *, greedy, fresh)
    #   -> (cache, stats, DecodeState); knobs = SamplingParams.as_arrays() + (stop_array(eos),)
    prefill: Callable
    # (params, experts, cache, stats, state, key, knobs, *, greedy) -> (cache, stats, DecodeState)
    decode: Callable
    # (params, experts, cache, tokens, positions, valid) -> (next-token log-probs [B, T-1], RoutingStats)
    score: Callable
    # (params, experts, cache, tokens, positions, valid) -> logits [B, T, vocab] float32
    logits: Callable


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (EOS included when generated)
    stats: dict
    expert_counts: np.ndarray  # [moe_layers, experts] routed pairs of real tokens, whole request


def left_pad(batch: Sequence[Sequence[int]], length: int, rows: int | None = None):
    """-> tokens, positions, valid: [rows, length] with each sequence right-aligned; rows past
    the batch (bucket padding) are empty."""
    B = rows or len(batch)
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
    if longest > limit or (new_tokens and longest >= limit):
        raise ContextError(f"the prompt is longer than the context: {longest} tokens, and the model's context is "
                           f"{limit}; shorten the prompt")
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
        "decode_tokens_per_s": decoded / decode_s if decoded and decode_s > 0 else None,
    }


# Opt-in until a GPU measures it (scripts/gpu_check.py's "(one graph)" cases): XLA's default
# command-buffer kinds plus WHILE, so the layer loop is captured in the step's one CUDA graph.
GRAPH_LOOP = os.environ.get("DYNAEXQ_GRAPH_LOOP", "0") == "1"
GRAPH_KINDS = "FUSION,CUSTOM_CALL,CUBLAS,CUBLASLT,CUDNN,CONDITIONAL,DYNAMIC_SLICE_FUSION,WHILE"


def compiler_options() -> dict:
    """XLA options for the steps on this machine's device. XLA:CPU's while-loop invariant code
    motion hoists the widening of a whole stacked bf16 weight (every expert of every layer) out
    of the layer and tile loops, so a step would hold a float32 copy of all of it and convert it
    every call; with the pass off, a step widens the one expert or layer it reads. (GPU kernels
    read the stored weights directly.) On a GPU with `DYNAEXQ_GRAPH_LOOP=1`: `GRAPH_KINDS`."""
    platform = jax.devices()[0].platform
    if platform == "cpu":
        return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    if platform == "gpu" and GRAPH_LOOP:
        return {"xla_gpu_enable_command_buffer": GRAPH_KINDS}
    return {}


def device_memory() -> dict:
    """The allocator's figures on the default device now: in use, the peak so far and the
    largest single allocation (None each where the backend reports none, the CPU). A peak over
    the plan with an allocation the size of a tier points at the compiler's autotuning buffers
    rather than the engine's own arrays."""
    stats = jax.local_devices()[0].memory_stats() or {}  # devices()[0] may be another process's
    return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "largest_alloc_size")}


def peak_device_bytes() -> int | None:
    """The allocator's peak on the default device; None where the backend reports none (CPU)."""
    return device_memory()["peak_bytes_in_use"]


def free_device_bytes() -> int | None:
    """Bytes the device can still allocate: the allocator's limit less its use, or on the CPU
    (whose device memory is host memory) the kernel's MemAvailable; None where neither is known."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _step_key(name: str, static: dict, args) -> tuple:
    """What tells a compiled step apart: its name, static arguments, and the shapes of its
    request arguments (after the parameters and the expert state)."""
    return (name, tuple(sorted(static.items()))) + tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[2:]))


def _request_state(cfg, sampling: SamplingParams, eos) -> tuple:
    """(knobs, PRNG key, empty routing statistics) of a request, on the host."""
    return (sampling.as_arrays() + (stop_array(eos),), jax.random.key(sampling.seed),
            RoutingStats.zeros(len(cfg.moe_layers), cfg.num_experts))


def _decode_state(rows: int) -> DecodeState:
    return DecodeState(*(jax.ShapeDtypeStruct(s, d) for s, d in (((rows,), jnp.int32), ((rows,), jnp.int32),
                                                                 ((rows,), jnp.bool_), ((), jnp.int32))))


@dataclasses.dataclass(frozen=True)
class Request:
    """The shape of the generation a run will ask for, known before its weights are: what
    `Ahead` compiles for."""

    batch: int
    longest_prompt: int
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    eos_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's


class Ahead:
    """A request's prefill and decode steps, compiled in a background thread from shapes alone
    (the expert state's as the policy will build it) while the experts are still being
    converted: compiling overlaps loading. The engine takes a step from here when its key and
    the real expert state's shapes match, and compiles itself otherwise."""

    def __init__(self, checkpoint: Checkpoint, experts_shape, request: Request, big_little: BigLittle | None = None):
        import concurrent.futures

        self.experts_shape = experts_shape
        cfg = checkpoint.config
        decoder = Decoder(cfg, checkpoint.dtype)
        prefill = jax.jit(functools.partial(_prefill, decoder), static_argnames=("greedy", "fresh", "big_little"),
                          donate_argnums=(2,))
        decode = jax.jit(functools.partial(_decode, decoder), static_argnames=("greedy", "big_little"),
                         donate_argnums=(2,))
        rows, P = batch_bucket(request.batch), prompt_bucket(request.longest_prompt)
        eos = set(checkpoint.eos_token_ids if request.eos_token_ids is None else request.eos_token_ids)
        sds = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
        knobs, key, stats0 = sds(_request_state(cfg, request.sampling, eos))
        cache = jax.eval_shape(lambda: KVCache.empty(cfg, rows, cache_bucket(P + request.max_new_tokens),
                                                     checkpoint.dtype))
        tokens = sds(left_pad([[0]], P, rows))
        params = sds(checkpoint.params)
        greedy = request.sampling.greedy
        bl = big_little and big_little.checked(cfg.experts_per_token)
        steps = {
            _step_key("prefill", dict(greedy=greedy, fresh=True, big_little=bl),
                      (params, experts_shape, cache, stats0, *tokens, key, knobs)):
                (prefill, (params, experts_shape, cache, stats0, *tokens, key, knobs),
                 dict(greedy=greedy, fresh=True, big_little=bl)),
            _step_key("decode", dict(greedy=greedy, big_little=bl),
                      (params, experts_shape, cache, stats0, _decode_state(rows), key, knobs)):
                (decode, (params, experts_shape, cache, stats0, _decode_state(rows), key, knobs),
                 dict(greedy=greedy, big_little=bl)),
        }
        self.seconds = 0.0  # spent compiling in the background

        def compile_one(f, a, st):
            t0 = time.perf_counter()
            try:
                return f.lower(*a, **st).compile(compiler_options())
            finally:
                self.seconds += time.perf_counter() - t0

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        self._steps = {k: pool.submit(compile_one, *step) for k, step in steps.items()}
        pool.shutdown(wait=False)

    def take(self, key: tuple, experts):
        """The step compiled for `key` if the expert state matches the shapes it was compiled
        for; None otherwise (the caller compiles)."""
        future = self._steps.pop(key, None)
        if future is None:
            return None
        same = jax.tree.structure(experts) == jax.tree.structure(self.experts_shape) and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(experts), jax.tree.leaves(self.experts_shape)))
        try:
            compiled = future.result()
        except Exception:  # anything a background compile hits, the foreground one reports
            return None
        return compiled if same else None


# Counters that accumulate over a policy's life; a request reports its own share.
RUNTIME_COUNTERS = ("promotions", "demotions", "h2d_bytes", "transfer_wait_s", "failed_promotions")


class BigLittleSetting:
    """An engine's `big_little` attribute: the big-little routing its steps compile with
    (`models.big_little.BigLittle`, static: each setting compiles its own steps, once; None:
    plain top-k), checked against the model's top-k when set."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, engine, owner=None) -> BigLittle | None:
        return self if engine is None else getattr(engine, self.slot)

    def __set__(self, engine, value: BigLittle | None) -> None:
        setattr(engine, self.slot, value and value.checked(engine.cfg.experts_per_token))


class Engine:
    """Runs a loaded checkpoint under a residency policy (default: `full`)."""

    def __init__(self, checkpoint: Checkpoint, policy: Policy | None = None, big_little: BigLittle | None = None, *,
                 ffn=None, ahead: "Ahead | None" = None):
        """`ffn`: the MoE layers' expert FFN (default `experts.matmul.routed_ffn`; the mesh's is
        `runtime.mesh.expert_parallel_ffn`). `ahead`: steps compiled from shapes while the
        policy was being built (`Ahead`), taken where they match."""
        from dynaexq_jax.policies import full

        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.params = checkpoint.params
        self.policy = policy or full.build(checkpoint)
        self.big_little = big_little
        self.decoder = Decoder(self.cfg, checkpoint.dtype, **({} if ffn is None else {"ffn": ffn}))
        self.input_sharding = None  # where a step's inputs go (None: the default device); the mesh replicates them
        self._compiled: dict[tuple, Callable] = {}
        self._ahead = ahead
        self.compile_s = 0.0
        self.workspace_bytes = 0  # XLA's temporaries of the largest compiled step
        self.host_reads = 0  # explicit device->host reads (tokens, statistics) over the engine's life
        self._prefill = jax.jit(functools.partial(_prefill, self.decoder),
                                static_argnames=("greedy", "fresh", "big_little"), donate_argnums=(2,))
        self._decode = jax.jit(functools.partial(_decode, self.decoder), static_argnames=("greedy", "big_little"),
                               donate_argnums=(2,))
        self._score = jax.jit(functools.partial(_score, self.decoder), static_argnames="big_little")
        self._logits = jax.jit(functools.partial(_logits, self.decoder), static_argnames="big_little")

    big_little = BigLittleSetting()

    # ------------------------------------------------------------------ plumbing
    def _compile(self, name: str, fn, *args, **static):
        static["big_little"] = self.big_little
        key = _step_key(name, static, args)
        if key not in self._compiled:
            t0 = time.perf_counter()
            ready = self._ahead.take(key, args[1]) if self._ahead is not None else None
            self._compiled[key] = ready or fn.lower(*args, **static).compile(compiler_options())
            self.compile_s += time.perf_counter() - t0
            # What the memory plan's workspace margin must cover; checked in tests, reported.
            self.workspace_bytes = max(self.workspace_bytes, self._compiled[key].memory_analysis().temp_size_in_bytes)
        return self._compiled[key]

    def _put(self, tree):
        """A request's device values where its steps run (on the mesh: replicated once, not moved every step)."""
        return jax.device_put(tree, self.input_sharding)

    def _read(self, x):
        """The one way the engine brings device values to the host (explicitly allowed, counted;
        cheaper than `jax.device_get`'s tree machinery, which costs ~20 us a call on the CPU)."""
        self.host_reads += 1
        with jax.transfer_guard_device_to_host("allow"):
            return jax.tree.map(np.asarray, x)

    def _stats0(self) -> RoutingStats:
        return RoutingStats.zeros(len(self.cfg.moe_layers), self.cfg.num_experts)

    def _empty_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.empty(self.cfg, batch, length, self.checkpoint.dtype)

    # ------------------------------------------------------------------ scoring
    def logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len_i, vocab] (float32) at every position of each token sequence."""
        longest = max(len(s) for s in batch)
        check_context(self.cfg, longest, 0)
        P = prompt_bucket(longest)
        host = left_pad(batch, P, batch_bucket(len(batch)))
        self.policy.prepare(lambda: self._routing_of(self._run_score(host)))
        tokens, positions, valid = (jax.device_put(a) for a in host)
        args = (self.params, self.policy.experts, self._empty_cache(*tokens.shape), tokens, positions, valid)
        logits = self._read(self._compile("logits", self._logits, *args)(*args))
        return [logits[b, P - len(s) :] for b, s in enumerate(batch)]

    def score(self, seqs: Sequence[Sequence[int]], length: int | None = None):
        """Log p(seq[t] | seq[:t]) for t = 1.. of each sequence ([len_i - 1] float32), and the
        batch's routing statistics (host numpy `RoutingStats`). `length`: the padded length
        (default: the batch's bucket)."""
        longest = max(len(s) for s in seqs)
        check_context(self.cfg, longest, 0)
        P = length or prompt_bucket(longest)
        B = batch_bucket(len(seqs))
        host = left_pad(seqs, P, B)
        self.policy.prepare(lambda: self._routing_of(self._run_score(host)))
        lp, stats = self._read(self._run_score(host))
        return [lp[b, P - len(s) : P - 1] for b, s in enumerate(seqs)], stats

    def _run_score(self, host):
        tokens, positions, valid = (jax.device_put(a) for a in host)
        args = (self.params, self.policy.experts, self._empty_cache(*tokens.shape), tokens, positions, valid)
        return self._compile("score", self._score, *args)(*args)

    def _routing_of(self, scored):
        _, stats = self._read(scored)
        return np.asarray(stats.mass, np.float64), int(stats.tokens), scored[0].shape[1] + 1

    def logits_fn(self):
        """The jitted scoring function, for research code: (params, experts, cache, tokens,
        positions, valid) -> (next-token log-probs [B, T-1], `RoutingStats`)."""
        return self._score

    @property
    def steps(self) -> Steps:
        """The steps this engine runs, as pure functions for research code (see `Steps`)."""
        bind = lambda fn: functools.partial(fn, self.decoder)
        return Steps(bind(_prefill), bind(_decode), bind(_score), bind(_logits))

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> Generation:
        """Generate for a batch of token-id prompts. `on_tokens([B] ids)` is called per step
        (one step late: the next step is already running)."""
        longest = check_request(self.cfg, prompts, max_new_tokens)
        eos = set(self.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        B = len(prompts)
        rows = batch_bucket(B)
        P = prompt_bucket(longest)
        host = left_pad(prompts, P, rows)
        greedy = sampling.greedy
        before = self.policy.stats()
        with _setup():
            tokens, positions, valid = self._put(tuple(host))
            knobs, key, stats0 = self._put(_request_state(self.cfg, sampling, eos))
            cache = self._put(self._empty_cache(rows, cache_bucket(P + max_new_tokens)))
            args = lambda cache: (self.params, self.policy.experts, cache, stats0, tokens, positions, valid, key, knobs)
            prefill = self._compile("prefill", self._prefill, *args(cache), greedy=greedy, fresh=True)
            run = lambda cache: prefill(*args(cache))
            rewound = jnp.zeros((), jnp.int32)

            def routing_pass():  # the prompt, once, on the current experts; then the cache is rewound
                nonlocal cache
                cache, stats, _ = run(cache)
                cache = cache.replace(index=rewound)
                return np.asarray(self._read(stats.mass), np.float64), int(host[2].sum()), longest

            self.policy.prepare(routing_pass)
        t0 = time.perf_counter()
        cache, stats, state = run(cache)
        decode = self._compile_decode(max_new_tokens, key, knobs, greedy, cache)
        out, cache, stats, t_first, decode_s = self._decode_loop(decode, cache, stats, state, key, knobs, B,
                                                                 max_new_tokens, eos, on_tokens, longest)
        self.policy.after_request()
        return self._generation(out, host[2][:B].sum(axis=1), t_first - t0, decode_s, stats, before)

    def new_session(self, context: int, max_chunk: int) -> Session:
        """An empty conversation of up to `context` tokens (rounded up to the cache bucket),
        whose turns are prefilled in chunks of at most `max_chunk` tokens (a power of two)."""
        if max_chunk < 1 or max_chunk & (max_chunk - 1):
            raise ValueError(f"max_chunk must be a power of two, got {max_chunk}")
        return Session(self._empty_cache(1, cache_bucket(context)), [], max_chunk)

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
        if len(ids) + max_new_tokens > session.length:
            raise ContextError(
                f"the conversation has {len(ids)} tokens + {max_new_tokens} new, over the session's context of "
                f"{session.length}; start with a larger --context or a shorter --max-new-tokens"
            )
        eos = set(self.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        try:
            return self._chat_turn(session, ids, max_new_tokens, sampling, eos, on_tokens)
        except BaseException:
            # The turn donated the session's cache to its steps; an interrupted or failed turn
            # leaves the session empty, so the next turn prefills the conversation afresh.
            session.cache, session.ids, session.snapshot = self._empty_cache(1, session.length), [], None
            raise

    def _chat_turn(self, session, ids, max_new_tokens, sampling, eos, on_tokens) -> Generation:
        greedy = sampling.greedy
        before = self.policy.stats()
        # Keep at least the last token to prefill: its logits give the first reply token.
        keep = min(_common_prefix(session.ids, ids), len(ids) - 1)
        cache = session.cache
        linear = bool(self.cfg.linear_layers)
        with _setup():
            if linear and keep < len(session.ids):
                # The linear layers' states hold all of session.ids: restart from the snapshot
                # if the conversation keeps it, else from nothing (a fresh first chunk).
                snap = session.snapshot
                if snap is not None and snap[0] <= keep:
                    keep = snap[0]
                    cache = cache.replace(**_linear_copy(snap[1]))
                else:
                    keep = 0
            knobs, key = sampling.as_arrays() + (stop_array(eos),), jax.random.key(sampling.seed)
            stats0 = self._stats0()
            rewind = jax.device_put(np.int32(keep))
            chunks, start = [], keep
            for n in _chunks(len(ids) - keep, session.max_chunk):
                chunks.append(tuple(jax.device_put(a) for a in (
                    np.asarray([ids[start : start + n]], np.int32), np.arange(start, start + n, dtype=np.int32)[None],
                    np.ones((1, n), bool))))
                start += n
            # The first chunk of an empty conversation attends to itself only.
            steps = [self._compile("prefill", self._prefill, self.params, self.policy.experts, cache, stats0,
                                   *chunk, key, knobs, greedy=greedy, fresh=keep == 0 and i == 0)
                     for i, chunk in enumerate(chunks)]

            def prefill(cache):
                # Rewinding is moving the write index: slots past it still hold old keys and values,
                # but every slot a query can see (up to its own) is rewritten before it is read.
                cache, stats, state = cache.replace(index=rewind), stats0, None
                for step, chunk in zip(steps, chunks):
                    cache, stats, state = step(self.params, self.policy.experts, cache, stats, *chunk, key, knobs)
                return cache, stats, state

            def routing_pass():
                nonlocal cache
                saved = _linear_copy((cache.conv, cache.recurrent)) if linear else {}
                cache, stats, _ = prefill(cache)
                cache = cache.replace(**saved)  # the real prefill starts from the same states
                return np.asarray(self._read(stats.mass), np.float64), len(ids) - keep, len(ids) - keep

            self.policy.prepare(routing_pass)
        t0 = time.perf_counter()
        cache, stats, state = prefill(cache)
        if linear:  # decode donates the cache: copy the prompt's states first (no host sync)
            session.snapshot = (len(ids), tuple(_linear_copy((cache.conv, cache.recurrent)).values()))
        decode = self._compile_decode(max_new_tokens, key, knobs, greedy, cache)
        out, cache, stats, t_first, decode_s = self._decode_loop(decode, cache, stats, state, key, knobs, 1,
                                                                 max_new_tokens, eos, on_tokens, len(ids) - keep)
        self.policy.after_request()
        session.cache = cache
        session.ids = ids + out[0][:-1]  # the last reply token is sampled but not yet in the cache
        gen = self._generation(out, np.array([len(ids) - keep]), t_first - t0, decode_s, stats, before)
        gen.stats["reused_tokens"] = keep
        return gen

    def _compile_decode(self, max_new_tokens, key, knobs, greedy, cache):
        """The decode step for `cache`'s shapes, compiled (or taken from `Ahead`) after the
        prefill is dispatched, so it compiles while the prefill runs; None when the request
        wants one token (the prefill gives it)."""
        if max_new_tokens <= 1:
            return None
        with _setup():
            args = (self.params, self.policy.experts, cache, self._stats0(), _decode_state(cache.start.shape[0]),
                    key, knobs)
            return self._compile("decode", self._decode, *args, greedy=greedy)

    def _decode_loop(self, decode, cache, stats, state, key, knobs, B, max_new_tokens, eos, on_tokens, prefilled):
        """Tokens 0.. of every row: step i+1 is dispatched before step i's tokens are read.
        -> (ids per row, cache, stats of the last step read, first-token time, decode seconds)."""
        policy = self.policy
        every = policy.observe_every
        out = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        seen = None  # statistics (host) at the last observation
        t_first = None
        for i in range(max_new_tokens):
            if i + 1 < max_new_tokens:
                policy.between_steps()
                cache, next_stats, next_state = decode(self.params, policy.experts, cache, stats, state, key, knobs)
            ids = self._read(state.tokens)[:B]
            if t_first is None:
                t_first = time.perf_counter()
            for b in np.flatnonzero(~done):
                if ids[b] == NON_FINITE:
                    raise NonFiniteError.at(i, b)
                out[b].append(int(ids[b]))
                done[b] = ids[b] in eos
            if on_tokens is not None:
                on_tokens(ids)
            if every and i % every == 0:  # step 0 is the prefill: observe the prompt's routing
                seen = self._observe(stats, seen, prefilled if i == 0 else every)
            if done.all() or i + 1 == max_new_tokens:
                break
            stats, state = next_stats, next_state
        return out, cache, stats, t_first, time.perf_counter() - t_first

    def _observe(self, stats, seen, steps):
        now = self._read(stats)
        if seen is None:
            mass, tokens = now.mass, int(now.tokens)
        else:
            mass, tokens = now.mass - seen.mass, int(now.tokens - seen.tokens)
        self.policy.observe(np.asarray(mass, np.float64), tokens, steps)
        return now

    def _generation(self, out, prefilled, prefill_s, decode_s, stats, before) -> Generation:
        """`prefilled`: [B] tokens each row prefilled; `before`: the policy's counters at the start."""
        final = self._read(stats)
        pairs = int(final.counts.sum())
        stats = {
            **timing_stats(out, prefilled, prefill_s, decode_s),
            "compile_s": self.compile_s,
            "workspace_measured_bytes": self.workspace_bytes,
            "hi_hit_rate": int(final.hi_pairs) / pairs if pairs else None,
            "peak_device_bytes": peak_device_bytes(),
        }
        if self.big_little is not None:
            stats["big_little"] = little_stats(self.big_little, self.cfg, final)
        after = self.policy.stats()
        for k in RUNTIME_COUNTERS:
            if k in after:
                after[k] -= before[k]
        stats.update(after)
        return Generation(tokens=out, stats=stats, expert_counts=np.asarray(final.counts))


def little_stats(bl: BigLittle, cfg, stats: RoutingStats) -> dict:
    """The `big_little` entry of a run's stats from its (host) `RoutingStats`."""
    return bl_lib.summary(bl, cfg.experts_per_token, len(cfg.moe_layers), tokens=int(stats.tokens),
                          marked=int(stats.little_marked), fallbacks=int(stats.fallbacks),
                          little_tokens=int(stats.little_tokens), dropped_pairs=int(stats.pairs_saved),
                          bytes_saved=float(stats.bytes_saved))


def _linear_copy(states) -> dict:
    """Fresh device copies of (conv, recurrent) linear-attention states, as `KVCache` fields
    (the originals may be donated to a step)."""
    conv, recurrent = states
    with jax.transfer_guard("allow"):
        return {"conv": jnp.copy(conv), "recurrent": jnp.copy(recurrent)}


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
