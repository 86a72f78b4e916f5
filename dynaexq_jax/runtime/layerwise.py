"""The decoder run layer by layer from Python, for policies that choose a layer's experts
after its router has run (on-demand offloading, `policies.offload`).

Per MoE layer: a jitted attention + router function, a host read of which experts the layer
routes to (the synchronisation these systems pay), the policy's loads, then a jitted experts
function per round of slots. The expert state is an argument, so the cache changing never
retraces; every function is compiled once per shape bucket (the engine's buckets).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.experts.matmul import routed_ffn
from dynaexq_jax.models import big_little as bl_lib
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.models.block import attention_module
from dynaexq_jax.models.decoder import Decoder, KVCache
from dynaexq_jax.models.deltanet import GatedDeltaNet
from dynaexq_jax.models.layers import (
    DenseMLP,
    Router,
    SharedExpert,
    expert_activation,
    make_norm,
    rotary_for,
    route,
)
from dynaexq_jax.runtime.engine import (
    BigLittleSetting,
    Generation,
    NonFiniteError,
    batch_bucket,
    cache_bucket,
    check_context,
    check_request,
    compiler_options,
    left_pad,
    peak_device_bytes,
    prompt_bucket,
    timing_stats,
)
from dynaexq_jax.runtime.sampling import NON_FINITE, SamplingParams, flag_non_finite, sample

# Big-little counters `LayerwiseEngine._forward` adds up on the host (it reads each layer anyway).
_LITTLE = ("marked", "fallbacks", "little_tokens", "pairs_saved", "bytes_saved")


class _LayerFunctions:
    """The jitted pieces of one model config and big-little setting (None: plain top-k)."""

    def __init__(self, cfg, dtype, big_little: BigLittle | None = None):
        E = cfg.num_experts
        attention = attention_module(cfg, dtype)
        linear = GatedDeltaNet(cfg, dtype)
        gate = Router(cfg, dtype)
        dense_mlp = DenseMLP(cfg.intermediate_size, dtype)
        shared = SharedExpert(cfg, dtype)
        decoder = Decoder(cfg, dtype)
        activation = expert_activation(cfg)

        def rms(p, x):  # the family's norm (RMSNorm, or LayerNorm with bias)
            return make_norm(cfg).apply({"params": p}, x)

        def layer(seg, j):  # one layer's params out of its segment's stack (reads only that layer)
            return jax.tree.map(lambda a: a[j], seg)

        def embed_tokens(params, tokens, cache, token_valid):  # -> x [B, T, H], each row's first real slot [B]
            x = decoder.embed.apply({"params": params["embed_tokens"]}, tokens)
            return x, cache.written(token_valid)

        def attention_block(p, x, positions, token_valid, kv, i, start, index):
            """`kv`, `i`: the stacked cache of the layer's attention kind and its row (as in the decoder)."""
            if "linear_attn" in p:  # gated DeltaNet: `kv` is its (conv, recurrent) states
                h, kv = linear.apply({"params": p["linear_attn"]}, rms(p["input_layernorm"], x), token_valid, kv, i)
            else:
                rot = rotary_for(cfg, positions, dtype)
                h, kv = attention.apply({"params": p["self_attn"]}, rms(p["input_layernorm"], x), rot, kv, i, start,
                                        index)
            x = x + h
            return x, rms(p["post_attention_layernorm"], x), kv

        def router(p, hn, token_valid, first, is_first):
            """-> top_p, top_i, valid [BT, k] (pairs to compute), counts [E] (their experts),
            first [BT] (big-little's first-layer shares), tally [4] int32 (big-little: marked,
            fallbacks, dropped pairs, experts not read; zeros when off)."""
            B, T, H = hn.shape
            tv = token_valid.reshape(B * T)
            probs, top_p, top_i = route(cfg, *gate.apply({"params": p["mlp"]}, hn.reshape(B * T, H)))
            valid, tally = jnp.broadcast_to(tv[:, None], top_i.shape), jnp.zeros((4,), jnp.int32)
            if big_little is not None:
                valid, top_p, first, little = bl_lib.choose(cfg, big_little, probs, top_p, top_i, tv, first, is_first)
                tally = jnp.stack([jnp.sum(little.marked, dtype=jnp.int32), jnp.sum(little.fallback, dtype=jnp.int32),
                                   little.dropped_pairs, jnp.sum(little.skipped, dtype=jnp.int32)])
            counts = jnp.zeros((E,), jnp.int32).at[top_i].add(valid.astype(jnp.int32))
            return top_p.astype(dtype), top_i, valid, counts, first, tally

        def moe_attention(seg, j, token_valid, x, positions, kv, i, start, index, first, is_first):
            p = layer(seg, j)
            x, hn, kv = attention_block(p, x, positions, token_valid, kv, i, start, index)
            if cfg.shared_expert_size:  # always resident: added before the routed experts, as in the decoder
                x = x + shared.apply({"params": p["mlp"]}, hn)
            return (x, hn) + router(p, hn, token_valid, first, is_first) + (kv,)

        def dense_layer(seg, j, token_valid, x, positions, kv, i, start, index):
            p = layer(seg, j)
            x, hn, kv = attention_block(p, x, positions, token_valid, kv, i, start, index)
            return x + dense_mlp.apply({"params": p["mlp"]}, hn), kv

        def experts(state, hn, top_i, top_p, valid, acc):
            """acc [B, T, H] + one round's experts for the pairs `valid` [BT, k] (pairs whose
            expert has no slot this round are not computed)."""
            B, T, H = hn.shape
            y = routed_ffn(state, 0, hn.reshape(B * T, H), top_i, top_p, valid, activation=activation)
            return acc + y.reshape(B, T, H)

        def predict(seg, j, x, token_valid, first):
            """The next MoE layer's routing, guessed before its attention has run: its router
            on the current residual stream, normed with its post-attention norm (the input its
            router will see, minus one attention update). -> counts [E] over the pairs it will
            compute: with big-little, the little tokens' dropped pairs are not fetched (under
            the "first" rule each token's mode is already known)."""
            p = layer(seg, j)
            return router(p, rms(p["post_attention_layernorm"], x), token_valid, first, False)[3]

        def head(params, x):  # -> logits [B, T, V] float32
            return decoder.head(params, x)

        def next_token(params, x_last, key, knobs):  # x_last [B, 1, H] -> [B] int32
            logits = decoder.head(params, x_last)[:, -1]
            return flag_non_finite(logits, sample(logits, key, *knobs))

        self.jitted = {
            "embed": jax.jit(embed_tokens),
            "moe_attention": jax.jit(moe_attention, donate_argnums=(5,)),
            "dense_layer": jax.jit(dense_layer, donate_argnums=(5,)),
            "experts": jax.jit(experts),
            "predict": jax.jit(predict),
            "head": jax.jit(head),
            "next_token": jax.jit(next_token),
        }


