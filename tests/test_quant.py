"""Group-wise quantization: packing layout, RTN error bound, the better method, the pytree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dynaexq_jax.experts import quant

BITS = (8, 4, 3, 2)


def _rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


def _np_pack(q, bits, g):
    """Reference packing written from quant.py's docstring, one value at a time."""
    k, n = q.shape
    s = 8 if bits == 3 else 8 // bits
    r = g // s
    out = np.zeros((k * bits // 8, n), np.uint16)
    for j in range(k // g):
        for p in range(s):
            for i in range(r):
                code = q[j * g + p * r + i].astype(np.uint16)
                if bits == 3:
                    for b in range(3):
                        out[j * 3 * r + b * r + i] |= ((code >> b) & 1) << p
                else:
                    out[j * r + i] |= code << (p * bits)
    assert out.max(initial=0) < 256
    return out.astype(np.uint8)


def _np_dequantize(qt):
    """float64 dequantization from the stored codes, scales and zeros."""
    q = np.asarray(quant.unpack(qt.packed, qt.bits, qt.group_size)).astype(np.float64)
    g = qt.group_size
    s = np.repeat(np.asarray(qt.scales.astype(jnp.float32), np.float64), g, axis=-2)
    z = np.repeat(np.asarray(qt.zeros.astype(jnp.float32), np.float64), g, axis=-2)
    return (q - z) * s, s, z


@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 64), (3, 32), (2, 64)])
def test_packing_follows_documented_layout_and_unpacks_exactly(bits, group_size):
    q = _rng().integers(0, 2**bits, size=(128, 24), dtype=np.uint8)
    packed = np.asarray(quant.pack(jnp.asarray(q), bits, group_size))
    assert packed.dtype == np.uint8 and packed.shape == (128 * bits // 8, 24)
    np.testing.assert_array_equal(packed, _np_pack(q, bits, group_size))
    np.testing.assert_array_equal(np.asarray(quant.unpack(jnp.asarray(packed), bits, group_size)), q)


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32), (3, 64), (2, 128)])
def test_rtn_error_within_half_step_of_float64_reference(bits, group_size):
    rng = _rng()
    w = rng.standard_normal((3, 256, 40)) * rng.uniform(0.01, 3.0, size=(3, 1, 40))
    qt = quant.quantize(jnp.asarray(w, jnp.float32), bits, group_size)
    deq64, s, z = _np_dequantize(qt)
    w32 = w.astype(np.float32).astype(np.float64)
    # scale/2 from rounding; the slack covers bf16 rounding of scale and zero moving the grid
    # ends by at most (|zero| + qmax) * 2**-9 steps.
    bound = s * (0.5 + (np.abs(z) + 2**bits) * 2.0**-8) + 1e-6 * np.abs(w32)
    assert np.all(np.abs(w32 - deq64) <= bound)
    # dequantize() itself equals the float64 reference up to its f32 arithmetic.
    np.testing.assert_allclose(np.asarray(quant.dequantize(qt, jnp.float32)), deq64,
                               rtol=1e-6, atol=1e-6 * np.abs(deq64).max())


class DequantizeVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(4, 3)
    def test_dequantize_is_traceable_and_keeps_logical_shape(self, bits):
        w = jnp.asarray(_rng().standard_normal((2, 64, 16)), jnp.float32)
        qt = quant.quantize(w, bits, group_size=32)
        out = self.variant(lambda t: quant.dequantize(t, jnp.float32))(qt)
        chex.assert_shape(out, (2, 64, 16))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(quant.dequantize(qt, jnp.float32)))


@pytest.mark.parametrize("bits", BITS)
def test_quantized_tensor_nbytes_is_exact_packed_size(bits):
    e, k, n, g = 4, 256, 48, 64
    qt = quant.quantize(jnp.zeros((e, k, n), jnp.bfloat16), bits, g)
    expected = e * k * n * bits // 8 + 2 * (e * (k // g) * n * 2)  # packed + bf16 scale, zero
    assert qt.nbytes == expected
    assert qt.nbytes == sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(qt))
    assert qt.packed.dtype == jnp.uint8
    assert qt.scales.dtype == qt.zeros.dtype == jnp.bfloat16


