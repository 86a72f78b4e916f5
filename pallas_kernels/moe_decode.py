"""A MoE layer's routed experts for one new token per row, in three kernels.

`route` (one program): the post-attention RMSNorm of every row, the router's logits, softmax
and top-k, the routing record of the layer (written in place into the step's stacked record),
and the sorted tile plan of the layer's (token, expert) pairs. Pairs sort by the key
`tier * rows_per_tier + row` of the stored expert that serves them (`pallas_kernels.tiling`'s
keys; pairs of padding rows, of stopped rows or of experts with no stored row sort last as
INVALID); a pair's place is its rank, counted by comparing keys (no sort network), and every
per-pair table is scattered to it: the tile that opens there (if it does), its end, the
pair's token, combine weight and expert, and, per token, where its pairs went (`pos`).

`expert_gate_up` (grid: sorted pair, block of I): a tile of one expert's pairs times that
expert's gate and up columns, from whichever tier stores it (packed int8/4/3/2, MXFP4, dense),
then the gated activation; rows are gathered from the normed input by token, so nothing is
copied into sorted order first. `expert_down` (grid: sorted pair, block of H): the tile's
activations times the expert's down matrix, each row scaled by its pair's combine weight. Its
rows stay in sorted order: the next layer's `attn_in` (or the step's final norm) adds each
token's rows into the residual stream, so the combine costs no kernel of its own.

The K steps over each tier's storage are `tiled_matmul`'s (`grouped_matmul.tier_steps`), so
every tier that kernel reads, these read. `*_reference` are the same in plain jnp over dense
float weights.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_layer import _iota, _precision, _rows, row_tile
from pallas_kernels.grouped_matmul import Tier, default_block_n, gpu_unsupported_reason, tier_steps
from pallas_kernels.tiling import INVALID

F32 = jnp.float32
ROUTERS = ("softmax_topk", "topk_softmax")


def silu_glu(g, u):
    """SwiGLU: silu(gate) * up."""
    return jax.nn.silu(g) * u


def clamped_glu(g, u, *, alpha: float, limit: float):
    """gpt-oss's SwiGLU: the gate clamped above at `limit`, up clamped to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate)."""
    g = jnp.minimum(g, limit)
    u = jnp.clip(u, -limit, limit)
    return (u + 1) * (g * jax.nn.sigmoid(g * alpha))


class Route(NamedTuple):
    """What `route` gives the expert kernels (per-pair tables indexed by sorted position)."""

    hn: jax.Array  # [B, H] the normed rows the experts multiply
    hn_nibbles: jax.Array | None  # [B, H] the same in MXFP4 nibble order (`nibble_order`), if a tier wants it
    key: jax.Array  # [Pa] int32 key of the tile opening at the position, INVALID where none opens
    end: jax.Array  # [Pa] int32 end of the position's group (its expert's pairs)
    token: jax.Array  # [Pa] int32 the pair's row of the batch
    weight: jax.Array  # [Pa] float32 the pair's combine weight (rounded to the compute dtype)
    expert: jax.Array  # [Pa] int32 the pair's expert
    pos: jax.Array  # [tm, kp] int32 each row's pairs' positions, -1 for pairs not computed
    chosen: jax.Array  # [Lm, B, E] float32 the routing record: chosen experts' probabilities, -1 elsewhere


