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
from dynaexq_jax.experts import matmul, quant
from dynaexq_jax.experts.matmul import grouped_matmul
from dynaexq_jax.runtime.engine import compiler_options
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


@pytest.mark.parametrize("weights", ["dense", 4])
def test_the_cpu_loop_multiplies_a_wide_expert_a_column_block_at_a_time(weights):
    """Only one block of a wide expert's columns is ever dequantized to float32 (in cache): the
    step's temporaries stay under one whole float32 expert, and the product is exact."""
    n = 3 * matmul.CPU_BLOCK_N
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([2, 0, 5], jnp.int32)
    x = jnp.asarray(rng.standard_normal((8, K)), jnp.float32)
    dense = jnp.asarray(rng.standard_normal((3, K, n)), jnp.float32)
    w = dense if weights == "dense" else quant.quantize(dense, weights, GROUP)
    ref = np.asarray(jax.lax.ragged_dot(x, w if weights == "dense" else quant.dequantize(w, jnp.float32), sizes,
                                        precision=jax.lax.Precision.HIGHEST), np.float64)
    step = jax.jit(functools.partial(grouped_matmul, backend="xla"))
    _assert_close(np.asarray(step(x, w, sizes)), ref, 1e-5)
    compiled = step.lower(x, w, sizes).compile(compiler_options())  # as the engine compiles its steps
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries < K * n * 4, temporaries


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


# ------------------------------------------------------------------ the kernels' public references


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_tiled_matmul_reference_matches_float64_over_packed_mxfp4_and_dense_tiers(bits):
    """The yardstick bench_kernels.py and gpu_check.py hold the kernel to, held to float64."""
    rng = np.random.default_rng(20 + bits)
    (packed, dense), weights = _tiers(bits, rng)
    mx = quant.quantize_mxfp4(jnp.asarray(rng.standard_normal((ROWS, K, N)) * 3, jnp.float32))
    tiers = [packed, ((mx.blocks, mx.scales), mx.layout), dense]
    weights = np.stack([weights[0], _mxfp4_64(mx), weights[1]])
    keys = _keys([4, 0, 9, 1, 6, 3, 0, 2, 5], extra=3)
    x = rng.standard_normal((len(keys), K)).astype(np.float32)
    ref = pallas_kernels.tiled_matmul_reference(jnp.asarray(x), tiers, jnp.asarray(keys), rows_per_tier=ROWS)
    assert ref.dtype == jnp.float32 and not np.any(np.asarray(ref)[keys == INVALID])
    _assert_close(np.asarray(ref)[keys != INVALID], _reference(x, weights, keys), 1e-6)


def test_layer_matmul_reference_matches_float64():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((5, K)).astype(np.float32), rng.standard_normal((2, K, N)).astype(np.float32)
    ref = pallas_kernels.layer_matmul_reference(jnp.asarray(x), jnp.asarray(w), 1)
    _assert_close(ref, x.astype(np.float64) @ w[1].astype(np.float64), 1e-6)


@pytest.mark.parametrize("sinks", [False, True])
def test_decode_attention_reference_matches_float64_with_left_padding_and_an_empty_row(sinks):
    B, KVH, G, D, S, L = 3, 2, 3, 16, 32, 2
    rng = np.random.default_rng(5 + sinks)
    start, index = np.array([0, 9, S], np.int32), 20
    kv = rng.standard_normal((L, 2, B, KVH, S, D)).astype(np.float32)
    q = rng.standard_normal((B, KVH, G, D)).astype(np.float32)
    sink = rng.standard_normal((KVH, G)).astype(np.float32) if sinks else None
    ref = pallas_kernels.decode_attention_reference(jnp.asarray(q), jnp.asarray(kv), 1, jnp.asarray(start),
                                                    jnp.int32(index), scale=D**-0.5,
                                                    sinks=None if sink is None else jnp.asarray(sink))
    assert ref.shape == q.shape and not np.any(np.asarray(ref)[2])
    _assert_close(ref, _attention64(q, kv, 1, start, index, D**-0.5, sink), 1e-6)


