"""Pallas kernels (interpret mode) against float64 references, their tile planners, and
`grouped_matmul`'s backends against `jax.lax.ragged_dot`.

Shapes are small on purpose: interpreted kernels compile a loop over their grid, and these
tests share a small machine with other work.
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import pallas_kernels
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.matmul import grouped_matmul
from pallas_kernels import INVALID

K, N, GROUP = 64, 32, 32  # two quantization groups along K
TM = 8  # rows per tile in the tiled kernel tests
ROWS = 3  # weight rows per tier


def _dequantize64(qt):
    """float64 weights from the stored codes, scales and zeros (the packing itself is pinned
    against the documented layout in test_quant)."""
    q = np.asarray(quant.unpack(qt.packed, qt.bits, qt.group_size), np.float64)
    s = np.repeat(np.asarray(qt.scales.astype(jnp.float32), np.float64), qt.group_size, axis=-2)
    z = np.repeat(np.asarray(qt.zeros.astype(jnp.float32), np.float64), qt.group_size, axis=-2)
    return (q - z) * s


def _assert_close(out, ref, rel):
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=0, atol=rel * np.abs(ref).max())


# --------------------------------------------------------------------------- tiled_matmul


def _tiers(bits, rng):
    """A packed tier at `bits` and a dense tier of ROWS weights each, as the kernel takes them,
    and their float64 weights [2, ROWS, K, N] (index: tier, row)."""
    qt = quant.quantize(jnp.asarray(rng.standard_normal((ROWS, K, N)), jnp.float32), bits, GROUP)
    dense = rng.standard_normal((ROWS, K, N)).astype(np.float32)
    tiers = [((qt.packed, qt.scales, qt.zeros), qt.layout), ((jnp.asarray(dense),), None)]
    return tiers, np.stack([_dequantize64(qt), dense.astype(np.float64)])


def _poison(tiers, idle):
    """`tiers` with the weight rows of the (tier, row) pairs in `idle` made unreadable:
    packed codes 0xFF, NaN scales, zeros and dense weights."""
    out = []
    for t, (arrays, lay) in enumerate(tiers):
        mask = np.zeros((ROWS, 1, 1), bool)
        mask[[row for tier, row in idle if tier == t]] = True
        bad = lambda a: jnp.where(mask, jnp.asarray(0xFF if a.dtype == jnp.uint8 else jnp.nan, a.dtype), a)
        out.append((tuple(bad(a) for a in arrays), lay))
    return out


def _keys(sizes, extra):
    """Sorted row keys `tier * ROWS + row` for `sizes` rows per key, then `extra` INVALID rows."""
    keys = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    return np.concatenate([keys, np.full(extra, INVALID, np.int32)])


def _run_tiled(x, tiers, keys, planner, out_dtype=jnp.float32):
    """The kernel over rows `x` [P, K] with row keys `keys` [P] -> [P, N] (rows of INVALID
    keys are undefined)."""
    P = x.shape[0]
    keys = jnp.asarray(keys)
    if planner == "row_tiles":
        tiles = pallas_kernels.row_tiles(keys, TM)
    else:
        tiles = pallas_kernels.plan_tiles(keys, TM, pallas_kernels.max_tiles(P, 2 * ROWS, TM))
    xp = jnp.pad(x, ((0, TM), (0, 0)))
    out = pallas_kernels.tiled_matmul(xp, tiers, tiles, rows_per_tier=ROWS, n=N, tm=TM, out_dtype=out_dtype,
                                      interpret=True)
    return out[:P]


def _reference(x, weights, keys):
    """float64 rows of `x` times the weight their key names; rows of INVALID keys dropped."""
    x = np.asarray(x, np.float64)
    valid = keys != INVALID
    k = keys[valid]
    return np.einsum("pk,pkn->pn", x[valid], weights[k // ROWS, k % ROWS])


# Rows per key (tier 0 rows 0..2 = packed, tier 1 rows 0..2 = dense): keys without rows in
# both tiers, and counts that are not multiples of the 8-row tile (tiles end mid-group, a
# group spans several tiles).
SIZES = {
    8: [5, 0, 9, 1, 0, 13],
    4: [0, 3, 17, 0, 8, 2],
    3: [1, 1, 0, 9, 6, 0],
    2: [0, 12, 2, 7, 0, 1],
}


# Each width with one planner (the kernel's two tile modes: a tile per row slot, or compacted
# tiles with their own first rows); the poison test below runs both.
@pytest.mark.parametrize("bits, planner", [(8, "row_tiles"), (4, "plan_tiles"), (3, "row_tiles"), (2, "plan_tiles")])
def test_tiled_matmul_packed_and_dense_tiers_in_one_call_match_float64(bits, planner):
    rng = np.random.default_rng(bits)
    tiers, weights = _tiers(bits, rng)
    keys = _keys(SIZES[bits], extra=3)  # rows past the groups: padding tokens
    x = rng.standard_normal((len(keys), K)).astype(np.float32)
    out = np.asarray(_run_tiled(jnp.asarray(x), tiers, keys, planner))
    assert out.dtype == np.float32
    _assert_close(out[keys != INVALID], _reference(x, weights, keys), 1e-5)


def _mxfp4_64(t):
    """float64 weights [..., K, N] of an Mxfp4Tensor from its bytes: K index 2j from byte j's
    low nibble, 2j + 1 from its high one, times 2**(scale - 127) of its 32-value block."""
    b = np.asarray(t.blocks)
    codes = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.int64)
    codes[..., 0::2], codes[..., 1::2] = b & 0x0F, b >> 4
    mag = np.where(codes & 6, (1 + (codes & 1) / 2) * 2.0 ** (((codes >> 1) & 3) - 1), (codes & 1) / 2)
    scale = 2.0 ** (np.repeat(np.asarray(t.scales, np.float64), 32, axis=-1) - 127)
    return np.swapaxes(np.where(codes & 8, -mag, mag) * scale, -1, -2)


@pytest.mark.parametrize("planner", ["row_tiles", "plan_tiles"])
def test_tiled_matmul_with_an_mxfp4_tier_beside_int4_and_dense_matches_float64(planner):
    rng = np.random.default_rng(11)
    (packed, dense), weights = _tiers(4, rng)
    mx = quant.quantize_mxfp4(jnp.asarray(rng.standard_normal((ROWS, K, N)) * 3, jnp.float32))
    tiers = [packed, ((mx.blocks, mx.scales), mx.layout), dense]
    weights = np.stack([weights[0], _mxfp4_64(mx), weights[1]])
    keys = _keys([4, 0, 9, 1, 6, 3, 0, 2, 5], extra=3)
    x = rng.standard_normal((len(keys), K)).astype(np.float32)
    out = np.asarray(_run_tiled(jnp.asarray(x), tiers, keys, planner))
    _assert_close(out[keys != INVALID], _reference(x, weights, keys), 1e-5)
    # bf16 activations: MXFP4 values are exact in bf16, so only the activations' rounding remains.
    mine = (keys >= ROWS) & (keys < 2 * ROWS)  # the MXFP4 tier's rows, alone in a call
    xb = jnp.asarray(x[mine], jnp.bfloat16)
    out = np.asarray(_run_tiled(xb, tiers[1:2], keys[mine] - ROWS, planner))
    _assert_close(out, _reference(np.asarray(xb.astype(jnp.float32)), weights[1:2], keys[mine] - ROWS), 1e-5)


def test_tiled_matmul_in_bf16_is_within_bf16_tolerance():
    rng = np.random.default_rng(0)
    tiers, weights = _tiers(4, rng)
    # bf16 activations, dense weights in bf16 (the reference takes them as rounded), f32 accumulation.
    tiers = [(tuple(a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in arrays), lay)
             for arrays, lay in tiers]
    weights[1] = np.asarray(tiers[1][0][0].astype(jnp.float32), np.float64)
    keys = _keys([2, 0, 7, 1, 4, 0], extra=0)
    x = jnp.asarray(rng.standard_normal((len(keys), K)), jnp.bfloat16)
    out = _run_tiled(x, tiers, keys, "plan_tiles", out_dtype=jnp.float32)
    _assert_close(out, _reference(np.asarray(x.astype(jnp.float32)), weights, keys), 2e-2)


@pytest.mark.parametrize("planner", ["row_tiles", "plan_tiles"])
def test_tiles_never_read_weights_of_rows_without_tokens(planner):
    rng = np.random.default_rng(1)
    tiers, weights = _tiers(4, rng)
    sizes = [0, 3, 0, 0, 10, 0]
    idle = [(key // ROWS, key % ROWS) for key, n in enumerate(sizes) if n == 0]
    keys = _keys(sizes, extra=2)
    x = rng.standard_normal((len(keys), K)).astype(np.float32)
    out = np.asarray(_run_tiled(jnp.asarray(x), _poison(tiers, idle), keys, planner))
    _assert_close(out[keys != INVALID], _reference(x, weights, keys), 1e-5)


# ---------------------------------------------------------------------------- tile planners


def _python_tiles(keys, tm):
    """(key, first row, group end) of every tile, walking the sorted keys group by group."""
    tiles, r = [], 0
    while r < len(keys) and keys[r] != INVALID:
        end = r
        while end < len(keys) and keys[end] == keys[r]:
            end += 1
        tiles += [(int(keys[r]), start, end) for start in range(r, end, tm)]
        r = end
    return tiles


PLAN_ROWS, PLAN_GROUPS = 64, 8  # one shape for every random case: each planner compiles once per tm


def _random_keys(rng):
    """Sorted keys of up to PLAN_GROUPS groups (about a third of them empty), INVALID-padded
    to PLAN_ROWS rows."""
    sizes = rng.integers(0, 8, PLAN_GROUPS) * (rng.random(PLAN_GROUPS) < 0.7)
    return _keys(sizes, extra=PLAN_ROWS - int(sizes.sum()))


@pytest.mark.parametrize("tm", [1, 4, 8, 16])
def test_plan_tiles_matches_a_walk_over_the_groups(tm):
    rng = np.random.default_rng(tm)
    num_tiles = pallas_kernels.max_tiles(PLAN_ROWS, PLAN_GROUPS, tm)
    plan = jax.jit(functools.partial(pallas_kernels.plan_tiles, tm=tm, num_tiles=num_tiles))
    for _ in range(10):
        keys = _random_keys(rng)
        tiles = plan(jnp.asarray(keys))
        want = _python_tiles(keys, tm)
        assert len(want) <= num_tiles  # the static grid bound holds
        n = int(tiles.count)
        assert n == len(want)
        got = list(zip(*(np.asarray(a)[:n].tolist() for a in (tiles.key, tiles.start, tiles.end))))
        assert got == want
        assert np.all(np.asarray(tiles.key)[n:] == INVALID)


@pytest.mark.parametrize("tm", [1, 4, 8, 16])
def test_row_tiles_open_a_tile_on_exactly_the_rows_the_walk_starts_tiles_at(tm):
    rng = np.random.default_rng(100 + tm)
    plan = jax.jit(functools.partial(pallas_kernels.row_tiles, tm=tm))
    for _ in range(10):
        keys = _random_keys(rng)
        tiles = plan(jnp.asarray(keys))
        assert tiles.start is None and int(tiles.count) == PLAN_ROWS
        want = {start: (key, end) for key, start, end in _python_tiles(keys, tm)}
        key, end = np.asarray(tiles.key), np.asarray(tiles.end)
        for r in range(PLAN_ROWS):
            if r in want:
                assert (key[r], end[r]) == want[r], r
            else:
                assert key[r] == INVALID, r


def test_group_keys_follow_ragged_dot_semantics():
    keys = lambda sizes, rows: np.asarray(pallas_kernels.group_keys(jnp.asarray(sizes, jnp.int32), rows)).tolist()
    assert keys([2, 0, 3], 7) == [0, 0, 2, 2, 2, INVALID, INVALID]  # rows past the sum: no group
    assert keys([2, -1, 0, 1], 4) == [0, 0, 3, INVALID]  # negative sizes count as 0
    assert keys([4, 4], 5) == [0, 0, 0, 0, 1]  # a sum past the rows is cut off


# ------------------------------------------------------------------------------ layer_matmul


@pytest.mark.parametrize("rows", [5, 70])  # one tile; two tiles, the second partial
def test_layer_matmul_reads_only_its_layer_and_matches_float64(rows):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((3, K, N)).astype(np.float32)
    w[[0, 2]] = np.nan  # other layers: never read
    x = rng.standard_normal((rows, K)).astype(np.float32)
    out = pallas_kernels.layer_matmul(jnp.asarray(x), jnp.asarray(w), jnp.int32(1), out_dtype=jnp.float32,
                                      interpret=True)
    _assert_close(out, x.astype(np.float64) @ w[1].astype(np.float64), 1e-5)


# -------------------------------------------------------------------------- decode_attention


def _attention64(q, kv, layer, start, index, scale, sinks=None):
    """float64 softmax(q k^T * scale) v over slots start[b]..index; zeros for an empty row.
    `sinks` [KVH, G]: an extra logit per query head in the softmax's denominator only."""
    q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        k = kv[layer, 0, b, :, start[b]:index + 1]  # [KVH, n, D]
        v = kv[layer, 1, b, :, start[b]:index + 1]
        if k.shape[1] == 0:
            continue
        s = np.einsum("hgd,hnd->hgn", q[b], k) * scale
        m = s.max(-1, keepdims=True) if sinks is None else np.maximum(s.max(-1, keepdims=True), sinks[..., None])
        p = np.exp(s - m)
        denom = p.sum(-1, keepdims=True) + (0 if sinks is None else np.exp(sinks[..., None] - m))
        out[b] = np.einsum("hgn,hnd->hgd", p / denom, v)
    return out