def _nibble_cols(c):
    """Column of `nibble_order`'s copy that holds column `c` (block of 32: evens, then odds)."""
    return (c // 32) * 32 + (c % 2) * 16 + (c % 32) // 2


def _div(a, b):
    return jax.lax.div(a, jnp.int32(b))


def _rem(a, b):
    return jax.lax.rem(a, jnp.int32(b))


# ------------------------------------------------------------------------------------- route


def _route_kernel(layer_ref, moe_ref, valid_ref, x_ref, nw_ref, gw_ref, *refs, batch, hidden, experts, k, tm, kp, ep,
                  bk, bx, eps, mode, norm_topk, rows_per_tier, tile_rows, has_bias, nibbles, dtype):
    refs = list(refs)
    gb_ref = refs.pop(0) if has_bias else None
    tier_ref, row_ref, _chosen_in, hn_ref = refs[:4]
    refs = refs[4:]
    hnn_ref = refs.pop(0) if nibbles else None
    key_ref, end_ref, tok_ref, w_ref, e_ref, pos_ref, chosen_ref = refs
    layer, moe = layer_ref[0], moe_ref[0]
    rows_ok, safe = _rows(tm, batch)
    live = lambda width: jnp.broadcast_to(rows_ok[:, None], (tm, width))
    load_x = lambda cols: plgpu.load(x_ref.at[safe[:, None], cols], mask=live(cols.shape[1]), other=0)

    def mean_square(s, ss):  # in blocks of bx >= bk: each is a load's latency the program waits for
        x = load_x(s * bx + _iota((1, bx), 1)).astype(F32)
        return ss + jnp.sum(x * x, axis=1)

    r = jax.lax.rsqrt(jax.lax.fori_loop(0, hidden // bx, mean_square, jnp.zeros((tm,), F32)) / hidden + eps)[:, None]
    ecol = _iota((1, ep), 1)
    e_ok = ecol < experts

    def logits_step(s, logits):
        k0 = s * bk
        cols = k0 + _iota((1, bk), 1)
        x = load_x(cols)
        hn = (nw_ref[layer, pl.ds(k0, bk)][None, :] * (x.astype(F32) * r).astype(dtype)).astype(dtype)
        plgpu.store(hn_ref.at[safe[:, None], cols], hn, mask=live(bk))
        if nibbles:
            plgpu.store(hnn_ref.at[safe[:, None], _nibble_cols(cols)], hn, mask=live(bk))
        g = plgpu.load(gw_ref.at[layer, k0 + _iota((bk, 1), 0), ecol], mask=jnp.broadcast_to(e_ok, (bk, ep)), other=0)
        return logits + jnp.dot(hn, g, preferred_element_type=F32, precision=_precision(dtype))

    logits = jax.lax.fori_loop(0, hidden // bk, logits_step, jnp.zeros((tm, ep), F32)).astype(dtype)
    if has_bias:
        logits = (logits + plgpu.load(gb_ref.at[layer, ecol], mask=e_ok, other=0)).astype(dtype)
    lf = jnp.where(e_ok, logits.astype(F32), -jnp.inf)
    e = jnp.exp(lf - jnp.max(lf, axis=1, keepdims=True))
    probs = e / jnp.sum(e, axis=1, keepdims=True)  # [tm, ep], 0 past E
    score = jnp.where(e_ok, probs if mode == "softmax_topk" else lf, -jnp.inf)
    kcol = _iota((tm, kp), 1)
    top_v = jnp.zeros((tm, kp), F32)
    top_i = jnp.zeros((tm, kp), jnp.int32)
    picked = jnp.zeros((tm, ep), jnp.bool_)
    for j in range(k):  # the largest left, the lowest expert among equals (XLA's top_k order)
        v = jnp.max(score, axis=1)
        idx = jnp.min(jnp.where(score == v[:, None], ecol, ep), axis=1)
        top_v = jnp.where(kcol == j, v[:, None], top_v)
        top_i = jnp.where(kcol == j, idx[:, None], top_i)
        hit = ecol == idx[:, None]
        picked = picked | hit
        score = jnp.where(hit, -jnp.inf, score)
    in_k = kcol < k
    if mode == "softmax_topk":
        wts = top_v
        if norm_topk:
            wts = wts / jnp.sum(jnp.where(in_k, wts, 0), axis=1, keepdims=True)
    else:  # the k largest logits, their softmax the weights
        z = jnp.where(in_k, top_v, -jnp.inf)
        z = jnp.exp(z - jnp.max(z, axis=1, keepdims=True))
        wts = z / jnp.sum(z, axis=1, keepdims=True)
    wts = jnp.where(in_k, wts, 0).astype(dtype).astype(F32)
    tv = plgpu.load(valid_ref.at[safe], mask=rows_ok, other=0) != 0  # rows still generating
    plgpu.store(chosen_ref.at[moe, safe[:, None], ecol], jnp.where(picked & tv[:, None], probs, -1.0),
                mask=live(ep) & jnp.broadcast_to(e_ok, (tm, ep)))
    # Keys of the (tier, row) serving each pair; pairs not computed sort last.
    pair_ok = jnp.broadcast_to((rows_ok & tv)[:, None], (tm, kp)) & in_k
    tier = plgpu.load(tier_ref.at[moe, top_i], mask=pair_ok, other=0)
    row = plgpu.load(row_ref.at[moe, top_i], mask=pair_ok, other=-1)
    valid = pair_ok & (row >= 0)
    key = jnp.where(valid, tier * rows_per_tier + row, INVALID)
    # Rank of each pair in (key, pair index) order: compare with every other pair, a row of the
    # batch at a time; the tile's rows past the batch hold INVALID keys only, counted in closed form.
    trow = _iota((tm, kp), 0)
    jq, jp, tp = _iota((1, 1, kp), 2), _iota((1, kp, 1), 1), _iota((tm, 1, 1), 0)

    def count(s, carry):
        less, tie, same = carry
        ks = jnp.sum(jnp.where(trow == s, key, 0), axis=0)[None, None, :]  # [1, 1, kp] row s's keys
        kk = key[:, :, None]
        eq = ks == kk
        first = (s < tp) | ((s == tp) & (jq < jp))
        n = lambda c: jnp.sum(c.astype(jnp.int32), axis=2)
        return less + n(ks < kk), tie + n(eq & first), same + n(eq)

    zero = jnp.zeros((tm, kp), jnp.int32)
    less, tie, same = jax.lax.fori_loop(0, batch, count, (zero, zero, zero))
    pad = key == INVALID  # equal to each of the (tm - batch) kp padding pairs, never above one
    tie += jnp.where(pad, kp * jnp.maximum(trow - batch, 0) + jnp.where(trow >= batch, kcol, 0), 0)
    same += jnp.where(pad, kp * (tm - batch), 0)
    rank = less + tie  # a permutation of 0 .. tm*kp-1
    opens = valid & (_rem(rank - less, tile_rows) == 0)
    plgpu.store(key_ref.at[rank], jnp.where(opens, key, INVALID))
    plgpu.store(end_ref.at[rank], less + same)
    plgpu.store(tok_ref.at[rank], trow)
    plgpu.store(w_ref.at[rank], wts)
    plgpu.store(e_ref.at[rank], top_i)
    plgpu.store(pos_ref.at[trow, kcol], jnp.where(valid, rank, -1))


def route(x1, norm_w, gate_w, tier_of, row_of, token_valid, chosen, layer, moe_layer, *, k: int, eps: float,
          mode: str, norm_topk: bool, rows_per_tier: int, tile_rows: int, interpret: bool, gate_bias=None,
          nibbles: bool = False, block_k: int | None = None, num_warps: int = 4) -> Route:
    """The router of MoE layer `moe_layer` (decoder layer `layer`) over x1 [B, H].

    norm_w [L, H] the post-attention RMSNorm weights; gate_w [L, H, E] the routers; gate_bias
    [L, E] or None; tier_of, row_of [Lm, E] int32 the stored expert serving each expert;
    token_valid [B] (nonzero: the row computes); chosen [Lm, B, E] float32 the step's routing
    record, written in place at `moe_layer`. `mode`: "softmax_topk" (softmax over the experts,
    the k largest, renormalised if `norm_topk`) or "topk_softmax" (the k largest logits, their
    softmax). `tile_rows`: rows per expert tile of the expert kernels. `nibbles`: also give the
    normed rows in MXFP4 nibble order. `block_k`: rows of the router's weights a step reads.
    """
    if mode not in ROUTERS:
        raise ValueError(f"router {mode!r} is not one of {ROUTERS}")
    B, H = x1.shape
    Lm, E = tier_of.shape
    tm, kp, ep = row_tile(B), 1 << (k - 1).bit_length(), max(16, 1 << (E - 1).bit_length())
    bk = block_k or next(b for b in (64, 32, 16) if H % b == 0)
    bx = next(b for b in (512, 256, 128, 64, 32, 16) if H % b == 0 and tm * b <= 8192)  # x alone, <= 32 KB in f32
    dt = x1.dtype
    pa = tm * kp
    i32 = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
    outs = [jax.ShapeDtypeStruct((B, H), dt)] + ([jax.ShapeDtypeStruct((B, H), dt)] if nibbles else [])
    outs += [i32(pa), i32(pa), i32(pa), jax.ShapeDtypeStruct((pa,), F32), i32(pa),
             jax.ShapeDtypeStruct((tm, kp), jnp.int32), jax.ShapeDtypeStruct(chosen.shape, F32)]
    args = (jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.reshape(moe_layer, (1,)).astype(jnp.int32),
            token_valid.astype(jnp.int32), x1, norm_w, gate_w, *(() if gate_bias is None else (gate_bias,)),
            tier_of, row_of, chosen)
    out = pl.pallas_call(
        functools.partial(_route_kernel, batch=B, hidden=H, experts=E, k=k, tm=tm, kp=kp, ep=ep, bk=bk, bx=bx, eps=eps,
                          mode=mode, norm_topk=norm_topk, rows_per_tier=rows_per_tier, tile_rows=tile_rows,
                          has_bias=gate_bias is not None, nibbles=nibbles, dtype=dt),
        out_shape=tuple(outs),
        grid=(1,),
        input_output_aliases={len(args) - 1: len(outs) - 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name=f"moe_route_m{B}",
    )(*args)
    hn, rest = out[0], list(out[1:])
    hnn = rest.pop(0) if nibbles else None
    return Route(hn, hnn, *rest)


def route_reference(x1, norm_w, gate_w, tier_of, row_of, token_valid, chosen, layer, moe_layer, *, k: int, eps: float,
                    mode: str, norm_topk: bool, rows_per_tier: int, tile_rows: int, gate_bias=None) -> Route:
    """`route` in plain jnp (a stable argsort for the ranks; `hn_nibbles` left out)."""
    dt = x1.dtype
    B, H = x1.shape
    Lm, E = tier_of.shape
    tm, kp = row_tile(B), 1 << (k - 1).bit_length()
    xf = x1.astype(F32)
    hn = (norm_w[layer] * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=1, keepdims=True) + eps)).astype(dt)).astype(dt)
    logits = jnp.dot(hn, gate_w[layer], preferred_element_type=F32, precision=_precision(dt)).astype(dt)
    if gate_bias is not None:
        logits = (logits + gate_bias[layer]).astype(dt)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    if mode == "softmax_topk":
        top_v, top_i = jax.lax.top_k(probs, k)
        wts = top_v / jnp.sum(top_v, -1, keepdims=True) if norm_topk else top_v
    else:
        top_v, top_i = jax.lax.top_k(logits.astype(F32), k)
        wts = jax.nn.softmax(top_v, axis=-1)
    tv = token_valid != 0
    picked = jnp.any(top_i[:, :, None] == jnp.arange(E), axis=1)
    chosen = chosen.at[moe_layer].set(jnp.where(picked & tv[:, None], probs, -1.0))
    pad = lambda a, fill: jnp.full((tm, kp), fill, a.dtype).at[:B, :k].set(a)
    top_i, wts = pad(top_i, 0), pad(wts.astype(dt).astype(F32), 0)
    row = jnp.where(jnp.arange(tm)[:, None] < B, row_of[moe_layer][top_i], -1)
    valid = (jnp.arange(kp) < k) & pad(jnp.broadcast_to(tv[:, None], (B, k)), False) & (row >= 0)
    key = jnp.where(valid, tier_of[moe_layer][top_i] * rows_per_tier + row, INVALID).reshape(-1)
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    skey = key[order]
    start = jnp.searchsorted(skey, skey, side="left")
    end = jnp.searchsorted(skey, skey, side="right").astype(jnp.int32)
    opens = (skey != INVALID) & ((jnp.arange(skey.size) - start) % tile_rows == 0)
    return Route(hn, None, jnp.where(opens, skey, INVALID).astype(jnp.int32), end,
                 (order // kp).astype(jnp.int32), wts.reshape(-1)[order], top_i.reshape(-1)[order],
                 jnp.where(valid, rank.reshape(tm, kp), -1).astype(jnp.int32), chosen)


# --------------------------------------------------------------------------- the expert kernels


def _tile(key_ref, end_ref, rows_per_tier, tm):
    """(tier, row, rows_ok, row index) of this program's tile (tier -1: no tile opens here)."""
    t = pl.program_id(0)
    key, end = key_ref[t], end_ref[t]
    tier = jnp.where(key == INVALID, -1, _div(key, rows_per_tier))
    rows = t + _iota((tm,), 0)
    ok = rows < end
    return tier, _rem(key, rows_per_tier), ok, jnp.where(ok, rows, key_ref.shape[0])


def _expert_refs(refs, arity, has_bias):
    """An expert kernel's operands after x: (the tiers' weight refs, (MoE layer, expert, bias refs)
    or Nones, the outputs)."""
    n_w = sum(arity)
    bias = tuple(refs[n_w:n_w + 3]) if has_bias else (None, None, None)
    return list(refs[:n_w]), bias, list(refs[n_w + (3 if has_bias else 0):])


def _row_loader(x_ref, rows, ok, tm):
    """`tier_steps`' xload: `width` columns from `k0` of x's (or `ref`'s) rows `rows` [tm], 0 where not `ok`."""
    def xload(k0, width, ref=None):
        return plgpu.load((x_ref if ref is None else ref).at[rows[:, None], k0 + _iota((1, width), 1)],
                          mask=jnp.broadcast_to(ok[:, None], (tm, width)), other=0)

    return xload


def _gate_up_kernel(key_ref, end_ref, tok_ref, x_ref, *refs, steps, arity, tm, bn, inter, rows_per_tier, glu,
                    has_bias, nibbles, dtype):
    w_refs, (moe_ref, e_ref, b_ref), refs = _expert_refs(refs, arity, has_bias)
    h_ref = refs[0]
    hn_ref = refs[1] if nibbles else None
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    tier, row, ok, idx = _tile(key_ref, end_ref, rows_per_tier, tm)
    tok = plgpu.load(tok_ref.at[idx], mask=ok, other=0)  # [tm] the rows' tokens
    xload = _row_loader(x_ref, tok, ok, tm)  # the tile's rows, gathered from the normed input by token
    cols = n0 + _iota((1, bn), 1)
    live = jnp.broadcast_to(ok[:, None], (tm, bn))
    first = 0
    for i, ((step, num_steps), n_refs) in enumerate(zip(steps, arity)):
        @pl.when(tier == i)
        def _(step=step, num_steps=num_steps, ws=tuple(w_refs[first:first + n_refs])):
            def body(s, gu):
                return gu[0] + step(ws, xload, row, s, n0), gu[1] + step(ws, xload, row, s, inter + n0)

            zero = jnp.zeros((tm, bn), F32)
            g, u = jax.lax.fori_loop(0, num_steps, body, (zero, zero))
            if has_bias:  # the expert's own bias rows, whichever tier serves it
                e = plgpu.load(e_ref.at[idx], mask=ok, other=0)[:, None]
                g += plgpu.load(b_ref.at[moe_ref[0], e, cols], mask=live, other=0).astype(F32)
                u += plgpu.load(b_ref.at[moe_ref[0], e, inter + cols], mask=live, other=0).astype(F32)
            # The activation of the rounded projections, computed in float32 (Triton has no bf16 math).
            h = glu(g.astype(dtype).astype(F32), u.astype(dtype).astype(F32)).astype(dtype)
            plgpu.store(h_ref.at[idx[:, None], cols], h, mask=live)
            if nibbles:
                plgpu.store(hn_ref.at[idx[:, None], _nibble_cols(cols)], h, mask=live)

        first += n_refs


def _down_kernel(key_ref, end_ref, wt_ref, x_ref, *refs, steps, arity, tm, bn, rows_per_tier, has_bias, dtype):
    w_refs, (moe_ref, e_ref, b_ref), (y_ref,) = _expert_refs(refs, arity, has_bias)
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    tier, row, ok, idx = _tile(key_ref, end_ref, rows_per_tier, tm)
    xload = _row_loader(x_ref, idx, ok, tm)  # the tile's own rows of the activations
    cols = n0 + _iota((1, bn), 1)
    live = jnp.broadcast_to(ok[:, None], (tm, bn))
    first = 0
    for i, ((step, num_steps), n_refs) in enumerate(zip(steps, arity)):
        @pl.when(tier == i)
        def _(step=step, num_steps=num_steps, ws=tuple(w_refs[first:first + n_refs])):
            acc = jax.lax.fori_loop(0, num_steps, lambda s, acc: acc + step(ws, xload, row, s, n0),
                                    jnp.zeros((tm, bn), F32))
            if has_bias:
                e = plgpu.load(e_ref.at[idx], mask=ok, other=0)[:, None]
                acc += plgpu.load(b_ref.at[moe_ref[0], e, cols], mask=live, other=0).astype(F32)
            w = plgpu.load(wt_ref.at[idx], mask=ok, other=0).astype(dtype)[:, None]
            plgpu.store(y_ref.at[idx[:, None], cols], (acc.astype(dtype) * w).astype(dtype), mask=live)

        first += n_refs


def expert_gate_up(hn, tiers: Sequence[Tier], r: Route, *, pairs: int, inter: int, rows_per_tier: int, tm: int,
                   glu, interpret: bool, bias=None, moe_layer=None, nibbles_out: bool = False):
    """act(x gate) * ... for each sorted pair: x the pair's token's row of `hn` [B, H], gate|up
    the expert's [H, 2I] from its tier (`tiers` as `tiled_matmul` takes them), `glu(g, u)` the
    gated activation. `bias` [Lm, E, 2I] (indexed by `moe_layer` and the pair's expert) or
    None. -> h [pairs, I] in sorted order (rows of pairs no tile computes undefined), and the
    same in MXFP4 nibble order if `nibbles_out`."""
    B, H = hn.shape
    dt = hn.dtype
    has_bias = bias is not None
    out = [jax.ShapeDtypeStruct((pairs, inter), dt)] * (2 if nibbles_out else 1)
    extra = (jnp.reshape(moe_layer, (1,)).astype(jnp.int32), r.expert, bias) if has_bias else ()
    call = functools.partial(_gate_up_kernel, rows_per_tier=rows_per_tier, glu=glu, has_bias=has_bias,
                             nibbles=nibbles_out, inter=inter)
    h = _expert_call(call, "moe_gate_up", hn, tiers, r, pairs=pairs, k=H, n=inter, tm=tm, out=out,
                             interpret=interpret, head=(r.key, r.end, r.token), tail=extra, xn=r.hn_nibbles)
    return (h[0], h[1]) if nibbles_out else h[0]


def expert_down(h, tiers: Sequence[Tier], r: Route, *, pairs: int, hidden: int, rows_per_tier: int, tm: int,
                interpret: bool, bias=None, moe_layer=None, h_nibbles=None):
    """Each sorted pair's activations `h` [pairs, I] times its expert's down [I, H], plus `bias`
    [Lm, E, H] if given, times the pair's combine weight -> y [pairs, H] in sorted order (rows
    of pairs no tile computes undefined: `pos` never points at them)."""
    has_bias = bias is not None
    extra = (jnp.reshape(moe_layer, (1,)).astype(jnp.int32), r.expert, bias) if has_bias else ()
    call = functools.partial(_down_kernel, rows_per_tier=rows_per_tier, has_bias=has_bias)
    (y,) = _expert_call(call, "moe_down", h, tiers, r, pairs=pairs, k=h.shape[1], n=hidden, tm=tm,
                                out=[jax.ShapeDtypeStruct((pairs, hidden), h.dtype)], interpret=interpret,
                                head=(r.key, r.end, r.weight), tail=extra, xn=h_nibbles)
    return y


def _expert_call(call, name, x, tiers, r, *, pairs, k, n, tm, out, interpret, head, tail, xn,
                         num_warps=4, num_stages=3):
    """pallas_call of an expert kernel over (sorted pair, block of `n`): operands `head`, x, the
    tiers' arrays, `tail`."""
    gate_up = name == "moe_gate_up"
    bn = default_block_n(n, pairs)
    steps, arity, arrays = tier_steps(tiers, k, 2 * n if gate_up else n, bn, _precision(x.dtype), xn)
    if not interpret:
        reason = gpu_unsupported_reason(k, n, [lay for _, lay in tiers], block_m=tm, block_n=bn)
        if reason:
            raise ValueError(f"{name} on GPU: {reason}.")
    return pl.pallas_call(
        functools.partial(call, steps=steps, arity=arity, tm=tm, bn=bn, dtype=x.dtype),
        out_shape=tuple(out),
        grid=(pairs, n // bn),
        compiler_params=plgpu.CompilerParams(num_warps=max(num_warps, tm * bn // 2048), num_stages=num_stages),
        interpret=interpret,
        name=f"{name}_tm{tm}",  # tm in the name: what the AOT report's byte count needs
    )(*head, x, *arrays, *tail)


def experts_supported(hidden: int, inter: int, layouts, pairs: int, tm: int) -> bool:
    """Whether the compiled expert kernels take these shapes and tiers."""
    return all(gpu_unsupported_reason(k, n, layouts, block_m=tm, block_n=default_block_n(n, pairs)) is None
               for k, n in ((hidden, inter), (inter, hidden)))


def experts_reference(hn, dense: Sequence[jax.Array], r: Route, *, pairs: int, rows_per_tier: int, glu,
                      gate_up_bias=None, down_bias=None, moe_layer=None):
    """`expert_down(expert_gate_up(...))` in plain jnp for dense float tiers [R, H, 2I] / [R, I, H]
    (`dense` as pairs (gate_up, down) per tier): y [pairs, H] for the computed pairs, 0 elsewhere."""
    dt = hn.dtype
    # Each pair's key is that of the tile covering it: the last one opened at or before it,
    # if the pair is before that tile's end.
    key = r.key[:pairs]
    tile_start = jax.lax.cummax(jnp.where(key != INVALID, jnp.arange(pairs), -1))
    opener = jnp.maximum(tile_start, 0)
    covered = (tile_start >= 0) & (jnp.arange(pairs) < r.end[opener])
    order_key = jnp.where(covered, key[opener], INVALID)
    tier = jnp.where(covered, order_key // rows_per_tier, 0)
    row = jnp.where(covered, order_key % rows_per_tier, 0)
    x = hn[r.token[:pairs]]
    gu = jnp.stack([d[0] for d in dense])[tier, row]  # [pairs, H, 2I]
    dn = jnp.stack([d[1] for d in dense])[tier, row]
    g = jnp.einsum("ph,phn->pn", x.astype(F32), gu.astype(F32), precision=jax.lax.Precision.HIGHEST)
    inter = dn.shape[1]
    if gate_up_bias is not None:
        g = g + gate_up_bias[moe_layer][r.expert[:pairs]].astype(F32)
    h = glu(g[:, :inter].astype(dt).astype(F32), g[:, inter:].astype(dt).astype(F32)).astype(dt)
    y = jnp.einsum("pi,pih->ph", h.astype(F32), dn.astype(F32), precision=jax.lax.Precision.HIGHEST)
    if down_bias is not None:
        y = y + down_bias[moe_layer][r.expert[:pairs]].astype(F32)
    y = (y.astype(dt) * r.weight[:pairs].astype(dt)[:, None]).astype(dt)
    return jnp.where(covered[:, None], y, 0)
