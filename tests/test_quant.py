"""Group-wise quantization: packing layout, RTN error bound, the better method, the pytree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dynaexq_jax.errors import UserError
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


# ------------------------------------------------------------------------------ MXFP4


def _e2m1_64(codes):
    """float64 value of e2m1 codes from their bits: sign, 2 exponent bits, 1 mantissa bit."""
    codes = np.asarray(codes)
    sign = np.where(codes & 8, -1.0, 1.0)
    exp, man = (codes >> 1) & 3, (codes & 1).astype(np.float64)
    return sign * np.where(exp == 0, man / 2, (1 + man / 2) * 2.0 ** (exp.astype(np.float64) - 1))


def _mxfp4_dequantize64(t):
    """float64 [..., K, N] of an Mxfp4Tensor, nibble by nibble: K index 2j from byte j's low
    nibble, 2j + 1 from its high one, times 2**(scale - 127) of its 32-value block."""
    b = np.asarray(t.blocks)
    codes = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = b & 0x0F, b >> 4
    scale = 2.0 ** (np.repeat(np.asarray(t.scales, np.float64), 32, axis=-1) - 127)
    return np.swapaxes(_e2m1_64(codes) * scale, -1, -2)


def _mxfp4_quantize64(w):
    """float64 reference of MXFP4 quantization: per 32 values along K the smallest power of two
    bringing them within +-6, then the nearest e2m1 value -> dequantized [..., K, N]."""
    wt = np.swapaxes(np.asarray(w, np.float64), -1, -2)
    g = wt.reshape(*wt.shape[:-1], -1, 32)
    exp = np.ceil(np.log2(np.maximum(np.abs(g).max(-1), 1e-300) / 6.0)).clip(-127, 127)[..., None]
    table = np.unique(_e2m1_64(np.arange(16)))
    v = g / 2.0**exp
    nearest = table[np.abs(v[..., None] - table).argmin(-1)]
    return np.swapaxes((nearest * 2.0**exp).reshape(wt.shape), -1, -2)


def test_mxfp4_quantize_matches_float64_nearest_e2m1_and_dequantizes_exactly():
    rng = _rng()
    # Magnitudes across many powers of two, so blocks use many exponents; one all-zero block.
    w = rng.standard_normal((3, 96, 40)) * 2.0 ** rng.integers(-12, 12, (3, 1, 40))
    w[1, :32, 5] = 0.0
    t = quant.quantize_mxfp4(jnp.asarray(w, jnp.float32))
    assert t.blocks.shape == (3, 40, 48) and t.scales.shape == (3, 40, 3) and t.shape == (3, 96, 40)
    ref = _mxfp4_quantize64(np.asarray(jnp.asarray(w, jnp.float32), np.float64))
    np.testing.assert_array_equal(_mxfp4_dequantize64(t), ref)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_mxfp4(t, jnp.float32), np.float64), ref)


def test_mxfp4_decodes_every_code_and_scale_like_float64():
    rng = _rng()
    blocks = rng.integers(0, 256, (2, 7, 3, 16), dtype=np.uint8)
    scales = rng.integers(1, 253, (2, 7, 3), dtype=np.uint8)  # 6 * 2**125 is float32's largest
    scales[0, 0, 0], scales[0, 0, 1] = 1, 254  # e8m0's normal extremes: 2**-126 and 2**127
    blocks[0, 0, 1] = 0x11  # 1.0 * 2**127 stays finite in float32
    t = quant.mxfp4_from_blocks(blocks, scales)
    assert t.shape == (2, 96, 7)
    np.testing.assert_array_equal(np.asarray(t.blocks).reshape(blocks.shape), blocks)  # the bytes, untouched
    ref = _mxfp4_dequantize64(t)
    ref[np.abs(ref) < 2.0**-126] = 0.0  # below float32's normal range: flushed to zero, as XLA does
    np.testing.assert_array_equal(np.asarray(t.dequantize(jnp.float32), np.float64), ref)
    scales[1, 2, 0] = 0  # 2**-127, below float32's normal range: the block reads as zeros
    assert not np.any(quant.mxfp4_from_blocks(blocks, scales).dequantize(jnp.float32)[1, :32, 2])


def test_mxfp4_nbytes_is_4_25_bits_per_value_and_take_selects_experts():
    t = quant.quantize_mxfp4(jnp.asarray(_rng().standard_normal((5, 64, 48)), jnp.float32))
    assert t.nbytes == 5 * 64 * 48 * 4.25 / 8
    sub = jax.jit(lambda t, i: t.take(i))(t, jnp.asarray([4, 0]))
    np.testing.assert_array_equal(np.asarray(sub.dequantize(jnp.float32)),
                                  np.asarray(t.dequantize(jnp.float32))[[4, 0]])
    assert sub.shape == (2, 64, 48)


def test_mxfp4_bad_shapes_raise_one_line_errors_naming_the_fix():
    with pytest.raises(UserError, match="multiple of 32") as e:
        quant.quantize_mxfp4(jnp.zeros((2, 48, 16)))
    assert "\n" not in str(e.value) and "--lo-bits 4" in str(e.value)
    with pytest.raises(UserError, match="do not pair up") as e:
        quant.mxfp4_from_blocks(np.zeros((2, 16, 3, 16), np.uint8), np.zeros((2, 16, 2), np.uint8))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ HQQ

SHIPPED = "checkpoints/tiny-qwen3-moe"


def _shipped_up_projections():
    """The shipped checkpoint's trained expert up projections, [layers * E, H, I] float32."""
    from dynaexq_jax.io import loader

    ex = loader.load(SHIPPED, jnp.float32).experts
    half = ex.gate_up[0].shape[-1] // 2
    return np.concatenate([np.asarray(gu)[..., half:] for gu in ex.gate_up]).astype(np.float32)