# S=64 slots: block_k 16, 32, 64 give 4, 2 and 1 splits of the slots at this batch.
@pytest.mark.parametrize("block_k", [16, 32, 64])
def test_decode_attention_matches_float64_with_gqa_left_padding_and_splits(block_k):
    B, KVH, G, D, S, L = 3, 2, 3, 16, 64, 2
    rng = np.random.default_rng(block_k)
    start = np.array([0, 21, S], np.int32)  # full row, left-padded row, empty (batch padding) row
    index = 45  # the current token's slot; later slots hold stale values
    kv = rng.standard_normal((L, 2, B, KVH, S, D)).astype(np.float32)
    slot = np.arange(S)
    unseen = (slot[None, :] < start[:, None]) | (slot[None, :] > index)  # [B, S]
    kv = np.where(unseen[None, None, :, None, :, None], np.float32(1e4), kv)  # would dominate a softmax reading them
    kv[0] = np.nan  # another layer: never read
    q = rng.standard_normal((B, KVH, G, D)).astype(np.float32)
    scale = D**-0.5
    out = pallas_kernels.decode_attention(jnp.asarray(q), jnp.asarray(kv), jnp.int32(1), jnp.asarray(start),
                                          jnp.int32(index), scale=scale, interpret=True, block_k=block_k)
    ref = _attention64(q, np.where(np.isnan(kv), 0, kv), 1, start, index, scale)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    _assert_close(out, ref, 1e-5)
    assert not np.any(np.asarray(out)[2])


