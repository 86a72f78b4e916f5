"""Multi-head latent attention (DeepSeek-V2/V3's MLA), with a cache of the latent only.

Per token, x is compressed to a latent c = RMSNorm(x W_dkv) of kv_lora_rank values and one
rotary key k_r = RoPE(x W_kr) of R = qk_rope_head_dim values shared by all heads; head h's key
is [c W_uk[h], k_r] and its value c W_uv[h] (W_uk, W_uv: `kv_b_proj` split per head). Queries
come through a low-rank bottleneck (q_a_proj, an RMSNorm, q_b_proj; or one q_proj), each head
[q_nope (qk_nope_head_dim), q_r (R, rotated)].

The KV cache holds [c, k_r] per token and layer: kv_lora_rank + R values (576 for DeepSeek-V3,
against 128 heads x (192 + 128) expanded), in the stacked cache's layout with one "head"
([L, 1, B, 1, S, kv_lora_rank + R]). Attention over the cache runs in the latent space: W_uk
is absorbed into the query (q_lat[h] = q_nope[h] W_uk[h]^T, so q_lat[h] . c = q_nope[h] . k[h]
minus the rotary part) and W_uv into the output (o[h] = (softmax . c) W_uv[h]), so a decode step
reads the latent cache and never expands keys or values; on a GPU its attention is one Pallas
kernel that reads the layer's filled slots of the stacked cache in place
(`pallas_kernels.latent_attention`). A fresh prefill (nothing cached before it) expands its own
chunk's keys and values per head instead, the cheaper order for many queries over few keys.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynaexq_jax.models.config import ModelConfig, yarn_mscale
from dynaexq_jax.models.layers import Linear, RMSNorm, _attention, as_array, mm, rope
from pallas_kernels.latent_attention import latent_attention, latent_attention_supported


def cache_shape(cfg: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """The stacked latent cache: [layers, 1, B, 1, S, kv_lora_rank + qk_rope_head_dim]."""
    return (len(cfg.full_layers), 1, batch, 1, length, cfg.kv_lora_rank + cfg.head_dim)


def softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope_head_dim + qk_rope_head_dim)^-1/2, times YaRN's mscale(factor, mscale_all_dim)^2
    (transformers' `yarn_apply_mscale`, DeepSeek's rule for the non-rotary dims too)."""
    scale = (cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def deinterleave(x):
    """[..., R] with rotary pairs interleaved (x0, x1), (x2, x3), ... -> evens then odds: the
    rotate-half layout, in which `rope` rotates the same pairs by the same angles."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], -1)


class Weight(nn.Module):
    """A weight on its own (a `LayerSlice` inside the layer scan), as Hugging Face stores it
    ([out, in]): `kv_b_proj` is kept [heads, qk_nope_head_dim + v_head_dim, kv_lora_rank], each
    head's W_uk rows, then its W_uv rows."""

    shape: tuple[int, ...]
    dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        return self.param("weight", nn.initializers.lecun_normal(), self.shape, self.dtype)


class LatentAttention(nn.Module):
    """MLA with `layers.Attention`'s interface. Params (Hugging Face names): `q_a_proj`,
    `q_a_layernorm`, `q_b_proj` (or `q_proj`), `kv_a_proj_with_mqa` [H, kv_lora_rank + R],
    `kv_a_layernorm`, `kv_b_proj` (`Weight`, [heads, qk_nope_head_dim + v_head_dim, kv_lora_rank]),
    `o_proj` [heads * v_head_dim, H]."""

    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: bool = True

    @nn.compact
    def __call__(self, x, rot, kv, layer, start, index, fresh: bool = False):
        """x [B, T, H]; kv: the stacked latent cache (`cache_shape`); writes T slots of `layer`
        from `index` ([] or per row [B]). `fresh`: the cache held nothing before. -> (out, kv)."""
        cfg = self.cfg
        B, T, _ = x.shape
        NH, DN, R, DV, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        linear = lambda n, name: Linear(n, self.dtype, self.kernels, name=name)
        if cfg.q_lora_rank:
            q = linear(NH * (DN + R), "q_b_proj")(
                RMSNorm(cfg.rms_norm_eps, name="q_a_layernorm")(linear(cfg.q_lora_rank, "q_a_proj")(x)))
        else:
            q = linear(NH * (DN + R), "q_proj")(x)
        q = q.reshape(B, T, NH, DN + R)
        q_nope, q_rot = q[..., :DN], q[..., DN:]
        ckv = linear(C + R, "kv_a_proj_with_mqa")(x)
        c = RMSNorm(cfg.rms_norm_eps, name="kv_a_layernorm")(ckv[..., :C])  # [B, T, C]
        k_rot = ckv[..., None, C:]  # [B, T, 1, R]: one rotary key for every head
        if cfg.rope_interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = rope(q_rot, *rot), rope(k_rot, *rot)

        new = jnp.concatenate([c, k_rot[:, :, 0]], -1).astype(kv.dtype)  # [B, T, C + R]
        if jnp.ndim(index) == 0:  # rows aligned by left padding: one slice of slots
            kv = jax.lax.dynamic_update_slice(kv, new[None, None, :, None], (layer, 0, 0, 0, index, 0))
        else:  # [B]: each row its own sequence, written at its own slot
            slots = index[:, None] + jnp.arange(T)  # [B, T]
            kv = kv.at[layer, 0, jnp.arange(B)[:, None], 0, slots].set(new)

        kv_b = as_array(Weight((NH, DN + DV, C), self.dtype, name="kv_b_proj")())
        w_uk, w_uv = kv_b[:, :DN], kv_b[:, DN:]  # [NH, DN, C], [NH, DV, C]
        scale = softmax_scale(cfg)
        if fresh:  # this chunk's own keys and values, expanded per head
            k = jnp.concatenate([mm(c, w_uk, "btc,hdc->bthd"), jnp.broadcast_to(k_rot, (B, T, NH, R))], -1)
            heads = lambda a: a.astype(kv.dtype).transpose(0, 2, 1, 3)  # [B, NH, T, .], slots 0..T-1
            qg = jnp.concatenate([q_nope, q_rot], -1)[:, :, :, None]  # [B, T, NH, 1, DN + R]
            out = _attention(qg, heads(k), heads(mm(c, w_uv, "btc,hvc->bthv")), start, 0, dtype=self.dtype,
                             scale=scale)
        else:  # in the latent space, over the cache
            q_lat = mm(q_nope, w_uk, "bthd,hdc->bthc")  # W_uk absorbed into the query
            q = jnp.concatenate([q_lat, q_rot.astype(q_lat.dtype)], -1)  # [B, T, NH, C + R]

            def xla(q, kv, layer, start, index):
                cache = kv[layer, 0]  # [B, 1, S, C + R]: one "KV head", keys and values at once
                return _attention(q[:, :, None], cache, cache[..., :C], start, index, dtype=self.dtype,
                                  scale=scale)[:, :, 0]

            args = (q, kv, layer, start, index)
            if T == 1 and self.kernels and latent_attention_supported(C, R, kv.shape[4]):
                cuda = lambda q, kv, layer, start, index: latent_attention(
                    q[:, 0], kv, layer, start, index, rank=C, scale=scale, interpret=False)[:, None].astype(self.dtype)
                lat = jax.lax.platform_dependent(*args, cuda=cuda, default=xla)
            else:
                lat = xla(*args)
            out = mm(lat, w_uv, "bthc,hvc->bthv")  # W_uv absorbed into the output
        out = out.reshape(B, T, NH * DV)
        return linear(cfg.hidden_size, "o_proj")(out), kv