def _group_sq_err(w64, deq64, g):
    *lead, k, n = w64.shape
    return np.square(w64 - deq64).reshape(*lead, k // g, g, n).sum(axis=-2)


@pytest.mark.parametrize("source", ["gaussian", "student_t3", "trained"])
def test_hqq_int2_matches_float64_reference_and_never_errs_more_than_rtn(source):
    rng = np.random.default_rng(1)
    if source == "trained":
        w = _shipped_up_projections()
    else:  # Qwen3-30B's up projection shape [H, I] = [2048, 768], a slice of its rows
        shape = (2, 512, 768)
        w = rng.standard_normal(shape) if source == "gaussian" else rng.standard_t(3, shape)
        w = (w * 0.02).astype(np.float32)
    g = 64
    w64 = w.astype(np.float64)
    qt = quant.quantize(jnp.asarray(w), 2, g, method="hqq")
    rtn = quant.quantize(jnp.asarray(w), 2, g)
    assert (qt.bits, qt.group_size, qt.packed.shape) == (2, g, w.shape[:-2] + (w.shape[-2] // 4, w.shape[-1]))
    deq64, s, z = _np_dequantize(qt)
    # The stored codes are nearest rounding on the stored bf16 grid, recomputed in float64
    # (a tie may round the other way in float32: a handful of values at most).
    codes = np.asarray(quant.unpack(qt.packed, 2, g)).astype(np.float64)
    ref_codes = np.clip(np.round(w64 / s + z), 0, 3)
    assert np.mean(ref_codes != codes) < 1e-4
    np.testing.assert_allclose(np.asarray(qt.dequantize(jnp.float32)), deq64, rtol=1e-6,
                               atol=1e-6 * np.abs(deq64).max())
    e_hqq = _group_sq_err(w64, deq64, g)
    e_rtn = _group_sq_err(w64, _np_dequantize(rtn)[0], g)
    assert np.all(e_hqq <= e_rtn * (1 + 1e-6) + 1e-12)  # per group: never worse than RTN
    assert e_hqq.sum() < 0.97 * e_rtn.sum(), (source, e_hqq.sum() / e_rtn.sum())
    x = rng.standard_normal((256, w.shape[-2]))
    e_out_hqq, e_out_rtn = _rel_output_error(w64, qt, x), _rel_output_error(w64, rtn, x)
    assert e_out_hqq < e_out_rtn, (source, e_out_hqq, e_out_rtn)
