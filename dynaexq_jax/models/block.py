"""One decoder layer: the family's attention (softmax, latent or gated DeltaNet), then its MoE
block or dense MLP, each behind a pre-norm and a residual. Above `layers`, `mla` and
`deltanet`, which it chooses between, so none of them imports another's sibling."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.models.config import ModelConfig
from dynaexq_jax.models.deltanet import GatedDeltaNet
from dynaexq_jax.models.layers import Attention, DenseMLP, ExpertFFN, MoEBlock, make_norm
from dynaexq_jax.models.mla import LatentAttention


def attention_module(cfg: ModelConfig, dtype, kernels: bool = True, name: str | None = None) -> nn.Module:
    """The family's softmax attention: `Attention`, or latent attention (`models.mla`)."""
    if cfg.mla:
        return LatentAttention(cfg, dtype, kernels, name=name)
    return Attention(cfg, dtype, kernels, name=name)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    kind: str  # "moe" | "dense"
    dtype: jnp.dtype
    ffn: ExpertFFN
    router_probs: bool = False
    kernels: bool = True  # Pallas decode kernels allowed when lowering for a GPU (off to differentiate)
    attention: str = "full"  # "full" or "linear" (gated DeltaNet)

    @nn.compact
    def __call__(self, x, rot, token_valid, kv, layer, start, index, experts, moe_layer, fresh: bool = False,
                 big_little: BigLittle | None = None, first=None):
        """`kv`, `layer`: the stacked cache of this layer's attention kind and the layer's row in
        it (full: the KV cache; linear: the (conv, recurrent) states, `models.deltanet`).
        -> (x, kv, Routing or None, first): `first` as `MoEBlock` passes it on."""
        cfg = self.cfg
        if self.attention == "linear":
            h, kv = GatedDeltaNet(cfg, self.dtype, self.kernels, name="linear_attn")(
                make_norm(cfg, "input_layernorm")(x), token_valid, kv, layer, fresh)
        else:
            h, kv = attention_module(cfg, self.dtype, self.kernels, name="self_attn")(
                make_norm(cfg, "input_layernorm")(x), rot, kv, layer, start, index, fresh
            )
        x = x + h
        hn = make_norm(cfg, "post_attention_layernorm")(x)
        if self.kind == "moe":
            moe = MoEBlock(cfg, self.dtype, self.ffn, self.router_probs, self.kernels, name="mlp")
            x, route, first = moe(hn, token_valid, experts, moe_layer, residual=x, big_little=big_little, first=first)
        else:
            x, route = x + DenseMLP(cfg.intermediate_size, self.dtype, self.kernels, name="mlp")(hn), None
        return x, kv, route, first