@pytest.mark.parametrize("block_k", [16, 64])
def test_decode_attention_with_sinks_matches_float64(block_k):
    """gpt-oss's sinks join the softmax where the splits merge: one sink far above the scores
    (most weight on nothing), one far below (none), the rest comparable."""
    B, KVH, G, D, S, L = 2, 2, 3, 16, 64, 1
    rng = np.random.default_rng(7 + block_k)
    start, index = np.array([0, 30], np.int32), 50
    kv = rng.standard_normal((L, 2, B, KVH, S, D)).astype(np.float32)
    q = rng.standard_normal((B, KVH, G, D)).astype(np.float32)
    sinks = rng.standard_normal((KVH, G)).astype(np.float32)
    sinks[0, 0], sinks[1, 2] = 40.0, -40.0
    out = pallas_kernels.decode_attention(jnp.asarray(q), jnp.asarray(kv), jnp.int32(0), jnp.asarray(start),
                                          jnp.int32(index), scale=D**-0.5, interpret=True, block_k=block_k,
                                          sinks=jnp.asarray(sinks))
    _assert_close(out, _attention64(q, kv, 0, start, index, D**-0.5, sinks), 1e-5)


@pytest.mark.parametrize("window", [0, 5, 40])
def test_decode_attention_kernel_agrees_with_the_xla_path_under_sinks_and_a_window(window):
    """The decoder's two decode paths (the Pallas kernel on a GPU, XLA elsewhere) on one query
    per row, sliding window as a later first slot for the kernel, a mask for XLA."""
    from dynaexq_jax.models.layers import _attention, _pallas_decode_attention

    B, KVH, G, D, S, L = 3, 2, 2, 16, 64, 2
    rng = np.random.default_rng(window)
    start, index = jnp.asarray([0, 12, S], jnp.int32), jnp.int32(33)  # full, left-padded, empty row
    kv = jnp.asarray(rng.standard_normal((L, 2, B, KVH, S, D)), jnp.float32)
    qg = jnp.asarray(rng.standard_normal((B, 1, KVH, G, D)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal((KVH, G)), jnp.float32)
    windows = jnp.asarray([7, window], jnp.int32)  # [L]: the kernel reads its layer's
    ours = _pallas_decode_attention(qg, kv, jnp.int32(1), start, index, dtype=jnp.float32, sinks=sinks,
                                    windows=windows, interpret=True)
    xla = _attention(qg, kv[1, 0], kv[1, 1], start, index, dtype=jnp.float32, sinks=sinks, window=windows[1])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5, rtol=0)


