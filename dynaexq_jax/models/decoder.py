"""The decoder as pure functions of explicit pytrees: non-expert params, experts, KV cache.

    logits, cache, trace = Decoder(cfg, dtype)(params, experts, cache, tokens, positions, token_valid)

Layers are Flax modules; the decoder applies them segment by segment (`ModelConfig.segments`,
runs of layers of one kind), each segment a `jax.lax.scan` over its stacked parameters, so a
48-layer model traces and compiles one layer. The KV cache is one stacked array per K and V,
[layers, B, S, KVH, D], carried through the scans and updated in place at (layer, index). In a
hybrid model (Qwen3-Next) only the softmax-attention layers have KV rows; its gated DeltaNet
layers (`models.deltanet`) carry their constant-size states in the same cache pytree instead.

Experts are not parameters: each MoE layer calls `ffn(experts, moe_layer, x, ids, weights,
valid)` on the expert-state pytree it is given (`experts.matmul.routed_ffn` by default), so a
new expert version (a promotion) is a new argument value, never a retrace.

Parameter tree: {"embed_tokens": {"embedding"}, "layers": (segment trees, stacked on axis 0),
"norm": {"weight"}, "lm_head": {"kernel"} (absent when tied)}; inside a layer, the Hugging
Face names (`self_attn/q_proj/kernel`, `mlp/gate/kernel`, ...) with kernels [in, out]. What
varies by family (biases, LayerNorm biases, q/k norm shapes, attention sinks `self_attn/sinks`,
a shared expert under `mlp`) follows from `ModelConfig`'s fields; the family adapters map
checkpoints onto this tree.
"""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dynaexq_jax.experts.matmul import routed_ffn
from dynaexq_jax.models import deltanet, fused_decode, mla
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.models.block import DecoderLayer
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.layers import ExpertFFN, LayerSlice, Linear, Routing, make_norm, mm, rotary_for


@flax.struct.dataclass
class KVCache:
    # Keys and values in one array, written together; heads before slots, so a layer's
    # [B, KVH, S, D] is what the attention dots contract over without a transpose.
    # Latent attention (`models.mla`) caches one latent per token: [layers, 1, B, 1, S, latent].
    kv: jax.Array  # [full-attention layers, 2 (k, v), B, KVH, S, D]
    # [B] int32: each row's first real slot. Rows are left-padded and then only appended to,
    # so a row's real tokens are the slots from `start` to the last written; S: none yet.
    start: jax.Array
    # [] int32: next slot to write (all rows aligned by left padding), or [B]: each row's own
    # (the scheduler's sequence slots, each row a sequence from slot 0 that joins and leaves alone).
    index: jax.Array
    # Linear-attention layers (`models.deltanet`), None in models without them: the state after
    # every token written so far, constant in size. Unlike `kv` it cannot be rewound by moving
    # `index`: rewinding a sequence recomputes it (see `Engine.chat_turn`).
    conv: jax.Array | None = None  # [linear layers, B, K-1, C] the last K-1 convolution inputs
    recurrent: jax.Array | None = None  # [linear layers, B, HV, DK, DV] float32 delta-rule state

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = kv_shape(cfg, batch, length)
        conv = recurrent = None
        if cfg.linear_layers:
            conv_shape, rec_shape = deltanet.state_shapes(cfg, batch)
            conv, recurrent = jnp.zeros(conv_shape, dtype), jnp.zeros(rec_shape, jnp.float32)
        return cls(kv=jnp.zeros(shape, dtype), start=jnp.full((batch,), length, jnp.int32),
                   index=jnp.zeros((), jnp.int32), conv=conv, recurrent=recurrent)

    @property
    def length(self) -> int:
        return self.kv.shape[4]

    @staticmethod
    def nbytes_for(cfg: ModelConfig, batch: int, length: int, dtype) -> int:
        kv = math.prod(kv_shape(cfg, batch, length)) * jnp.dtype(dtype).itemsize
        linear = deltanet.state_nbytes(cfg, batch, dtype) if cfg.linear_layers else 0
        return kv + linear + 4 * batch  # + each row's start

    def written(self, token_valid) -> jax.Array:
        """`start` after writing a chunk whose real tokens are `token_valid` [B, T] from `index`."""
        first = self.index + jnp.argmax(token_valid, axis=1).astype(jnp.int32)
        return jnp.where(jnp.any(token_valid, axis=1), jnp.minimum(self.start, first), self.start)


