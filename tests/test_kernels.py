"""Grouped (dequant) matmul: Pallas kernel in interpret mode, XLA path and the dispatcher."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import pallas_kernels
from dynaexq_jax.experts import quant
from dynaexq_jax.experts.matmul import grouped_matmul
from pallas_kernels.tiling import make_row_tiles

K, N = 128, 64


def _rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


def _reference(x, w, group_sizes):
    """float64 ragged_dot: rows of x sorted by group times w[g]; rows past the sum are 0."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


def _problem(bits, group_sizes, *, group_size=32, extra_rows=0, dtype=jnp.float32):
    rng = _rng()
    group_sizes = np.asarray(group_sizes, np.int32)
    w = rng.standard_normal((len(group_sizes), K, N)).astype(np.float32)
    qt = quant.quantize(jnp.asarray(w), bits, group_size)
    x = jnp.asarray(rng.standard_normal((int(group_sizes.sum()) + extra_rows, K)), dtype)
    deq64 = np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
    return x, qt, jnp.asarray(group_sizes), _reference(np.asarray(x, np.float32), deq64, group_sizes)


def _assert_close(out, ref, rel):
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=rel * np.abs(ref).max())


# Zero-token experts (first, middle, last), one-token experts, and counts that are not
# multiples of the 8-row tile (5, 9, 13) so tiles end mid-expert and experts share tiles.
CASES = {
    8: [0, 5, 1, 9, 0],
    4: [3, 0, 13, 1, 0],
    3: [1, 1, 0, 8, 6],
    2: [0, 0, 17, 2, 1],
}


@pytest.mark.parametrize("bits", sorted(CASES))
def test_pallas_kernel_matches_float64_reference_in_f32(bits):
    x, qt, gs, ref = _problem(bits, CASES[bits])
    # One group per K step keeps the interpreted kernel small; multi-group steps: bf16 test.
    out = pallas_kernels.grouped_dequant_matmul(x, qt, gs, interpret=True, block_m=8, block_n=64,
                                                block_k=32)
    assert out.dtype == jnp.float32
    _assert_close(out, ref, 1e-5)


@pytest.mark.parametrize("bits", [4])
def test_pallas_kernel_in_bf16_is_within_bf16_tolerance_and_defaults_tiles(bits):
    # bf16 activations and bf16 dequantized tiles in the dot, f32 accumulation.
    x, qt, gs, ref = _problem(bits, [2, 0, 7, 1], group_size=64, dtype=jnp.bfloat16)
    out = pallas_kernels.grouped_dequant_matmul(x, qt, gs, interpret=True,
                                                preferred_element_type=jnp.float32)
    _assert_close(out, ref, 2e-2)


def test_rows_past_group_sizes_sum_come_out_zero():
    x, qt, gs, ref = _problem(4, [2, 3, 0], extra_rows=4)
    out = pallas_kernels.grouped_dequant_matmul(x, qt, gs, interpret=True, block_m=4, block_n=32)
    _assert_close(out, ref, 1e-5)
    assert not np.any(np.asarray(out)[5:])


def test_kernel_never_reads_weights_of_experts_without_tokens():
    x, qt, gs, ref = _problem(4, [0, 3, 0, 2, 0])
    idle = jnp.asarray([True, False, True, False, True])[:, None, None]
    nan = lambda a: jnp.where(idle, jnp.asarray(jnp.nan, a.dtype), a)
    poisoned = quant.QuantizedTensor(jnp.where(idle, 0xFF, qt.packed).astype(jnp.uint8),
                                     nan(qt.scales), nan(qt.zeros), qt.bits, qt.group_size,
                                     qt.shape)
    out = pallas_kernels.grouped_dequant_matmul(x, poisoned, gs, interpret=True, block_m=8)
    _assert_close(out, ref, 1e-5)