def test_decode_attention_reads_each_rows_own_current_slot():
    """The scheduler's rows are separate sequences: each row's current slot is its own (index
    [B]), in the kernel and in the XLA path alike."""
    from dynaexq_jax.models.layers import _attention

    B, KVH, G, D, S, L = 3, 2, 2, 16, 64, 2
    rng = np.random.default_rng(3)
    start, index = np.array([0, 5, 0], np.int32), np.array([10, 40, 63], np.int32)
    kv = rng.standard_normal((L, 2, B, KVH, S, D)).astype(np.float32)
    q = rng.standard_normal((B, KVH, G, D)).astype(np.float32)
    ref = np.concatenate([_attention64(q[b:b + 1], kv[:, :, b:b + 1], 1, start[b:b + 1], int(index[b]), D**-0.5)
                          for b in range(B)])
    kernel = pallas_kernels.decode_attention(jnp.asarray(q), jnp.asarray(kv), jnp.int32(1), jnp.asarray(start),
                                             jnp.asarray(index), scale=D**-0.5, interpret=True, block_k=16)
    xla = _attention(jnp.asarray(q)[:, None], jnp.asarray(kv[1, 0]), jnp.asarray(kv[1, 1]), jnp.asarray(start),
                     jnp.asarray(index), dtype=jnp.float32)[:, 0]
    _assert_close(kernel, ref, 1e-5)
    _assert_close(xla, ref, 1e-5)


