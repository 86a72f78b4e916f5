"""Offloading baselines: every expert in host memory, an LRU cache of device slots.

- `offload`: an expert a layer routes to that is not cached is loaded on demand, on the
  critical path: the layer waits for the host -> device copy, the copy is written into a slot
  (donated pool), then the layer's experts run.
- `prefetch`: `offload`, plus a guess of the next MoE layer's experts made from the current
  layer's output; their copies start at once and the next layer waits only for the ones it
  actually routes to (true misses are still loaded on demand).

Routing is known only inside a layer, so the decoder runs layer by layer from Python: a
jitted attention + router function, a host sync to read which experts the layer needs (the
cost these systems pay), the loads, then a jitted experts function over the slot pool. The
slot map is an argument, so the cache changing never retraces; every function is compiled
once per shape bucket (the engine's prompt and cache buckets).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax import budget as budget_lib
from dynaexq_jax.runtime.engine import (
    Generation,
    KVCache,
    SamplingParams,
    cache_bucket,
    check_context,
    check_request,
    collect_tokens,
    left_pad,
    peak_device_bytes,
    prompt_bucket,
    sample,
    timing_stats,
)
from dynaexq_jax.experts.expert_state import routed_swiglu
from dynaexq_jax.experts.matmul import grouped_matmul
from dynaexq_jax.models.decoder import Attention, DenseMLP, RMSNorm, route
from dynaexq_jax.experts.swap import HostBank, _write_slot, stage

Key = tuple[int, int]  # (moe_layer, expert)


@dataclasses.dataclass
class CacheStats:
    hits: int = 0  # requests whose expert was cached (prefetched ones included)
    misses: int = 0  # requests loaded on demand
    evictions: int = 0
    prefetches: int = 0
    h2d_bytes: int = 0  # misses and prefetches
    prefetch_bytes: int = 0
    wasted_prefetch_bytes: int = 0  # prefetched, then not used by the layer it was for


class LRUSlots:
    """Which expert each device slot holds; a load evicts the least recently used one.

    Pure bookkeeping, no arrays, so its counters can be checked on a scripted trace. A
    request is one expert needed by one layer in one step, however many tokens chose it.
    """

    def __init__(self, num_slots: int, expert_nbytes: int):
        self.num_slots = num_slots
        self.expert_nbytes = expert_nbytes
        self._slot: collections.OrderedDict[Key, int] = collections.OrderedDict()  # least recent first
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._unused_prefetch: set[Key] = set()
        self.stats = CacheStats()

    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def request(self, key: Key, pinned: frozenset[Key] | set[Key] = frozenset()) -> tuple[int, bool]:
        """-> (slot serving `key`, whether it was cached). A miss takes a free slot or
        evicts the least recently used key not in `pinned` (the keys its layer runs with)."""
        if key in self._slot:
            self._slot.move_to_end(key)
            self._unused_prefetch.discard(key)
            self.stats.hits += 1
            return self._slot[key], True
        self.stats.misses += 1
        self.stats.h2d_bytes += self.expert_nbytes
        return self._insert(key, pinned), False

    def prefetch(self, key: Key, pinned: frozenset[Key] | set[Key] = frozenset()) -> int | None:
        """Reserve a slot for a predicted key (None if it is cached already)."""
        if key in self._slot:
            return None
        self.stats.prefetches += 1
        self.stats.prefetch_bytes += self.expert_nbytes
        self.stats.h2d_bytes += self.expert_nbytes
        self._unused_prefetch.add(key)
        return self._insert(key, pinned)

    def end_layer(self, layer: int) -> None:
        """The layer has run: its prefetches it did not request were wasted."""
        wasted = {k for k in self._unused_prefetch if k[0] == layer}
        self._unused_prefetch -= wasted
        self.stats.wasted_prefetch_bytes += len(wasted) * self.expert_nbytes

    def _insert(self, key: Key, pinned) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in self._slot if k not in pinned), None)
            if victim is None:
                raise RuntimeError(f"all {self.num_slots} slots are pinned; a layer may use at most that many at once")
            slot = self._slot.pop(victim)
            self.stats.evictions += 1
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self.stats.wasted_prefetch_bytes += self.expert_nbytes
        self._slot[key] = slot
        return slot


@dataclasses.dataclass
class RunStats:
    pairs: int = 0  # routed (real token, expert) pairs
    hit_pairs: int = 0  # ... whose expert was cached when its layer ran
    transfer_wait_s: float = 0.0  # host blocked on copies, demand loads and prefetches
    prefetch_wait_s: float = 0.0  # the part spent on prefetches still in flight


class _LayerFunctions:
    """The jitted pieces of one model config, and their executables compiled once per
    argument shapes, shared by every engine of that config (as jit's own cache would be)."""

    def __init__(self, cfg, dtype):
        E = cfg.num_experts
        attention = Attention(cfg, dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype)
        gate = nn.Dense(E, use_bias=False, dtype=dtype, param_dtype=dtype)
        lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype)
        dense_mlp = DenseMLP(cfg.intermediate_size, dtype)

        def rms(p, x):
            return RMSNorm(cfg.rms_norm_eps).apply({"params": p}, x)

        def embed_tokens(p, tokens, cache_valid, token_valid, index):  # -> x [B, T, H], valid [B, S]
            return embed.apply({"params": p}, tokens), jax.lax.dynamic_update_slice(cache_valid, token_valid, (0, index))

        def attention_block(p, x, positions, k, v, valid, index):  # -> residual, its post-attention norm, cache
            h, k, v = attention.apply({"params": p["self_attn"]}, rms(p["input_layernorm"], x), positions, k, v, valid, index)
            x = x + h
            return x, rms(p["post_attention_layernorm"], x), k, v

        def router(p, hn, token_valid):  # -> top_p, top_i [BT, k]; counts [E]: pairs of real tokens
            B, T, H = hn.shape
            _, top_p, top_i = route(cfg, gate.apply({"params": p["mlp"]["gate"]}, hn.reshape(B * T, H)))
            counts = jnp.zeros((E,), jnp.int32).at[top_i].add(token_valid.reshape(B * T, 1).astype(jnp.int32))
            return top_p.astype(dtype), top_i, counts

        def moe_attention(p, token_valid, x, positions, k, v, valid, index):
            x, hn, k, v = attention_block(p, x, positions, k, v, valid, index)
            return (x, hn) + router(p, hn, token_valid) + (k, v)

        def dense_layer(p, x, positions, k, v, valid, index):
            x, hn, k, v = attention_block(p, x, positions, k, v, valid, index)
            return x + dense_mlp.apply({"params": p["mlp"]}, hn), k, v

        def experts(pool, hn, top_i, top_p, token_valid, slot_map, acc):
            """acc [B, T, H] + one round's experts. pool ([S, H, 2I], [S, I, H]); slot_map [E]:
            the slot of each expert in the round, S for the others. Their pairs, and padding
            tokens', sort into group S, past the slots, where the grouped matmul leaves them 0."""
            B, T, H = hn.shape
            S = pool[0].shape[0]
            groups = jnp.where(token_valid.reshape(B * T, 1), slot_map[top_i], S)  # [BT, k]
            y = routed_swiglu(
                hn.reshape(B * T, H),
                groups,
                top_p,
                S + 1,
                lambda xs, gs: grouped_matmul(xs, pool[0], gs[:S], preferred_element_type=dtype),
                lambda xs, gs: grouped_matmul(xs, pool[1], gs[:S], preferred_element_type=dtype),
            )
            return acc + y.reshape(B, T, H)

        def predict(p_next, x, token_valid):
            """The next MoE layer's routing, guessed before its attention has run: its router
            on the current residual stream, normed with its post-attention norm (the input its
            router will see, minus one attention update). -> counts [E] over real tokens."""
            return router(p_next, rms(p_next["post_attention_layernorm"], x), token_valid)[2]

        def head(p, x):  # -> logits [B, T, V] float32
            x = rms(p["norm"], x)
            if cfg.tie_word_embeddings:
                return embed.apply({"params": p["embed_tokens"]}, x, method="attend").astype(jnp.float32)
            return lm_head.apply({"params": p["lm_head"]}, x).astype(jnp.float32)

        def next_token(p, x_last, key, temperature, top_k, top_p):  # x_last [B, 1, H] -> [B] int32
            return sample(head(p, x_last)[:, -1], key, temperature, top_k, top_p)

        self.jitted = {
            "embed": jax.jit(embed_tokens, donate_argnums=(2,)),
            "moe_attention": jax.jit(moe_attention, donate_argnums=(4, 5)),
            "dense_layer": jax.jit(dense_layer, donate_argnums=(3, 4)),
            "experts": jax.jit(experts),
            "predict": jax.jit(predict),
            "head": jax.jit(head),
            "next_token": jax.jit(next_token),
            "write_slot": _write_slot,
        }
        self.executables: dict[tuple, Callable] = {}