def test_nbytes_of_qwen3_30b_int4_expert_bank():
    # All 48 layers x 128 experts x (gate, up, down) at int4 / group 128 ~= 15.4 GB (NOTES).
    per = jax.eval_shape(lambda w: quant.quantize(w, 4, 128).packed, jnp.zeros((1, 2048, 768)))
    assert per.shape == (1, 1024, 768)
    qt = quant.QuantizedTensor(
        jax.ShapeDtypeStruct((128, 1024, 768), jnp.uint8),
        jax.ShapeDtypeStruct((128, 16, 768), jnp.bfloat16),
        jax.ShapeDtypeStruct((128, 16, 768), jnp.bfloat16),
        4, 128, (128, 2048, 768))
    assert qt.nbytes == 128 * (1024 * 768 + 2 * 2 * 16 * 768)
    assert 15.0e9 < qt.nbytes * 3 * 48 < 15.8e9


@pytest.mark.parametrize(
    "k, bits, group_size, needle",
    [(256, 4, 100, "does not divide the input dimension K=256"),
     (96, 4, 128, "does not divide the input dimension K=96"),
     (256, 3, 4, "must be a multiple of 8 for 3-bit packing")],
)
def test_bad_group_size_raises_one_line_error_naming_the_fix(k, bits, group_size, needle):
    with pytest.raises(ValueError) as err:
        quant.quantize(jnp.zeros((k, 16)), bits, group_size)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert "pick a divisor" in msg or "use e.g. group_size=" in msg


def test_unsupported_bits_and_method_are_rejected():
    with pytest.raises(ValueError, match="bits=5"):
        quant.quantize(jnp.zeros((64, 8)), 5, 32)
    with pytest.raises(ValueError, match="method='gptq'"):
        quant.quantize(jnp.zeros((64, 8)), 4, 32, method="gptq")


def _rel_output_error(w, qt, x):
    deq = np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
    ref = x @ w
    return np.linalg.norm(ref - x @ deq) / np.linalg.norm(ref)


@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_mse_method_lowers_output_error_below_rtn(dist):
    rng = _rng()
    shape = (2, 256, 64)
    w = rng.standard_normal(shape) if dist == "gaussian" else rng.standard_t(3, shape)
    w = w.astype(np.float32).astype(np.float64)
    x = rng.standard_normal((512, 256))
    for bits in BITS:
        e_rtn = _rel_output_error(w, quant.quantize(jnp.asarray(w, jnp.float32), bits, 64), x)
        e_mse = _rel_output_error(
            w, quant.quantize(jnp.asarray(w, jnp.float32), bits, 64, method="mse"), x)
        if bits == 8:  # bf16 scales already limit int8; the method must not be worse
            assert e_mse <= e_rtn * 1.01, (bits, e_rtn, e_mse)
        else:
            assert e_mse < 0.97 * e_rtn, (bits, e_rtn, e_mse)


def test_take_selects_experts_under_jit():
    w = jnp.asarray(_rng().standard_normal((5, 64, 16)), jnp.float32)
    qt = quant.quantize(w, 4, 32)
    full = np.asarray(quant.dequantize(qt, jnp.float32))
    idx = jnp.array([3, 0, 3], jnp.int32)
    sub = jax.jit(lambda t, i: t.take(i))(qt, idx)
    assert sub.shape == (3, 64, 16) and sub.nbytes * 5 == qt.nbytes * 3
    np.testing.assert_array_equal(np.asarray(quant.dequantize(sub, jnp.float32)), full[[3, 0, 3]])
    one = qt[2]
    assert one.shape == (64, 16)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(one, jnp.float32)), full[2])


def test_2d_weights_and_constant_groups_round_trip():
    w = np.zeros((64, 8), np.float32)
    w[:, 1] = 0.75  # a constant column: no range, must still come back
    w[:, 2] = np.linspace(-1, 1, 64)
    qt = quant.quantize(jnp.asarray(w), 2, 32)
    assert qt.shape == (64, 8) and qt.packed.shape == (16, 8)
    np.testing.assert_allclose(np.asarray(quant.dequantize(qt, jnp.float32))[:, :2], w[:, :2],
                               atol=0.75 * 2**-8)