def kv_shape(cfg: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """The stacked KV cache of the softmax-attention layers: K and V per KV head, or MLA's latent."""
    if cfg.mla:
        return mla.cache_shape(cfg, batch, length)
    return (len(cfg.full_layers), 2, batch, cfg.num_kv_heads, length, cfg.head_dim)


def _no_experts(experts, moe_layer, x, expert_ids, weights, token_valid, residual, activation=None):
    """Stand-in FFN while tracing the parameter tree (experts are not parameters)."""
    return residual


class Decoder:
    """The whole model. `ffn` computes an MoE layer's experts from the expert-state pytree."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16, ffn: ExpertFFN = routed_ffn, router_probs: bool = False,
                 kernels: bool = True, interpret: bool = False):
        """`router_probs`: also return every expert's router probability summed per layer (what
        a load-balancing loss needs). `kernels`: use the Pallas decode kernels when lowering
        for a GPU; training turns them off (they have no derivative rules). `interpret`: run
        the GPU's decode path (`models.fused_decode`) on every platform, its kernels in
        interpret mode (tests of that path on a CPU)."""
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)
        self.ffn, self.kernels, self.interpret = ffn, kernels, interpret
        self.layers = {(kind, attn): DecoderLayer(cfg, kind, self.dtype, ffn, router_probs, kernels, attn)
                       for kind in ("moe", "dense") for attn in ("full", "linear")}
        self.router_probs = router_probs
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.vocab_size, self.dtype, use_bias=cfg.lm_head_bias)

    def __call__(self, params, experts, cache: KVCache, tokens, positions, token_valid, last_only: bool = False,
                 fresh: bool = False, big_little: BigLittle | None = None):
        """tokens, positions, token_valid: [B, T]. Writes T cache slots from `cache.index`.
        `fresh` (static): the cache is empty (index 0), so attention reads only this chunk.
        `big_little` (static): big-little routing (`models.big_little`); None: plain top-k.

        Returns logits [B, T, V] float32 ([B, 1, V] of the last position if `last_only`), the
        updated cache, and the routing of this call's real tokens: `Routing` stacked over the MoE
        layers (`chosen` [moe_layers, B*T, E]; `router_probs` [moe_layers, E] if asked for).
        """
        cfg = self.cfg
        chex.assert_equal_shape((tokens, positions, token_valid))
        chex.assert_rank(tokens, 2)
        x = self.embed.apply({"params": params["embed_tokens"]}, tokens)
        start = cache.written(token_valid)
        rot = rotary_for(cfg, positions, self.dtype)
        # The stacked caches of each attention kind: full layers write `kv`, linear ones their states.
        states = {"full": cache.kv, "linear": (cache.conv, cache.recurrent)}
        B, T = tokens.shape
        if (T == 1 and not fresh and big_little is None and self.kernels and not self.router_probs
                and (fused_decode.ENABLED or self.interpret)
                and self.ffn is routed_ffn and fused_decode.supported(cfg, experts, B, cache.length)):
            x, states["full"], routing = self._fused_decode(params, experts, states["full"], x, rot, token_valid,
                                                            start, cache.index)
        else:
            x, states, routing = self._layers(params, experts, states, x, rot, token_valid, start, cache.index,
                                              fresh, big_little)
        if last_only:  # prefill needs only the next token: skip the [B, T, V] projection
            x = x[:, -1:]
        logits = self.head(params, x)
        conv, recurrent = states["linear"]
        new_cache = KVCache(kv=states["full"], start=start, index=cache.index + tokens.shape[1], conv=conv,
                            recurrent=recurrent)
        return logits, new_cache, routing

    def _layers(self, params, experts, states, x, rot, token_valid, start, index, fresh, big_little):
        """Every layer, segment by segment, each segment a scan of its layer's modules.
        -> (x, states, Routing stacked over the MoE layers)."""
        cfg = self.cfg
        B, T = token_valid.shape
        # Each token's kept share at the first MoE layer (big-little's "first" rule), set there.
        first = jnp.zeros((B * T,), jnp.float32)
        routing = []
        for seg, seg_params in zip(cfg.segments, params["layers"]):
            layer_fn = self.layers[seg.kind, seg.attention]

            def body(carry, _, seg=seg, seg_params=seg_params, layer_fn=layer_fn):
                x, state, i, first = carry
                p = jax.tree.map(lambda a: LayerSlice(a, i), seg_params)  # the stack, read at layer i
                x, state, route, first = layer_fn.apply(
                    {"params": p}, x, rot, token_valid, state, seg.first_state + i, start, index, experts,
                    seg.first_moe + i, fresh, big_little, first,
                )
                return (x, state, i + 1, first), route

            carry = (x, states[seg.attention], jnp.zeros((), jnp.int32), first)
            (x, states[seg.attention], _, first), route = jax.lax.scan(body, carry, length=seg.count)
            if seg.kind == "moe":
                routing.append(route)
        if routing:
            routing = jax.tree.map(lambda *parts: jnp.concatenate(parts), *routing)
        else:
            routing = Routing(jnp.zeros((0, B * T, cfg.num_experts)), jnp.zeros((0, cfg.num_experts))
                              if self.router_probs else None)
        return x, dict(states), routing

    def _fused_decode(self, params, experts, kv, x, rot, token_valid, start, index):
        """One new token per row through `fused_decode.layers` when lowering for a GPU (or
        interpreted, see `interpret`), this decoder's own layers elsewhere. -> (x, kv, Routing)."""
        fused = functools.partial(fused_decode.layers, self.cfg, params["layers"][0], experts, interpret=self.interpret)
        if self.interpret:
            x, kv, chosen = fused(kv, x, rot, token_valid, start, index)
            return x, kv, Routing(chosen, None)

        def own(kv, x, rot, token_valid, start, index):
            x, states, routing = self._layers(params, experts, {"full": kv}, x, rot, token_valid, start, index,
                                              False, None)
            return x, states["full"], routing.chosen

        x, kv, chosen = jax.lax.platform_dependent(kv, x, rot, token_valid, start, index, cuda=fused, default=own)
        return x, kv, Routing(chosen, None)

    def head(self, params, x):
        """Final norm and LM head: x [B, T, H] -> logits [B, T, V] float32."""
        x = self.norm.apply({"params": params["norm"]}, x)
        if self.cfg.tie_word_embeddings:
            logits = mm(x, params["embed_tokens"]["embedding"], "...h,vh->...v")
        else:
            logits = self.lm_head.apply({"params": params["lm_head"]}, x)
        return logits.astype(jnp.float32)

    def init(self, key) -> dict:
        """Parameters with Flax's default initialisers (use `param_shapes` for shapes only)."""
        cfg = self.cfg
        x = jnp.zeros((1, 1, cfg.hidden_size), self.dtype)
        ones = jnp.ones((1, 1), bool)
        rot = rotary_for(cfg, jnp.zeros((1, 1), jnp.int32), self.dtype)
        states = {"full": jnp.zeros((1,) + kv_shape(cfg, 1, 1)[1:], self.dtype)}
        if cfg.linear_layers:  # one layer's states of one sequence
            conv, rec = deltanet.state_shapes(cfg, 1)
            states["linear"] = (jnp.zeros((1,) + conv[1:], self.dtype), jnp.zeros((1,) + rec[1:], jnp.float32))
        zero = jnp.zeros((), jnp.int32)
        start = jnp.zeros((1,), jnp.int32)
        keys = jax.random.split(key, len(cfg.segments) + 2)
        layers = []
        for seg, k in zip(cfg.segments, keys[2:]):
            mod = DecoderLayer(cfg, seg.kind, self.dtype, _no_experts, attention=seg.attention)
            one = lambda k, mod=mod, kv=states[seg.attention]: mod.init(k, x, rot, ones, kv, zero, start, zero, None,
                                                                       zero)["params"]
            layers.append(jax.vmap(one)(jax.random.split(k, seg.count)))
        params = {
            "embed_tokens": self.embed.init(keys[0], jnp.zeros((1, 1), jnp.int32))["params"],
            "layers": tuple(layers),
            "norm": self.norm.init(keys[1], x)["params"],
        }
        if not cfg.tie_word_embeddings:
            params["lm_head"] = self.lm_head.init(keys[1], x)["params"]
        return params

    def param_shapes(self) -> dict:
        return jax.eval_shape(self.init, jax.random.key(0))