def test_row_tiles_cover_each_active_expert_and_nothing_else():
    gs = jnp.asarray([0, 5, 1, 0, 9, 0], jnp.int32)
    tiles = make_row_tiles(gs, 16, tm=4)
    expert = np.asarray(tiles.expert)
    # ceil(5/4) + 1 + ceil(9/4) = 6 tiles, in expert order, then unused (-1) slots.
    np.testing.assert_array_equal(expert[:6], [1, 1, 2, 4, 4, 4])
    assert np.all(expert[6:] == -1) and len(expert) == 16 // 4 + 6
    np.testing.assert_array_equal(np.asarray(tiles.row_start)[:6], [0, 4, 5, 6, 10, 14])
    np.testing.assert_array_equal(np.asarray(tiles.row_end)[:6], [5, 5, 6, 15, 15, 15])


def test_dense_pallas_kernel_matches_ragged_dot_reference():
    rng = _rng()
    gs = np.array([4, 0, 1, 11], np.int32)
    w = rng.standard_normal((4, K, N)).astype(np.float32)
    x = rng.standard_normal((16, K)).astype(np.float32)
    out = pallas_kernels.grouped_matmul_dense(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gs),
                                              interpret=True, block_m=8, block_n=32, block_k=64)
    _assert_close(out, _reference(x, w, gs), 1e-5)


class DispatcherTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, "pallas")
    def test_grouped_matmul_backends_agree_with_reference(self, backend):
        x, qt, gs, ref = _problem(4, [1, 0, 6, 2])
        fn = self.variant(functools.partial(grouped_matmul, backend=backend))
        _assert_close(fn(x, qt, gs), ref, 1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_xla_path_with_fewer_rows_than_experts_dequantizes_only_active_ones(self):
        # Decode: 3 rows over 6 experts, so the XLA path compacts to the active experts.
        x, qt, gs, ref = _problem(4, [0, 1, 0, 0, 2, 0])
        out = self.variant(functools.partial(grouped_matmul, backend="xla"))(x, qt, gs)
        _assert_close(out, ref, 1e-5)


def test_dispatcher_dense_weights_and_bad_backend():
    rng = _rng()
    gs = jnp.asarray([3, 0, 2], jnp.int32)
    w = rng.standard_normal((3, K, N)).astype(np.float32)
    x = rng.standard_normal((5, K)).astype(np.float32)
    ref = _reference(x, w, np.asarray(gs))
    for backend in (None, "xla", "pallas"):
        _assert_close(grouped_matmul(jnp.asarray(x), jnp.asarray(w), gs, backend=backend), ref, 1e-5)
    with pytest.raises(ValueError, match="backend='triton'"):
        grouped_matmul(jnp.asarray(x), jnp.asarray(w), gs, backend="triton")


def test_gpu_shape_limits_are_reported_not_miscompiled():
    assert pallas_kernels.gpu_unsupported_reason(2048, 768, bits=4, group_size=128) is None
    assert pallas_kernels.gpu_unsupported_reason(768, 2048, bits=3, group_size=128) is None
    assert "group_size >= 128" in pallas_kernels.gpu_unsupported_reason(
        2048, 768, bits=3, group_size=64)
    assert "block_n" in pallas_kernels.gpu_unsupported_reason(2048, 100, bits=4, group_size=128)


def _can_cross_lower_triton():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    f = lambda x: pl.pallas_call(copy, out_shape=x, compiler_params=plgpu.CompilerParams(),
                                 interpret=False)(x)
    try:
        jax.jit(f).trace(jnp.zeros((16, 16))).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001 - any failure here means "this jax cannot cross-lower"
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_kernel_lowers_to_triton_for_cuda_at_qwen3_expert_shapes(bits):
    reason = _can_cross_lower_triton()
    if reason:
        pytest.skip(f"this jax cannot lower Pallas/Triton for cuda without a GPU ({reason})")
    e, k, n = 128, 2048, 768
    qt = quant.QuantizedTensor(
        jax.ShapeDtypeStruct((e, k * bits // 8, n), jnp.uint8),
        jax.ShapeDtypeStruct((e, k // 128, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((e, k // 128, n), jnp.bfloat16), bits, 128, (e, k, n))
    x = jax.ShapeDtypeStruct((8, k), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((e,), jnp.int32)
    f = jax.jit(functools.partial(pallas_kernels.grouped_dequant_matmul, interpret=False))
    text = f.trace(x, qt, gs).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
