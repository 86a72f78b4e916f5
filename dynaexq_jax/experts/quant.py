"""Group-wise affine quantization of expert weights, and the one description of its layout.

Convention
----------
A weight `w` of logical shape `[E, K, N]` (or `[K, N]`) multiplies as `x @ w` with `K` the
input (contraction) dimension. `K` is cut into groups of `group_size` consecutive rows; each
(group, column) pair has its own bf16 `scale` and bf16 `zero`:

    w[k, n] ~= (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]
    q in [0, 2**bits - 1] (unsigned), zero a float (not rounded to an integer)

`zero` is kept as a float so min-max RTN places the grid ends exactly on each group's min and
max (an integer zero shifts the grid by up to half a step, which costs most at 2 and 3 bits).

Packed storage (`QuantizedTensor.packed`, uint8, `[E, K * bits // 8, N]`)
------------------------------------------------------------------------------
Packing runs along K, one group at a time; group `j` owns the `group_size * bits // 8`
consecutive packed rows starting at `j * group_size * bits // 8`. Within a group the
`group_size` rows are cut into `S` equal slices of `R = group_size // S` consecutive rows:

* bits 8, 4, 2 (`S = 8 // bits`): the group's `R` packed rows hold all slices at once; bits
  `[p * bits, (p + 1) * bits)` of packed row `i` hold `q` of group row `p * R + i`.
* bits 3 (`S = 8`): the group's `3 * R` packed rows are three bit-planes of `R` rows each
  (plane `b` first `R` rows for b=0, then b=1, b=2); bit `p` of plane `b`, row `i` is bit `b` of
  `q` at group row `p * R + i`. Exactly 3 bits per value, no padding.

Why this layout: a kernel unpacks slice `p` with one shift and one mask (three for int3) into
a `[R, N]` tile whose rows are *contiguous* in K, so it multiplies that tile with a contiguous
`[rows, R]` slice of the activations. No interleaving (nibble shuffles) is ever needed, which
Pallas on Triton cannot express cheaply. It requires `group_size % S == 0` and, for the GPU
kernel's tensor-core dots, `R >= 16` (int3 therefore wants group_size >= 128).

Scales and zeros are bf16 `[E, K // group_size, N]`. `QuantizedTensor.nbytes` is the exact
sum of the three buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from pallas_kernels import Mxfp4, Packed, e2m1_decode, e8m0_decode

SUPPORTED_BITS = (8, 4, 3, 2)
METHODS = ("rtn", "mse", "hqq")


def slices_per_group(bits: int) -> int:
    """Number of K-slices a group is cut into by the packing (see module docstring)."""
    _check_bits(bits)
    return 8 if bits == 3 else 8 // bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}.")


def check_group_size(k: int, bits: int, group_size: int) -> None:
    """Raise a one-line error naming the fix when `group_size` cannot quantize K rows."""
    s = slices_per_group(bits)
    if group_size <= 0 or k % group_size != 0:
        divisors = [d for d in (32, 64, 128, 256) if k % d == 0 and d % s == 0]
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension K={k}; "
            f"pick a divisor of {k} such as {divisors or [k]}."
        )
    if group_size % s != 0:
        raise ValueError(
            f"group_size={group_size} must be a multiple of {s} for {bits}-bit packing; "
            f"use e.g. group_size={math.lcm(group_size, s)} if it divides K={k}."
        )


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Packed low-bit weights with per-group bf16 scales and zeros (a jax pytree).

    Leaves: `packed` uint8 [*lead, K*bits//8, N], `scales` and `zeros` bf16
    [*lead, K//group_size, N]. Static: `bits`, `group_size`, `shape` (logical, [*lead, K, N]).
    """

    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array
    bits: int
    group_size: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Exact device bytes of the three buffers (the packed buffer at its real size)."""
        return sum(
            math.prod(a.shape) * np.dtype(a.dtype).itemsize
            for a in (self.packed, self.scales, self.zeros)
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def layout(self) -> Packed:
        """The static packing description the Pallas kernels take."""
        return Packed(self.bits, self.group_size, slices_per_group(self.bits))

    def take(self, idx) -> "QuantizedTensor":
        """Experts `idx` along axis 0 (an int gives [K, N]; an index array [M] gives [M, K, N]).

        Works under jit with traced indices; out-of-range indices are clamped.
        """
        if self.ndim != 3:
            raise ValueError(f"take() needs a stacked [E, K, N] tensor, got shape {self.shape}.")
        idx = jnp.asarray(idx)
        pick = lambda a: jnp.take(a, idx, axis=0, mode="clip")
        lead = tuple(idx.shape)
        return QuantizedTensor(
            pick(self.packed), pick(self.scales), pick(self.zeros),
            self.bits, self.group_size, lead + self.shape[1:],
        )

    def __getitem__(self, idx) -> "QuantizedTensor":
        return self.take(idx)

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        return dequantize(self, dtype)


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["packed", "scales", "zeros"],
    meta_fields=["bits", "group_size", "shape"],
)


# ----------------------------------------------------------------------------- packing


def pack(q: jax.Array, bits: int, group_size: int) -> jax.Array:
    """uint8 codes [..., K, N] in [0, 2**bits) -> packed uint8 [..., K*bits//8, N]."""
    *lead, k, n = q.shape
    check_group_size(k, bits, group_size)
    s = slices_per_group(bits)
    r = group_size // s
    q = q.astype(jnp.uint8).reshape(*lead, k // group_size, s, r, n)
    shifts = jnp.arange(s, dtype=jnp.uint8).reshape(s, 1, 1)
    if bits == 3:
        planes = [
            jnp.sum(((q >> b) & 1) << shifts, axis=-3, dtype=jnp.uint8) for b in range(3)
        ]  # 3 x [..., K//g, R, N]
        out = jnp.stack(planes, axis=-3)  # [..., K//g, 3, R, N]
    else:
        out = jnp.sum(q << (shifts * bits), axis=-3, dtype=jnp.uint8)  # [..., K//g, R, N]
    return out.reshape(*lead, k * bits // 8, n)


def unpack(packed: jax.Array, bits: int, group_size: int) -> jax.Array:
    """Packed uint8 [..., K*bits//8, N] -> uint8 codes [..., K, N] (inverse of `pack`)."""
    *lead, kp, n = packed.shape
    s = slices_per_group(bits)
    r = group_size // s
    k = kp * 8 // bits
    shifts = jnp.arange(s, dtype=jnp.uint8).reshape(s, 1, 1)
    if bits == 3:
        p = packed.reshape(*lead, k // group_size, 3, 1, r, n)
        q = sum(((p[..., b, :, :, :] >> shifts) & 1) << b for b in range(3))
    else:
        p = packed.reshape(*lead, k // group_size, 1, r, n)
        q = (p >> (shifts * bits)) & ((1 << bits) - 1)  # [..., K//g, S, R, N]
    return q.astype(jnp.uint8).reshape(*lead, k, n)


# ------------------------------------------------------------------------ quantization


def _bf16(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _codes(wg, scale, zero, qmax):
    return jnp.clip(jnp.round(wg / scale + zero), 0, qmax)


def _minmax_params(wg, qmax, shrink=1.0):
    """bf16 (scale, zero) putting the grid ends on the (shrunk) group min and max."""
    return _grid(jnp.min(wg, axis=-2, keepdims=True) * shrink, jnp.max(wg, axis=-2, keepdims=True) * shrink, qmax)


def _grid(lo, hi, qmax):
    """bf16 (scale, zero) of the grid from `lo` to `hi` (float32)."""
    rng = hi - lo
    # A constant group has no range; any positive scale reproduces it through `zero`.
    scale = _bf16(jnp.where(rng > 0, rng / qmax, 1.0))
    zero = _bf16(-lo / scale)
    return scale, zero


def _sq_err(wg, scale, zero, qmax):
    q = _codes(wg, scale, zero, qmax)
    return jnp.sum(jnp.square((q - zero) * scale - wg), axis=-2, keepdims=True)


def _rtn_state(wg, qmax):
    """(scale, zero, squared error) of min-max RTN: where the better methods start."""
    s, z = _minmax_params(wg, qmax)
    return s, z, _sq_err(wg, s, z, qmax)


def _keep_better(wg, qmax, state, s, z):
    """Per group, the (scale, zero) of `state` or the candidate, whichever errs less."""
    bs, bz, be = state
    e = _sq_err(wg, s, z, qmax)
    better = e < be
    return jnp.where(better, s, bs), jnp.where(better, z, bz), jnp.where(better, e, be)


def _mse_params(wg, qmax, iters):
    """Per-group (scale, zero) lowering the squared weight error below min-max RTN's.

    Start from the best of a few shrunk min-max ranges (clipping outliers), then alternate
    nearest rounding (optimal codes for a fixed grid) with a least-squares fit of
    `w ~ scale * q + offset` (optimal grid for fixed codes). Each group keeps the best bf16
    parameters seen, so the result is never worse than RTN's.
    """
    keep_better = functools.partial(_keep_better, wg, qmax)
    state = _rtn_state(wg, qmax)
    for shrink in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        state = keep_better(state, *_minmax_params(wg, qmax, shrink))

    def step(_, state):
        s, z, _e = state
        q = _codes(wg, s, z, qmax)
        qm = jnp.mean(q, axis=-2, keepdims=True)
        wm = jnp.mean(wg, axis=-2, keepdims=True)
        cov = jnp.mean((q - qm) * (wg - wm), axis=-2, keepdims=True)
        var = jnp.mean(jnp.square(q - qm), axis=-2, keepdims=True)
        ok = (var > 0) & (cov > 0)
        new_s = _bf16(jnp.where(ok, cov / jnp.where(ok, var, 1.0), s))
        offset = wm - new_s * qm
        new_z = _bf16(-offset / new_s)
        return keep_better(state, new_s, new_z)

    s, z, _ = jax.lax.fori_loop(0, iters, step, state)
    return s, z


def _hqq_params(wg, qmax, iters, p=0.7, beta=10.0, kappa=1.01):
    """Per-group zero fitted by HQQ's half-quadratic solver (Badri & Shaji, "Half-Quadratic
    Quantization of Large Machine Learning Models", and their `hqq` package's defaults:
    lp-norm p=0.7, beta 10 growing by kappa=1.01 per round), the scale kept at min-max RTN's.

    Each round splits the error into a sparse part `we` (the lp proximal step: outliers the
    grid need not follow) and refits the zero as the mean of `q - (w - we) / scale` (the
    closed-form minimiser of the quadratic term). Weight-only, no calibration data. Each group
    keeps the round's parameters with the least squared error, RTN's included, so the result
    is never worse than RTN's (a choice of ours: the package returns the last round's).
    """
    s, z, e = _rtn_state(wg, qmax)

    def shrink(x, beta):  # lp proximal operator (hqq's shrink_lp_op)
        return jnp.sign(x) * jax.nn.relu(jnp.abs(x) - jnp.power(jnp.abs(x) + 1e-8, p - 1) / beta)

    def step(_, carry):
        z_f, beta, state = carry  # z_f: the unrounded float zero the solver iterates on
        q = _codes(wg, s, z_f, qmax)
        we = shrink(wg - (q - z_f) * s, beta)
        target = (wg - we) / s
        q = jnp.clip(jnp.round(target + z_f), 0, qmax)
        z_f = jnp.mean(q - target, axis=-2, keepdims=True)
        return z_f, beta * kappa, _keep_better(wg, qmax, state, s, _bf16(z_f))

    _, _, (s, z, _) = jax.lax.fori_loop(0, iters, step, (z, jnp.float32(beta), (s, z, e)))
    return s, z


def quantize(w, bits: int, group_size: int = 128, method: str = "rtn", *, iters: int = 20):
    """Quantize `w` [E, K, N] or [K, N] group-wise along K -> `QuantizedTensor`.

    method "rtn": round-to-nearest on each group's min-max range.
    method "mse": weight-only optimisation of each group's scale and zero for lower squared
    error (clipping search + alternating least squares, `iters` rounds); see `_mse_params`.
    method "hqq": HQQ's half-quadratic fit of each group's zero (`iters` rounds), the scale
    RTN's; see `_hqq_params`. FloE stores its up projections so (int2, groups of 64).
    """
    _check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}.")
    w = jnp.asarray(w)
    if w.ndim not in (2, 3):
        raise ValueError(f"quantize expects [E, K, N] or [K, N], got shape {w.shape}.")
    *lead, k, n = w.shape
    check_group_size(k, bits, group_size)
    # The weights stay in their own dtype (bf16: half the bytes of a float32 copy); each jitted
    # pass widens what it reads to float32 itself. qmax is traced so one compilation serves
    # every bit width of a shape.
    scale, zero = _group_params(w, jnp.float32(2**bits - 1), group_size, method, iters)  # [*lead, K//g, 1, N]
    packed = _pack_codes(w, scale, zero, bits, group_size)
    return QuantizedTensor(packed, _bf16_rows(scale), _bf16_rows(zero), bits, group_size, tuple(w.shape))


def _grouped(w, group_size):
    *lead, k, n = w.shape
    return w.reshape(*lead, k // group_size, group_size, n)


# Two jitted passes, not one: XLA on the CPU fuses a group's min/max into every element that
# uses it and recomputes it there (a layer of bf16 experts quantized at 0.3 GB/s); apart, the
# parameters take one read and the codes another, at memory speed.
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _group_params(w, qmax, group_size, method, iters):
    wg = _grouped(w, group_size)
    if method == "rtn":  # min and max are exact in the weights' own dtype
        lo = jnp.min(wg, axis=-2, keepdims=True).astype(jnp.float32)
        hi = jnp.max(wg, axis=-2, keepdims=True).astype(jnp.float32)
        return _grid(lo, hi, qmax)
    wg = wg.astype(jnp.float32)
    if method == "hqq":
        return _hqq_params(wg, qmax, iters)
    return _mse_params(wg, qmax, iters)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _pack_codes(w, scale, zero, bits, group_size):
    q = _codes(_grouped(w, group_size).astype(jnp.float32), scale, zero, float(2**bits - 1)).astype(jnp.uint8)
    return pack(q.reshape(w.shape), bits, group_size)


@functools.partial(jax.jit, static_argnums=2)
def rtn_errors(w, qmaxes, group_size: int):
    """Each expert's squared RTN error at every width at once, and its squared norm: w [E, K, N]
    and qmaxes [W] (2**bits - 1, traced: one compilation serves every set of widths) ->
    (errors [W, E], norms [E]), float32. The grid of each width as `quantize` makes it (bf16
    scale and zero from the group's min and max), so the errors are those of the stored tensors."""
    wg = _grouped(w, group_size)
    lo = jnp.min(wg, axis=-2, keepdims=True).astype(jnp.float32)
    hi = jnp.max(wg, axis=-2, keepdims=True).astype(jnp.float32)
    lo, hi = jax.lax.optimization_barrier((lo, hi))  # computed once, not inside every use (see below)
    wf = wg.astype(jnp.float32)

    def err(qmax):
        scale, zero = _grid(lo, hi, qmax)
        return jnp.sum(jnp.square((_codes(wf, scale, zero, qmax) - zero) * scale - wf), axis=(1, 2, 3))

    return jax.lax.map(err, qmaxes), jnp.sum(jnp.square(wf), axis=(1, 2, 3))


@jax.jit
def _bf16_rows(a):
    return a[..., 0, :].astype(jnp.bfloat16)  # [*lead, K//g, 1, N] -> [*lead, K//g, N]


def abstract(shape: tuple[int, ...], bits: int | str, group_size: int = 128):
    """The packed tensor `quantize` (or, for bits "mxfp4", `quantize_mxfp4`) makes of a weight
    of `shape` [*lead, K, N], with `jax.ShapeDtypeStruct` leaves: its layout without the work."""
    *lead, k, n = shape
    sds = jax.ShapeDtypeStruct
    if bits == "mxfp4":
        return Mxfp4Tensor(sds((*lead, n, k // 2), jnp.uint8), sds((*lead, n, k // MXFP4_BLOCK), jnp.uint8),
                           tuple(shape))
    check_group_size(k, bits, group_size)
    grid = sds((*lead, k // group_size, n), jnp.bfloat16)
    return QuantizedTensor(sds((*lead, k * bits // 8, n), jnp.uint8), grid, grid, bits, group_size, tuple(shape))


def dequantize(qt: QuantizedTensor, dtype=jnp.bfloat16) -> jax.Array:
    """Materialise `qt` at its logical shape in `dtype` (computed in f32)."""
    *lead, k, n = qt.shape
    g = qt.group_size
    q = unpack(qt.packed, qt.bits, g).astype(jnp.float32).reshape(*lead, k // g, g, n)
    s = qt.scales.astype(jnp.float32)[..., None, :]
    z = qt.zeros.astype(jnp.float32)[..., None, :]
    return ((q - z) * s).reshape(*lead, k, n).astype(dtype)


# ------------------------------------------------------------------------------ MXFP4
# OCP MXFP4, as transformers' integrations/mxfp4.py and the gpt-oss checkpoints store it: each
# value an e2m1 code (sign, 2 exponent bits, 1 mantissa bit: +-{0, .5, 1, 1.5, 2, 3, 4, 6}), two
# codes a byte (the lower K index in the low nibble), and one e8m0 scale (2**(byte - 127)) per
# MXFP4_BLOCK consecutive values along K. The checkpoint lays a [K, N] weight out N-major
# (blocks [N, K/32, 16], scales [N, K/32]); `Mxfp4Tensor` keeps exactly those bytes, the
# block axes merged ([N, K/2]), so wrapping a checkpoint's tensors copies and converts nothing.

MXFP4_BLOCK = 32
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       np.float32)  # code -> value


def check_mxfp4_k(k: int) -> None:
    """Raise a one-line UserError naming the fix when K cannot be cut into MXFP4 blocks."""
    if k <= 0 or k % MXFP4_BLOCK:
        raise UserError(f"MXFP4 needs the input dimension K={k} to be a multiple of {MXFP4_BLOCK} (one scale per "
                        f"{MXFP4_BLOCK} values); use an integer fallback (--lo-bits 4) for this model")


@dataclasses.dataclass(frozen=True)
class Mxfp4Tensor:
    """MXFP4 weights of logical shape [*lead, K, N] (a jax pytree).

    Leaves: `blocks` uint8 [*lead, N, K/2] (codes of column n, K ascending, low nibble first)
    and `scales` uint8 [*lead, N, K/32] (e8m0 exponents + 127). Static: `shape`.
    4.25 bits per value: `nbytes` is the sum of the two buffers.
    """

    blocks: jax.Array
    scales: jax.Array
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in (self.blocks, self.scales))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def layout(self) -> Mxfp4:
        return Mxfp4()

    def take(self, idx) -> "Mxfp4Tensor":
        """Experts `idx` along axis 0, as `QuantizedTensor.take` (traced indices clamp)."""
        if self.ndim != 3:
            raise ValueError(f"take() needs a stacked [E, K, N] tensor, got shape {self.shape}.")
        idx = jnp.asarray(idx)
        pick = lambda a: jnp.take(a, idx, axis=0, mode="clip")
        return Mxfp4Tensor(pick(self.blocks), pick(self.scales), tuple(idx.shape) + self.shape[1:])

    def __getitem__(self, idx) -> "Mxfp4Tensor":
        return self.take(idx)

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        return dequantize_mxfp4(self, dtype)


jax.tree_util.register_dataclass(Mxfp4Tensor, data_fields=["blocks", "scales"], meta_fields=["shape"])


def mxfp4_from_blocks(blocks, scales) -> Mxfp4Tensor:
    """Wrap a checkpoint's MXFP4 `blocks` [*lead, N, K/32, 16] and `scales` [*lead, N, K/32]
    (uint8, transformers' layout) as the [*lead, K, N] weight they encode; no value is touched."""
    *lead, n, g, b = blocks.shape
    if b != MXFP4_BLOCK // 2 or tuple(scales.shape) != (*lead, n, g):
        raise UserError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up; "
                        f"expected blocks [..., N, K/{MXFP4_BLOCK}, {MXFP4_BLOCK // 2}] and scales [..., N, "
                        f"K/{MXFP4_BLOCK}] (transformers' layout): re-export the checkpoint")
    return Mxfp4Tensor(blocks.reshape(*lead, n, g * b), scales, (*lead, g * MXFP4_BLOCK, n))


def quantize_mxfp4(w) -> Mxfp4Tensor:
    """Quantize `w` [E, K, N] or [K, N] to MXFP4: per 32 values along K the smallest power of
    two that brings them within e2m1's +-6, each value rounded to the nearest e2m1 code."""
    w = jnp.asarray(w)
    if w.ndim not in (2, 3):
        raise ValueError(f"quantize_mxfp4 expects [E, K, N] or [K, N], got shape {w.shape}.")
    check_mxfp4_k(w.shape[-2])
    blocks, scales = _mxfp4_codes(w.astype(jnp.float32))
    return Mxfp4Tensor(blocks, scales, tuple(w.shape))


@jax.jit
def _mxfp4_codes(w):
    *lead, k, n = w.shape
    wt = jnp.swapaxes(w, -1, -2).reshape(*lead, n, k // MXFP4_BLOCK, MXFP4_BLOCK)  # [*lead, N, G, 32]
    amax = jnp.max(jnp.abs(wt), axis=-1)
    # frexp gives amax / 6 = f * 2**e exactly, f in [0.5, 1): the smallest power of two at or
    # above it is 2**e, or 2**(e - 1) when amax / 6 is itself one (f == 0.5).
    f, e = jnp.frexp(jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / 6.0)
    exp = jnp.clip(jnp.where(f == 0.5, e - 1, e), -127, 127)  # [*lead, N, G]
    v = wt / jnp.ldexp(jnp.float32(1), exp)[..., None]
    codes = jnp.argmin(jnp.abs(v[..., None] - jnp.asarray(E2M1_VALUES)), axis=-1).astype(jnp.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [*lead, N, G, 16]
    return blocks.reshape(*lead, n, k // 2), (exp + 127).astype(jnp.uint8)


def dequantize_mxfp4(t: Mxfp4Tensor, dtype=jnp.bfloat16) -> jax.Array:
    """Materialise `t` at its logical shape [*lead, K, N] in `dtype` (exact in float32)."""
    *lead, k, n = t.shape
    codes = jnp.stack([t.blocks & 0x0F, t.blocks >> 4], axis=-1)  # [*lead, N, K/2, 2]
    v = e2m1_decode(codes).reshape(*lead, n, k // MXFP4_BLOCK, MXFP4_BLOCK) * e8m0_decode(t.scales)[..., None]
    return jnp.swapaxes(v.reshape(*lead, n, k), -1, -2).astype(dtype)