# --------------------------------------------------------------------------- grouped_matmul


def _grouped_problem(weights, rng):
    """x [T, K] (rows past the groups' sum included), weights, group sizes and the float32
    dense weights `jax.lax.ragged_dot` multiplies by."""
    sizes = jnp.asarray([3, 0, 9, 1, 0], jnp.int32)  # 13 of 16 rows in groups
    w = jnp.asarray(rng.standard_normal((5, K, N)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, K)), jnp.float32)
    if weights == "dense":
        return x, w, sizes, w
    if weights == "mxfp4":
        mx = quant.quantize_mxfp4(w)
        return x, mx, sizes, quant.dequantize_mxfp4(mx, jnp.float32)
    qt = quant.quantize(w, weights, GROUP)
    return x, qt, sizes, quant.dequantize(qt, jnp.float32)


class GroupedMatmulTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("dense", 4, 3, "mxfp4")
    def test_backends_agree_with_ragged_dot_and_each_other(self, weights):
        x, w, sizes, dense = _grouped_problem(weights, np.random.default_rng(7))
        ref = np.asarray(jax.lax.ragged_dot(x, dense, sizes, precision=jax.lax.Precision.HIGHEST), np.float64)
        outs = {b: np.asarray(self.variant(functools.partial(grouped_matmul, backend=b))(x, w, sizes))
                for b in (None, "xla", "pallas")}
        for backend, out in outs.items():
            _assert_close(out, ref, 1e-5)
            assert not np.any(out[13:]), backend  # rows past the sum are 0, as ragged_dot's
        for a, b in itertools.combinations(outs.values(), 2):
            _assert_close(a, np.asarray(b, np.float64), 1e-5)