# ------------------------------------------------------------- the fused decode layer's kernels
# One new token per row (`models.fused_decode`): B rows in tiles of 16, rows past B masked.


def _rms64(x, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _pending64(x1, y, pos):
    """float64 residual stream: x1 plus each row's pending expert rows (pos -1: none)."""
    x = np.asarray(x1, np.float64).copy()
    for b in range(x.shape[0]):
        for p in np.asarray(pos)[b]:
            if p >= 0:
                x[b] += np.asarray(y, np.float64)[p]
    return x


@pytest.mark.parametrize("index", [7, (3, 9, 0)])  # rows aligned, or each row its own slot
def test_attn_in_matches_float64_and_writes_only_the_new_slot_of_its_layer(index):
    B, H, Hq, KVH, D, L, S, P = 3, 64, 4, 2, 32, 2, 16, 6
    rng = np.random.default_rng(len(str(index)))
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    x1, y, nw, bias, qk, cos, sin = f(B, H), f(P, H), f(L, H), f(L, (Hq + 2 * KVH) * D), f(L, 2 * D), f(B, D), f(B, D)
    w = f(L, H, (Hq + 2 * KVH) * D) * 0.2
    kv = f(L, 2, B, KVH, S, D)
    pos = np.full((16, 2), -1, np.int32)
    pos[:B] = [[0, 3], [-1, 5], [2, -1]]
    args = [jnp.asarray(a) for a in (x1, y, pos, nw, w, cos, sin, kv)] + [jnp.int32(1), jnp.asarray(index, jnp.int32)]
    x, q, kv_new = pallas_kernels.attn_in(*args, heads=Hq, kv_heads=KVH, eps=1e-6, interpret=True,
                                          bias=jnp.asarray(bias), qk_norm=jnp.asarray(qk))
    # float64: the residual stream, its RMSNorm, q/k/v, per-head q/k RMSNorm, rotate-half RoPE.
    xs = _pending64(x1, y, pos)
    proj = (_rms64(xs) * nw[1]) @ w[1].astype(np.float64) + bias[1]
    heads = proj.reshape(B, Hq + 2 * KVH, D)
    qk_heads = _rms64(heads[:, : Hq + KVH]) * np.where(np.arange(Hq + KVH)[:, None] < Hq, qk[1, :D], qk[1, D:])
    half = D // 2
    rot = np.concatenate([-qk_heads[..., half:], qk_heads[..., :half]], -1)
    qk_heads = qk_heads * cos[:, None] + rot * sin[:, None]
    _assert_close(x, xs, 1e-5)
    _assert_close(q, qk_heads[:, :Hq], 1e-4)
    slots = np.broadcast_to(index, (B,))
    expect = kv.astype(np.float64).copy()
    for b in range(B):
        expect[1, 0, b, :, slots[b]] = qk_heads[b, Hq:]
        expect[1, 1, b, :, slots[b]] = heads[b, Hq + KVH:]
    _assert_close(kv_new, expect, 1e-4)
    written = np.zeros(kv.shape, bool)
    written[1, :, np.arange(B), :, slots] = True
    np.testing.assert_array_equal(np.asarray(kv_new)[~written], kv[~written])  # nothing else moved
    ref = pallas_kernels.attn_in_reference(*args, heads=Hq, kv_heads=KVH, eps=1e-6, bias=jnp.asarray(bias),
                                           qk_norm=jnp.asarray(qk))
    for ours, theirs in zip((x, q, kv_new), ref):
        _assert_close(ours, np.asarray(theirs, np.float64), 1e-5)


def test_attn_out_merges_the_splits_with_sinks_projects_and_adds_the_residual():
    B, H, Hq, KVH, D, L, S = 2, 64, 4, 2, 16, 2, 64
    rng = np.random.default_rng(5)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    q, kv, x, w, bias, sinks = f(B, Hq, D), f(L, 2, B, KVH, S, D), f(B, H), f(L, Hq * D, H) * 0.2, f(L, H), f(L, Hq)
    start, index = np.array([0, 20], np.int32), 50
    # block_k 16 over 64 slots: four splits, the first of row 1 holding no real slot
    o, m, l = pallas_kernels.decode_attention_partials(jnp.asarray(q), jnp.asarray(kv), jnp.int32(0),
                                                       jnp.asarray(start), jnp.int32(index), kv_heads=KVH,
                                                       scale=D**-0.5, interpret=True, block_k=16)
    assert o.shape[0] == 4
    out = pallas_kernels.attn_out(o, m, l, jnp.asarray(x), jnp.asarray(w), jnp.int32(1), heads=Hq, interpret=True,
                                  bias=jnp.asarray(bias), sinks=jnp.asarray(sinks))
    att = _attention64(q.reshape(B, KVH, Hq // KVH, D), kv, 0, start, index, D**-0.5, sinks[1].reshape(KVH, -1))
    _assert_close(out, x + att.reshape(B, Hq * D) @ w[1].astype(np.float64) + bias[1], 1e-5)
    ref = pallas_kernels.attn_out_reference(o, m, l, jnp.asarray(x), jnp.asarray(w), jnp.int32(1), heads=Hq,
                                            bias=jnp.asarray(bias), sinks=jnp.asarray(sinks))
    _assert_close(out, np.asarray(ref, np.float64), 1e-5)


def test_decode_attention_reference_and_kernel_read_each_layers_window_from_the_table():
    B, KVH, G, D, S, L = 2, 2, 2, 16, 64, 2
    rng = np.random.default_rng(9)
    q, kv = rng.standard_normal((B, KVH, G, D)).astype(np.float32), rng.standard_normal((L, 2, B, KVH, S, D))
    kv = kv.astype(np.float32)
    start, index, windows = np.array([0, 30], np.int32), 50, jnp.asarray([0, 12], jnp.int32)
    args = (jnp.asarray(q), jnp.asarray(kv), jnp.int32(1), jnp.asarray(start), jnp.int32(index))
    ref64 = _attention64(q, kv, 1, np.maximum(start, index - 12 + 1), index, D**-0.5)
    kernel = pallas_kernels.decode_attention(*args, scale=D**-0.5, interpret=True, windows=windows, block_k=16)
    _assert_close(kernel, ref64, 1e-5)
    _assert_close(pallas_kernels.decode_attention_reference(*args, scale=D**-0.5, windows=windows), ref64, 1e-5)


def _route_problem(rng, B=3, H=64, E=8, Lm=2):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    tier_of = np.zeros((Lm, E), np.int32)
    row_of = np.arange(Lm * E, dtype=np.int32).reshape(Lm, E)
    tier_of[1, [2, 5]], row_of[1, [2, 5]] = 1, [3, 0]  # two experts served by slots
    row_of[1, 6] = -1  # an expert with no stored row: its pairs are not computed
    return f(B, H), f(2, H), f(2, H, E), tier_of, row_of


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax"])
def test_route_matches_float64_top_k_and_sorts_the_pairs_by_the_expert_row_serving_them(mode):
    B, K, E, Lm, R = 3, 3, 8, 2, 16
    rng = np.random.default_rng(len(mode))
    x1, nw, gw, tier_of, row_of = _route_problem(rng)
    gb = rng.standard_normal((2, E)).astype(np.float32)
    valid = np.array([1, 0, 1], np.int32)  # row 1 has stopped: no pairs, no record
    chosen = np.full((Lm, B, E), 7.0, np.float32)
    r = pallas_kernels.route(*map(jnp.asarray, (x1, nw, gw, tier_of, row_of, valid, chosen)), jnp.int32(1),
                             jnp.int32(1), k=K, eps=1e-6, mode=mode, norm_topk=True, rows_per_tier=R, tile_rows=16,
                             interpret=True, gate_bias=jnp.asarray(gb))
    hn = _rms64(x1.astype(np.float64)) * nw[1]
    logits = hn @ gw[1] + gb[1]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    tv = np.take_along_axis(probs, top, 1)
    wts = tv / tv.sum(1, keepdims=True) if mode == "softmax_topk" else np.exp(
        np.take_along_axis(logits, top, 1) - logits.max(1, keepdims=True)) / np.exp(
        np.take_along_axis(logits, top, 1) - logits.max(1, keepdims=True)).sum(1, keepdims=True)
    _assert_close(r.hn, hn, 1e-5)
    record = np.asarray(r.chosen)
    np.testing.assert_array_equal(record[0], chosen[0])  # other layers' records untouched
    picked = np.zeros((B, E), bool)
    for b in np.flatnonzero(valid):
        picked[b, top[b]] = True
    _assert_close(record[1][picked], probs[picked], 1e-5)
    assert np.all(record[1][~picked] == -1)
    # The computed pairs, sorted by (tier, row) key, then by (row, k): their positions and tables.
    pairs = [(int(tier_of[1, e]) * R + int(row_of[1, e]), b, j, e) for b in range(B) for j, e in enumerate(top[b])
             if valid[b] and row_of[1, e] >= 0]
    order = sorted(pairs)
    pos, key, end, token = (np.asarray(a) for a in (r.pos, r.key, r.end, r.token))
    for place, (k, b, j, e) in enumerate(order):
        assert pos[b, j] == place and token[place] == b and np.asarray(r.expert)[place] == e
        assert abs(float(r.weight[place]) - wts[b, j]) < 1e-5
        group = [p for p, o in enumerate(order) if o[0] == k]
        assert end[place] == group[-1] + 1
        assert key[place] == (k if place == group[0] else INVALID)  # one expert's pairs fit one 16-row tile
    assert {(b, j) for b in range(B) for j in range(K) if pos[b, j] >= 0} == {(b, j) for _, b, j, _ in pairs}
    assert np.all(key[len(order):] == INVALID)
    ref = pallas_kernels.route_reference(*map(jnp.asarray, (x1, nw, gw, tier_of, row_of, valid, chosen)),
                                         jnp.int32(1), jnp.int32(1), k=K, eps=1e-6, mode=mode, norm_topk=True,
                                         rows_per_tier=R, tile_rows=16, gate_bias=jnp.asarray(gb))
    np.testing.assert_array_equal(np.asarray(ref.pos), pos)
    np.testing.assert_array_equal(np.asarray(ref.key), key)
    np.testing.assert_array_equal(np.asarray(ref.end)[:len(order)], end[:len(order)])


@pytest.mark.parametrize("lo", [4, 3, "mxfp4"])
def test_expert_kernels_match_float64_over_a_low_bit_tier_and_dense_slots(lo):
    """route -> gate_up -> down over every expert at `lo` bits and two experts in dense slots,
    the experts' biases and gpt-oss's clamped GLU on the MXFP4 run; each token's rows summed as
    the next layer sums them, against float64."""
    B, H, E, K, I, Lm = 3, 64, 8, 3, 32, 2
    R = Lm * E
    rng = np.random.default_rng(3)
    x1, nw, gw, tier_of, row_of = _route_problem(rng)
    valid = np.ones(B, np.int32)
    gu, dn = rng.standard_normal((R, H, 2 * I)) * 0.3, rng.standard_normal((R, I, H)) * 0.3
    if lo == "mxfp4":
        qgu, qdn = (quant.quantize_mxfp4(jnp.asarray(w, jnp.float32)) for w in (gu, dn))
        lo_tiers = [((t.blocks, t.scales), t.layout) for t in (qgu, qdn)]
        lo64 = [_mxfp4_64(t) for t in (qgu, qdn)]
        glu = functools.partial(pallas_kernels.clamped_glu, alpha=1.702, limit=7.0)
        gub, dnb = rng.standard_normal((Lm, E, 2 * I)).astype(np.float32), rng.standard_normal((Lm, E, H))
        dnb = dnb.astype(np.float32)
    else:
        qgu, qdn = (quant.quantize(jnp.asarray(w, jnp.float32), lo, 32) for w in (gu, dn))
        lo_tiers = [((t.packed, t.scales, t.zeros), t.layout) for t in (qgu, qdn)]
        lo64 = [_dequantize64(t) for t in (qgu, qdn)]
        glu, gub, dnb = pallas_kernels.silu_glu, None, None
    slot_gu, slot_dn = rng.standard_normal((4, H, 2 * I)).astype(np.float32), rng.standard_normal((4, I, H))
    slot_dn = slot_dn.astype(np.float32)
    r = pallas_kernels.route(*map(jnp.asarray, (x1, nw, gw, tier_of, row_of, valid)), jnp.zeros((Lm, B, E)),
                             jnp.int32(1), jnp.int32(1), k=K, eps=1e-6, mode="softmax_topk", norm_topk=True,
                             rows_per_tier=R, tile_rows=16, interpret=True, nibbles=lo == "mxfp4")
    bias = lambda b: None if b is None else jnp.asarray(b)
    out = pallas_kernels.expert_gate_up(r.hn, [lo_tiers[0], ((jnp.asarray(slot_gu),), None)], r, pairs=B * K,
                                        inter=I, rows_per_tier=R, tm=16, glu=glu, interpret=True, bias=bias(gub),
                                        moe_layer=jnp.int32(1), nibbles_out=lo == "mxfp4")
    h, h_nib = out if lo == "mxfp4" else (out, None)
    y = pallas_kernels.expert_down(h, [lo_tiers[1], ((jnp.asarray(slot_dn),), None)], r, pairs=B * K, hidden=H,
                                   rows_per_tier=R, tm=16, interpret=True, bias=bias(dnb), moe_layer=jnp.int32(1),
                                   h_nibbles=h_nib)
    moe = pallas_kernels.decode_layer.pending_sum(jnp.zeros((B, H)), y, r.pos, K)
    # float64: each token's computed experts, weighted.
    hn = np.asarray(r.hn, np.float64)
    expect = np.zeros((B, H))
    for b in range(B):
        for j in range(K):
            if int(r.pos[b, j]) < 0:
                continue
            place = int(r.pos[b, j])
            e, wt = int(r.expert[place]), float(r.weight[place])
            tier, row = int(tier_of[1, e]), int(row_of[1, e])
            wgu, wdn = (lo64[0][row], lo64[1][row]) if tier == 0 else (slot_gu[row], slot_dn[row])
            g = hn[b] @ wgu + (0 if gub is None else gub[1, e])
            act = np.asarray(glu(jnp.asarray(g[:I], jnp.float32), jnp.asarray(g[I:], jnp.float32)), np.float64)
            expect[b] += wt * (act @ wdn + (0 if dnb is None else dnb[1, e]))
    assert np.sum(np.asarray(r.pos[:B]) >= 0) == B * K - 1  # all but the expert with no row
    _assert_close(moe, expect, 1e-4)
    dense = [(jnp.asarray(lo64[0], jnp.float32), jnp.asarray(lo64[1], jnp.float32)),
             (jnp.zeros((R, H, 2 * I)).at[:4].set(slot_gu), jnp.zeros((R, I, H)).at[:4].set(slot_dn))]
    ref = pallas_kernels.experts_reference(r.hn, dense, r, pairs=B * K, rows_per_tier=R, glu=glu,
                                           gate_up_bias=bias(gub), down_bias=bias(dnb), moe_layer=1)
    _assert_close(pallas_kernels.decode_layer.pending_sum(jnp.zeros((B, H)), ref, r.pos, K), expect, 1e-4)


def test_route_reads_the_router_in_any_block_of_rows_with_the_same_plan():
    """`block_k` (a tiling knob bench_decode_layer.py sweeps on a GPU) changes how the router's
    weights are read, not what comes out: the same normed rows, plan and routing record."""
    rng = np.random.default_rng(3)
    x1, nw, gw, tier_of, row_of = _route_problem(rng)
    args = (*map(jnp.asarray, (x1, nw, gw, tier_of, row_of, np.ones(3, np.int32), np.zeros((2, 3, 8), np.float32))),
            jnp.int32(1), jnp.int32(1))
    kw = dict(k=2, eps=1e-6, mode="softmax_topk", norm_topk=True, rows_per_tier=16, tile_rows=16, interpret=True)
    default, narrow = (pallas_kernels.route(*args, **kw, **knob) for knob in ({}, {"block_k": 16}))
    for a, b in zip(default, narrow):
        if a is not None:
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-6)