@functools.lru_cache(maxsize=None)
def _layer_functions(cfg, dtype) -> _LayerFunctions:
    return _LayerFunctions(cfg, dtype)


class OffloadEngine:
    """Same public surface as `engine.Engine`; experts live on the host, `num_slots` of
    them at a time in a device slot pool (the checkpoint's dtype). At most `staging` copies
    are in flight at once (default: as many as slots), the room the memory plan reserves."""


    def __init__(self, checkpoint, num_slots: int, *, prefetch: bool = False, staging: int | None = None):
        cfg = self.cfg = checkpoint.config
        self.checkpoint = checkpoint
        self.params = checkpoint.params
        self.prefetch = prefetch
        k, E = cfg.experts_per_token, cfg.num_experts
        self.num_slots = min(num_slots, len(cfg.moe_layers) * E)
        if self.num_slots < k:
            raise budget_lib.BudgetError(f"offloading needs at least {k} expert slots (one token's experts), got {num_slots}")
        self.staging = min(staging or self.num_slots, self.num_slots)
        self.device = jax.devices()[0]
        host = checkpoint.experts
        self.bank = HostBank([[(gu[e], dn[e]) for e in range(E)] for gu, dn in zip(host.gate_up, host.down)], self.device)
        self.cache = LRUSlots(self.num_slots, self.bank.expert_nbytes)
        gu, dn = self.bank[0, 0]
        pool = (jnp.zeros((self.num_slots,) + gu.shape, gu.dtype), jnp.zeros((self.num_slots,) + dn.shape, dn.dtype))
        self._pool = jax.device_put(pool, self.device)  # ([S, H, 2I], [S, I, H])
        self._inflight: dict[Key, tuple[int, object]] = {}  # prefetches: key -> (slot, staged copy)
        self.run = RunStats()
        self.functions = _layer_functions(cfg, checkpoint.dtype)
        self.compile_s = 0.0
        self.workspace_bytes = 0  # XLA's temporaries of the largest function this engine ran
        self._used: set[tuple] = set()
        self._moe_params = [self.params[f"layers_{i}"] for i in cfg.moe_layers]
        self._head_params = {n: self.params[n] for n in ("norm", "embed_tokens", "lm_head") if n in self.params}

    def _call(self, name: str, *args):
        """Run function `name`, compiled ahead of time once per argument shapes (the compile
        time is counted in `compile_s`, apart from the run)."""
        key = (name,) + tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        exe = self.functions.executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = self.functions.executables[key] = self.functions.jitted[name].lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        if key not in self._used:  # executables are shared between engines; the figure is per engine
            self._used.add(key)
            self.workspace_bytes = max(self.workspace_bytes, exe.memory_analysis().temp_size_in_bytes)
        return exe(*args)

    # ------------------------------------------------------------------ expert movement
    def _write(self, slot: int, staged) -> None:
        self._pool = self._call("write_slot", self._pool, staged, np.int32(slot))

    def _load(self, batch: list[tuple[int, Key]]) -> None:
        """Demand loads: copy, block until on the device, write the slots."""
        t0 = time.perf_counter()
        staged = [stage(self.bank[key], self.device) for _, key in batch]  # copies overlap each other
        jax.block_until_ready(staged)
        self.run.transfer_wait_s += time.perf_counter() - t0
        for (slot, _), s in zip(batch, staged):
            self._write(slot, s)

    def _land_prefetches(self, needed: set[Key]) -> None:
        """Write this layer's prefetched experts into their slots, waiting only for needed ones
        (the write of an unneeded one is enqueued behind its copy; the host goes on)."""
        for key, (slot, staged) in self._inflight.items():
            if key in needed:
                t0 = time.perf_counter()
                jax.block_until_ready(staged)
                dt = time.perf_counter() - t0
                self.run.transfer_wait_s += dt
                self.run.prefetch_wait_s += dt
            self._write(slot, staged)
        self._inflight.clear()

    def _start_prefetch(self, m: int, x, token_valid) -> None:
        """Start, without waiting, the copies of the experts MoE layer `m` is predicted to use
        (the union of every real token's top-k): the most-chosen first, at most `staging`."""
        counts = np.asarray(self._call("predict", self._moe_params[m], x, token_valid))
        top = np.argsort(-counts, kind="stable")[: min(np.count_nonzero(counts), self.staging)]
        keys = [(m, int(e)) for e in top]
        pinned = set(keys)  # one guess must not evict another
        for key in keys:
            slot = self.cache.prefetch(key, pinned)
            if slot is not None:
                self._inflight[key] = (slot, stage(self.bank[key], self.device))

    def _moe(self, m: int, x, hn, top_i, top_p, token_valid, counts: np.ndarray):
        """x [B, T, H] (residual) + MoE layer `m`'s experts for the pairs `counts` [E] names."""
        needed = [(m, int(e)) for e in np.flatnonzero(counts)]
        self._land_prefetches(set(needed))
        # Cached experts go first, so no load of this layer evicts one before it has run.
        cached = [key for key in needed if key in self.cache]
        self.run.pairs += int(counts.sum())
        self.run.hit_pairs += int(sum(counts[e] for _, e in cached))
        order = cached + [key for key in needed if key not in self.cache]
        S = self.num_slots
        for r in range(0, len(order), S):  # more experts than slots (prefill): several rounds
            keys = order[r : r + S]
            slot_map = np.full((self.cfg.num_experts,), S, np.int32)
            loads = []
            for key in keys:
                slot, hit = self.cache.request(key, pinned=set(keys))
                slot_map[key[1]] = slot
                if not hit:
                    loads.append((slot, key))
            for i in range(0, len(loads), self.staging):
                self._load(loads[i : i + self.staging])
            x = self._call("experts", self._pool, hn, top_i, top_p, token_valid, slot_map, x)
        self.cache.end_layer(m)
        return x

    # ------------------------------------------------------------------ forward
    def _forward(self, tokens, positions, token_valid, cache: KVCache, counts: np.ndarray):
        """Every layer on [B, T] tokens written from `cache.index`; adds each MoE layer's
        routed pairs of real tokens into `counts` [moe_layers, E]. -> x [B, T, H], cache."""
        cfg = self.cfg
        x, valid = self._call("embed", self.params["embed_tokens"], tokens, cache.valid, token_valid, cache.index)
        ks, vs = list(cache.k), list(cache.v)
        for i in range(cfg.num_layers):
            p = self.params[f"layers_{i}"]
            if not cfg.is_moe_layer(i):
                x, ks[i], vs[i] = self._call("dense_layer", p, x, positions, ks[i], vs[i], valid, cache.index)
                continue
            m = cfg.moe_layers.index(i)
            x, hn, top_p, top_i, c, ks[i], vs[i] = self._call(
                "moe_attention", p, token_valid, x, positions, ks[i], vs[i], valid, cache.index
            )
            c = np.asarray(c)  # host sync: which experts this layer routes to
            counts[m] += c
            x = self._moe(m, x, hn, top_i, top_p, token_valid, c)
            if self.prefetch and m + 1 < len(cfg.moe_layers):
                self._start_prefetch(m + 1, x, token_valid)
        T = tokens.shape[1]
        return x, KVCache(k=tuple(ks), v=tuple(vs), valid=valid, index=np.int32(cache.index + T))

    def _empty_cache(self, batch: int, length: int) -> KVCache:
        cache = KVCache.empty(self.cfg, batch, length, self.checkpoint.dtype)
        return dataclasses.replace(cache, index=np.int32(0))  # a host scalar: no device op per step

    # ------------------------------------------------------------------ public
    def logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len_i, vocab] (float32) at every position of each token sequence."""
        longest = max(len(s) for s in batch)
        check_context(self.cfg, longest, 0)
        P = prompt_bucket(longest)
        tokens, positions, valid = left_pad(batch, P)
        counts = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        # The cache bucket `generate` uses for this prompt when its new tokens fit the same
        # bucket, so scoring reuses the prefill executables.
        cache = self._empty_cache(len(batch), cache_bucket(P))
        x, _ = self._forward(tokens, positions, valid, cache, counts)
        logits = np.asarray(self._call("head", self._head_params, x))
        return [logits[b, P - len(s) :] for b, s in enumerate(batch)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> Generation:
        """Like `Engine.generate`. Stats count this call; the cache's contents carry over."""
        longest = check_request(self.cfg, prompts, max_new_tokens)
        eos = set(self.checkpoint.eos_token_ids if eos_token_ids is None else eos_token_ids)
        B = len(prompts)
        P = prompt_bucket(longest)
        tokens, positions, valid = left_pad(prompts, P)
        lengths = np.array([len(p) for p in prompts], np.int32)
        knobs = sampling.as_arrays()
        key = jax.random.key(sampling.seed)
        cache = self._empty_cache(B, cache_bucket(P + max_new_tokens))
        counts = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        self.cache.stats, self.run = CacheStats(), RunStats()

        # Functions compile on first use; their compile time is reported apart, not in prefill_s / decode_s.
        t0, c0 = time.perf_counter(), self.compile_s
        x, cache = self._forward(tokens, positions, valid, cache, counts)
        nxt = self._call("next_token", self._head_params, x[:, -1:], key, *knobs)
        nxt_host = np.asarray(nxt)
        prefill_s = time.perf_counter() - t0 - (self.compile_s - c0)

        one = np.ones((B, 1), bool)

        def step(i):
            nonlocal nxt, cache
            x, cache = self._forward(nxt[:, None], (lengths + i)[:, None], one, cache, counts)
            nxt = self._call("next_token", self._head_params, x[:, -1:], jax.random.fold_in(key, i + 1), *knobs)
            return np.asarray(nxt)

        t1, c1 = time.perf_counter(), self.compile_s
        out = collect_tokens(nxt_host, max_new_tokens, eos, on_tokens, step)
        decode_s = time.perf_counter() - t1 - (self.compile_s - c1)

        s, run = self.cache.stats, self.run
        stats = {
            **timing_stats(out, lengths, prefill_s, decode_s),
            "compile_s": self.compile_s,
            "workspace_measured_bytes": self.workspace_bytes,
            "hi_hit_rate": run.hit_pairs / run.pairs if run.pairs else None,
            "peak_device_bytes": peak_device_bytes(),
            "slots": self.num_slots,
            "lo_bits": None,  # no low-bit experts
            "promotions": s.misses + s.prefetches,
            "demotions": s.evictions,
            "h2d_bytes": s.h2d_bytes,
            "transfer_wait_s": run.transfer_wait_s,
            "misses": s.misses,
            "hits": s.hits,
            "prefetch_bytes": s.prefetch_bytes,
            "wasted_prefetch_bytes": s.wasted_prefetch_bytes,
            "prefetch_wait_s": run.prefetch_wait_s,
            "host_bank": self.bank.memory_kind,
        }
        return Generation(tokens=out, stats=stats, expert_counts=counts)


def build_engine(ckpt, plan: budget_lib.MemoryPlan, *, policy: str, batch: int) -> "OffloadEngine":
    """An `OffloadEngine` for policy 'offload' or 'prefetch' with `plan.slots` device slots.

    `plan` is `budget.policy_plan`'s for the policy: its workspace reserves staging room for
    one layer's copies in flight, at most `batch` x `experts_per_token` experts.
    """
    staging = min(batch * ckpt.config.experts_per_token, ckpt.config.num_experts)
    return OffloadEngine(ckpt, plan.slots, prefetch=policy == "prefetch", staging=staging)