class LayerwiseEngine:
    """`Engine`'s public surface (generate, logits, score) for a `layerwise` policy."""

    def __init__(self, checkpoint, policy, big_little: BigLittle | None = None):
        self.cfg = checkpoint.config
        self.checkpoint = checkpoint
        self.params = checkpoint.params
        self.policy = policy
        self._functions: dict[BigLittle | None, _LayerFunctions] = {}
        self.big_little = big_little
        self._executables: dict[tuple, Callable] = {}
        self.compile_s = 0.0
        self.workspace_bytes = 0  # XLA's temporaries of the largest function this engine ran
        # Where each decoder layer's parameters are: (segment, index in its stack). Looked up in
        # `self.params` at every call, so new parameter values (a router shift) take effect.
        self._where = [(s, j) for s, seg in enumerate(self.cfg.segments) for j in range(seg.count)]

    big_little = BigLittleSetting()

    @property
    def functions(self) -> _LayerFunctions:
        """The jitted pieces of the current big-little setting (each setting's made once)."""
        if self.big_little not in self._functions:
            self._functions[self.big_little] = _LayerFunctions(self.cfg, self.checkpoint.dtype, self.big_little)
        return self._functions[self.big_little]

    def _call(self, name: str, *args):
        """Run function `name`, compiled ahead of time once per argument shapes (the compile
        time is counted in `compile_s`, apart from the run)."""
        key = (name, self.big_little) + tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            fn = self.functions.jitted.get(name) or self.policy.jitted[name]  # the policy's own (floe)
            exe = self._executables[key] = fn.lower(*args).compile(compiler_options())
            self.compile_s += time.perf_counter() - t0
            self.workspace_bytes = max(self.workspace_bytes, exe.memory_analysis().temp_size_in_bytes)
        return exe(*args)

    def _forward(self, tokens, positions, token_valid, cache: KVCache, counts: np.ndarray, little: np.ndarray):
        """Every layer on [B, T] tokens written from `cache.index`; adds each MoE layer's
        computed pairs of real tokens into `counts` [moe_layers, E], and big-little's counters
        into `little` (`_LITTLE`). -> x [B, T, H], cache."""
        cfg, policy = self.cfg, self.policy
        index = jax.device_put(np.int32(cache.index))
        x, start = self._call("embed", self.params, tokens, cache.replace(index=index), token_valid)
        states = {"full": cache.kv, "linear": (cache.conv, cache.recurrent)}  # each attention kind's cache
        first = jax.device_put(np.zeros(tokens.size, np.float32))  # big-little's first-layer shares
        stacks = self.params["layers"]
        for i in range(cfg.num_layers):
            s, j = self._where[i]
            seg, kind = stacks[s], cfg.segments[s].attention
            li, lj = jax.device_put(np.int32(cfg.segments[s].first_state + j)), jax.device_put(np.int32(j))
            if not cfg.is_moe_layer(i):
                x, states[kind] = self._call("dense_layer", seg, lj, token_valid, x, positions, states[kind], li, start,
                                             index)
                continue
            m = cfg.moe_layers.index(i)
            x, hn, top_p, top_i, valid, c, first, tally, states[kind] = self._call(
                "moe_attention", seg, lj, token_valid, x, positions, states[kind], li, start, index, first,
                jax.device_put(np.bool_(m == 0)))
            c, tally = jax.device_get((c, tally))  # host sync: which experts this layer routes to
            counts[m] += c
            marked, fallbacks, dropped, skipped = (int(t) for t in tally)
            little += (marked, fallbacks, marked if m == 0 else 0, dropped, skipped * policy.expert_nbytes)
            if getattr(policy, "partial_experts", False):  # floe: the policy runs the layer's experts itself
                x = policy.moe_layer(m, c, hn, top_i, top_p, valid, x, self._call)
                continue
            for state in policy.rounds(m, c):
                x = self._call("experts", state, hn, top_i, top_p, valid, x)
            if policy.prefetch_enabled and m + 1 < len(cfg.moe_layers):
                ns, nj = self._where[cfg.moe_layers[m + 1]]
                policy.prefetch(m + 1, jax.device_get(self._call("predict", stacks[ns], jax.device_put(np.int32(nj)), x,
                                                                 token_valid, first)))
        T = tokens.shape[1]
        conv, recurrent = states["linear"]
        return x, KVCache(kv=states["full"], start=start, index=int(cache.index) + T, conv=conv, recurrent=recurrent)

    def _empty_cache(self, batch: int, length: int) -> KVCache:
        cache = KVCache.empty(self.cfg, batch, length, self.checkpoint.dtype)
        return dataclasses.replace(cache, index=0)  # a host int: the layer loop passes it per call

    def _prepared(self, batch: Sequence[Sequence[int]], length: int | None = None):
        longest = max(len(s) for s in batch)
        check_context(self.cfg, longest, 0)
        P = length or prompt_bucket(longest)
        return P, tuple(jax.device_put(a) for a in left_pad(batch, P, batch_bucket(len(batch))))

    def logits(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len_i, vocab] (float32) at every position of each token sequence."""
        P, (tokens, positions, valid) = self._prepared(batch)
        counts = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        x, _ = self._forward(tokens, positions, valid, self._empty_cache(tokens.shape[0], P), counts,
                             np.zeros(len(_LITTLE)))
        logits = jax.device_get(self._call("head", self.params, x))
        return [logits[b, P - len(s):] for b, s in enumerate(batch)]

    def score(self, seqs: Sequence[Sequence[int]], length: int | None = None):
        """Like `Engine.score`, computed on the host from `logits` (no routing statistics)."""
        P, (tokens, positions, valid) = self._prepared(seqs, length)
        counts = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        x, _ = self._forward(tokens, positions, valid, self._empty_cache(tokens.shape[0], P), counts,
                             np.zeros(len(_LITTLE)))
        logits = jax.device_get(self._call("head", self.params, x))
        out = []
        for b, s in enumerate(seqs):
            z = logits[b, P - len(s):-1]
            z = z - z.max(axis=-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
            out.append(logp[np.arange(len(s) - 1), np.asarray(s[1:])].astype(np.float32))
        return out, None

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
        rows = batch_bucket(B)
        P = prompt_bucket(longest)
        tokens, positions, valid = (jax.device_put(a) for a in left_pad(prompts, P, rows))
        lengths = np.array([len(p) for p in prompts] + [1] * (rows - B), np.int32)
        knobs = sampling.as_arrays()
        key = jax.random.key(sampling.seed)
        cache = self._empty_cache(rows, cache_bucket(P + max_new_tokens))
        counts = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        little = np.zeros(len(_LITTLE))
        self.policy.start_request()

        # Functions compile on first use; their compile time is reported apart, not in prefill_s / decode_s.
        t0, c0 = time.perf_counter(), self.compile_s
        x, cache = self._forward(tokens, positions, valid, cache, counts, little)
        nxt = self._call("next_token", self.params, x[:, -1:], key, knobs)
        ids = jax.device_get(nxt)[:B]
        prefill_s = time.perf_counter() - t0 - (self.compile_s - c0)
        h2d_prefill = self.policy.stats()["h2d_bytes"]  # decode's own bytes are the rest

        rows_valid = jax.device_put(np.arange(rows)[:, None] < B)
        decoded = 0  # decode steps run
        out = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        t1, c1 = time.perf_counter(), self.compile_s
        for i in range(max_new_tokens):
            for b in np.flatnonzero(~done):
                if ids[b] == NON_FINITE:
                    raise NonFiniteError.at(i, b)
                out[b].append(int(ids[b]))
                done[b] = ids[b] in eos
            if on_tokens is not None:
                on_tokens(ids)
            if done.all() or i == max_new_tokens - 1:
                break
            pos = jax.device_put((lengths + i)[:, None])
            x, cache = self._forward(nxt[:, None], pos, rows_valid, cache, counts, little)
            decoded += 1
            nxt = self._call("next_token", self.params, x[:, -1:], jax.random.fold_in(key, i + 1), knobs)
            ids = jax.device_get(nxt)[:B]
        decode_s = time.perf_counter() - t1 - (self.compile_s - c1)
        run = self.policy.run
        stats = {
            **timing_stats(out, lengths[:B], prefill_s, decode_s),
            "compile_s": self.compile_s,
            "workspace_measured_bytes": self.workspace_bytes,
            "hi_hit_rate": run.hit_pairs / run.pairs if run.pairs else None,
            "peak_device_bytes": peak_device_bytes(),
            **self.policy.stats(),
            "h2d_prefill_bytes": h2d_prefill,
        }
        if self.big_little is not None:
            # Real tokens: the prompts, then one per decode step of each of the B rows (all compute).
            tokens = int(lengths[:B].sum()) + decoded * B
            marked, fallbacks, little_tokens, dropped, saved = little
            stats["big_little"] = bl_lib.summary(
                self.big_little, self.cfg.experts_per_token, len(self.cfg.moe_layers), tokens=tokens,
                marked=int(marked), fallbacks=int(fallbacks), little_tokens=int(little_tokens),
                dropped_pairs=int(dropped), bytes_saved=float(saved))
        return Generation(tokens=out, stats=stats, expert_counts=counts)
