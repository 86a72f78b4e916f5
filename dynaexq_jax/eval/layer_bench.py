"""The fused decode layer's attention-side kernels timed one by one, with their tiling variants
(`scripts/bench_decode_layer.py`, and gpu_check's layer-kernels stage).

For each batch (1 and 32 at Qwen3-30B-A3B's shapes, context 1024) on one layer of random weights:
  attn_in           residual + pending MoE rows, RMSNorm, q/k/v, q/k norm, RoPE, KV write
  decode_attention  flash-decoding partials over the filled cache
  attn_out          the partials merged, the output projection, the residual add
  route             RMSNorm, router, top-k, the routing record, the sorted pair plan
and, on a GPU, each kernel's knobs: attn_in's num_warps x num_stages, attn_out's block_n x
num_warps x num_stages (rows `attn_out[bn=..,warps=..,stages=..]`), route's block_k (the router
weights' rows a step reads) x num_warps; a variant that does not compile (shared memory) is
listed with its error. Per call: the median time, the bytes it must move (its layer's weights,
the KV it reads, its activations), the achieved GB/s and its share of the copy bandwidth
measured in the same run, the programs it runs, and the largest error against the kernel's
plain-jnp reference (relative to the output's largest value). Off a GPU the kernels run in
interpret mode: those times are the interpreter's, so no rate is given and there is no sweep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from dynaexq_jax.io.preset import preset_config
from dynaexq_jax.runtime import costmodel
from pallas_kernels.decode_attention import num_splits
from pallas_kernels.decode_layer import attn_out_block_n, row_tile

FULL = dict(preset="qwen3-30b-a3b", batches=(1, 32), context=1024, copy_bytes=1 << 30, reps=25, inner=20)
SMOKE = dict(preset="qwen3-moe-smoke", batches=(1, 4), context=64, copy_bytes=1 << 20, reps=2, inner=1)
# Beside each default (attn_in: 4 warps, 2 stages; attn_out: block_n 64, 4 warps, 2 stages); each
# compiles for an H200 at 30B's shapes (deviceless; attn_in at 3 stages asks for 272-416 KB of
# shared memory, over its 227).
ATTN_IN = [dict(num_warps=8, num_stages=2), dict(num_warps=4, num_stages=1)]
ATTN_OUT = [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (16, 32, 64) for w, s in ((4, 2), (4, 1), (8, 2))
            if (bn, w, s) != (64, 4, 2)]
ROUTE = [dict(block_k=128), dict(block_k=128, num_warps=8), dict(block_k=256, num_warps=8)]  # default: 64, 4 warps
LAYERS = 2  # stacked parameters of two layers; every kernel reads layer 1's


def problem(model, batch: int, context: int) -> dict:
    """Random inputs of one decode step at `batch` rows (every slot before the last one filled)."""
    H, Hq, KVH, D, E, k = (model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim,
                           model.num_experts, model.experts_per_token)
    keys = iter(jax.random.split(jax.random.key(batch), 16))
    bf = lambda *s, scale=1.0: (jax.random.normal(next(keys), s, jnp.float32) * scale).astype(jnp.bfloat16)
    tm, kp = row_tile(batch), 1 << (k - 1).bit_length()
    pos = np.full((tm, kp), -1, np.int32)
    pos[:batch, :k] = np.arange(batch * k).reshape(batch, k)
    angle = np.random.default_rng(batch).uniform(0, np.pi, (batch, D)).astype(np.float32)
    return dict(x1=bf(batch, H), y=bf(batch * k, H, scale=0.1), pos=jnp.asarray(pos), norm_w=bf(LAYERS, H),
                w_qkv=bf(LAYERS, H, (Hq + 2 * KVH) * D, scale=H**-0.5), qk_norm=bf(LAYERS, 2 * D),
                cos=jnp.asarray(np.cos(angle), jnp.bfloat16), sin=jnp.asarray(np.sin(angle), jnp.bfloat16),
                kv=bf(LAYERS, 2, batch, KVH, context, D), w_o=bf(LAYERS, Hq * D, H, scale=(Hq * D) ** -0.5),
                gate_w=bf(LAYERS, H, E, scale=H**-0.5), tier_of=jnp.zeros((LAYERS, E), jnp.int32),
                row_of=jnp.arange(LAYERS * E, dtype=jnp.int32).reshape(LAYERS, E),
                valid=jnp.ones((batch,), jnp.int32), chosen=jnp.zeros((LAYERS, batch, E), jnp.float32))


def kernels(model, p: dict, batch: int, context: int, interpret: bool):
    """(name, fn(**knobs) -> jitted call, its arguments, reference call, bytes, programs, knob
    variants) for each kernel."""
    H, Hq, KVH, D, E, k = (model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim,
                           model.num_experts, model.experts_per_token)
    eps, layer, index = model.rms_norm_eps, jnp.int32(1), jnp.int32(context - 1)
    start = jnp.zeros((batch,), jnp.int32)
    N = (Hq + 2 * KVH) * D
    row = 2 * batch * H  # one bf16 activation row per batch row
    in_args = (p["x1"], p["y"], p["pos"], p["norm_w"], p["w_qkv"], p["cos"], p["sin"], p["kv"], layer, index)
    in_kw = dict(heads=Hq, kv_heads=KVH, eps=eps, qk_norm=p["qk_norm"])
    attn_in = lambda **kn: jax.jit(functools.partial(pallas_kernels.attn_in, **in_kw, interpret=interpret, **kn))
    x, q, kv = attn_in()(*in_args)
    splits = num_splits(batch, KVH, context)
    dec_args = (q, kv, layer, start, index)
    dec_kw = dict(kv_heads=KVH, scale=D**-0.5)
    decode = lambda **kn: jax.jit(functools.partial(pallas_kernels.decode_attention_partials, **dec_kw,
                                                    interpret=interpret, **kn))
    o, m, l = decode()(*dec_args)
    partials = sum(a.size * 4 for a in (o, m, l))
    out_args = (o, m, l, x, p["w_o"], layer)
    attn_out = lambda **kn: jax.jit(functools.partial(pallas_kernels.attn_out, heads=Hq, interpret=interpret, **kn))
    x1 = attn_out()(*out_args)
    route_args = (x1, p["norm_w"], p["gate_w"], p["tier_of"], p["row_of"], p["valid"], p["chosen"], layer, layer)
    route_kw = dict(k=k, eps=eps, mode=model.router, norm_topk=model.norm_topk_prob, rows_per_tier=LAYERS * E,
                    tile_rows=16)
    plan = lambda r: (r.hn, r.pos, r.chosen)  # the normed rows, the pairs' places, the routing record
    route = lambda **kn: jax.jit(lambda *a: plan(pallas_kernels.route(*a, **route_kw, interpret=interpret, **kn)))
    G = Hq // KVH
    merged = lambda **kn: jax.jit(lambda *a: pallas_kernels.merge_partials(*decode(**kn)(*a), G))
    merged_ref = lambda *a: pallas_kernels.attn_out_reference(*a, heads=Hq)
    return [
        ("attn_in", attn_in, in_args, lambda *a: pallas_kernels.attn_in_reference(*a, **in_kw)[:2],
         H * N * 2 + row * (2 + k) + 2 * batch * N, Hq + 2 * KVH, ATTN_IN),
        ("decode_attention", merged, dec_args,  # timed with the merge the reference's output needs (XLA's)
         lambda q, *a: pallas_kernels.decode_attention_reference(q.reshape(batch, KVH, G, D), *a, scale=D**-0.5),
         2 * batch * KVH * context * D * 2 + batch * Hq * D * 2 + partials, batch * KVH * splits, []),
        ("attn_out", attn_out, out_args, merged_ref, Hq * D * H * 2 + partials + 2 * row, None, ATTN_OUT),
        ("route", route, route_args, lambda *a: plan(pallas_kernels.route_reference(*a, **route_kw)),
         H * E * 2 + 2 * row + 4 * batch * E, 1, ROUTE),
    ]


def run(cfg: dict, *, reps: int, inner: int, gpu: bool, bw: float, sweep_tiling: bool = True):
    """Each kernel's row as it is measured, and on a GPU with `sweep_tiling` each variant's (`bw`:
    the copy bandwidth its share is of; each call the median of `reps` x `inner`)."""
    model = preset_config(cfg["preset"])
    for batch in cfg["batches"]:
        p = problem(model, batch, cfg["context"])
        for name, make, call_args, reference, moved, programs, variants in kernels(model, p, batch, cfg["context"],
                                                                                    interpret=not gpu):
            ref = [np.asarray(r, np.float64) for r in jax.tree.leaves(reference(*call_args))]
            for knobs in [{}] + (variants if gpu and sweep_tiling else []):
                label = name + ("[" + ",".join(f"{k.replace('block_', 'b').replace('num_', '')}={v}"
                                               for k, v in knobs.items()) + "]" if knobs else "")
                row = dict(batch=batch, kernel=label, mb=moved / 1e6, us=None, gbs=None, pct=None, err=None,
                           programs=programs or model.hidden_size // (knobs.get("block_n")
                                                                       or attn_out_block_n(model.hidden_size)))
                try:
                    fn = make(**knobs)
                    sec = costmodel.call_seconds(fn, *call_args, reps=reps, inner=inner)
                    got = [np.asarray(g, np.float64) for g in jax.tree.leaves(fn(*call_args))][:len(ref)]
                except Exception as e:  # a variant the GPU cannot run (shared memory, registers): say so, go on
                    yield dict(row, error=str(e).splitlines()[0][:100])
                    continue
                err = max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref))
                yield dict(row, us=sec * 1e6, err=err, gbs=moved / sec / 1e9 if gpu else None,
                           pct=100 * moved / sec / bw if gpu else None)


COLUMNS = [("batch", "batch", "{}"), ("kernel", "kernel", "{}"), ("programs", "programs", "{}"),
           ("us", "time (us)", "{:.1f}"), ("mb", "bytes (MB)", "{:.2f}"), ("gbs", "GB/s", "{:.0f}"),
           ("pct", "% copy BW", "{:.0f}"), ("err", "rel err", "{:.1e}")]


def table(rows) -> str:
    heads = [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in COLUMNS]
        if "error" in r:
            cells[3] = f"failed: {r['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