def test_grouped_matmul_out_dtype_and_bad_backend():
    x, w, sizes, _ = _grouped_problem("dense", np.random.default_rng(8))
    assert grouped_matmul(x.astype(jnp.bfloat16), w, sizes, out_dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match="backend='triton'"):
        grouped_matmul(x, w, sizes, backend="triton")


# ------------------------------------------------------------------------------ GPU lowering


def test_gpu_shape_limits_are_reported_not_miscompiled():
    reason = lambda k, n, lay, **kw: pallas_kernels.gpu_unsupported_reason(k, n, [lay], **kw)
    int4, int3 = pallas_kernels.Packed(4, 128, 2), pallas_kernels.Packed(3, 64, 8)
    assert reason(2048, 768, int4, block_m=16, block_n=64) is None
    assert reason(2048, 768, None, block_m=16, block_n=64) is None
    assert "group_size >= 128" in reason(2048, 768, int3, block_m=16, block_n=64)
    assert "block_n" in reason(2048, 100, int4, block_m=16, block_n=64)
    assert "block_m" in reason(2048, 768, int4, block_m=8, block_n=64)
    assert reason(2880, 5760, pallas_kernels.Mxfp4(), block_m=16, block_n=64) is None  # gpt-oss's K: 90 blocks
    assert "multiple of 32" in reason(2048 + 16, 768, pallas_kernels.Mxfp4(), block_m=16, block_n=64)


@pytest.mark.parametrize("weights", [8, 4, 3, 2, "dense", "mxfp4"])
def test_default_backend_is_the_triton_kernel_only_when_lowering_for_cuda(weights):
    """The choice is made per lowering platform: a CPU-only machine lowering for CUDA gets the
    kernel a GPU runs (at Qwen3-30B-A3B expert shapes), and lowering for CPU never does."""
    e, k, n = 128, 2048, 768
    sds = jax.ShapeDtypeStruct
    if weights == "dense":
        w = sds((e, k, n), jnp.bfloat16)
    elif weights == "mxfp4":
        w = quant.Mxfp4Tensor(sds((e, n, k // 2), jnp.uint8), sds((e, n, k // 32), jnp.uint8), (e, k, n))
    else:
        w = quant.QuantizedTensor(sds((e, k * weights // 8, n), jnp.uint8), sds((e, k // 128, n), jnp.bfloat16),
                                  sds((e, k // 128, n), jnp.bfloat16), weights, 128, (e, k, n))
    traced = jax.jit(grouped_matmul).trace(sds((8, k), jnp.bfloat16), w, sds((e,), jnp.int32))
    assert "triton" in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" not in traced.lower(lowering_platforms=("cpu",)).as_text()
