"""quant.py: the error bound |x - x̂| <= scale/2 (integer formats) and the fp8 relative
bound, checked both through ``quant.error_bound`` and recomputed here from the returned
scales; pack / unpack round trips and the split byte layout of DESIGN.md."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvq_jax as kvq
from kvq_jax import TensorSpec, quant

F32_EPS = 2.0**-23
SETTINGS = settings(max_examples=30, deadline=None, database=None)


@partial(jax.jit, static_argnames=("t", "scale_dtype", "token_group"))
def _roundtrip(x, t, scale_dtype, token_group):
    qt = kvq.quantize(x, t, scale_dtype=scale_dtype, token_group=token_group)
    xh = kvq.dequantize(qt, t, token_group=token_group)
    eb = quant.error_bound(qt, t, x, token_group=token_group)
    return qt, xh, eb


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _make_x(rng, shape, *, magnitude, outliers, zero_rows, const_rows, channel, tg):
    """Random data with outlier channels (10-100x), all-zero and constant blocks."""
    x = rng.standard_normal(shape) * magnitude
    D = shape[-1]
    if outliers:
        ch = rng.choice(D, size=max(1, D // 8), replace=False)
        x[..., ch] *= rng.uniform(10, 100, size=len(ch))
    S = shape[-2]
    # a zero / constant block is a whole token row (per-token scales) or a whole token group
    # (per-channel scales), so that it is one scale group of its own.
    block = tg if channel else 1
    nblocks = S // block
    picks = rng.permutation(nblocks)
    for i in picks[:zero_rows]:
        x[..., i * block:(i + 1) * block, :] = 0.0
    for i in picks[zero_rows:zero_rows + const_rows]:
        x[..., i * block:(i + 1) * block, :] = rng.standard_normal() * magnitude
    return x.astype(np.float32)


@st.composite
def int_cases(draw):
    fmt = draw(st.sampled_from(["int8", "int4", "int2"]))
    sym = draw(st.booleans())
    channel = draw(st.booleans())
    D = draw(st.sampled_from([4, 8, 16, 32, 64, 128]))
    if channel:
        group = None
        tg = draw(st.sampled_from([1, 2, 4, 8, 32]))
        S = tg * draw(st.integers(1, 3))
    else:
        group = draw(st.sampled_from([g for g in (None, 4, 8, 16, 32) if g is None or D % g == 0]))
        tg = None
        S = draw(st.sampled_from([1, 3, 8]))
    lead = draw(st.sampled_from([(), (2,), (2, 3)]))
    t = TensorSpec(fmt, "channel" if channel else "token", group, sym)
    return dict(
        t=t, shape=lead + (S, D), tg=tg,
        scale_dtype=draw(st.sampled_from(["f32", "bf16"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        magnitude=10.0 ** draw(st.integers(-3, 3)),
        outliers=draw(st.booleans()),
        zero_rows=draw(st.integers(0, 1)),
        const_rows=draw(st.integers(0, 1)),
    )


def _expanded(p, t, D, tg):
    """scale / zero broadcast to x's shape, by this test's own indexing."""
    p = _f64(p)
    if t.axis == "token":
        return np.repeat(p, D // p.shape[-1], axis=-1)
    return np.repeat(p, tg, axis=-2)


@SETTINGS
@given(int_cases())
def test_integer_quantization_error_bound(kv, case):
    t, tg, sdt = case["t"], case["tg"], case["scale_dtype"]
    rng = np.random.default_rng(case["seed"])
    x = _make_x(rng, case["shape"], magnitude=case["magnitude"], outliers=case["outliers"],
                zero_rows=case["zero_rows"], const_rows=case["const_rows"],
                channel=t.axis == "channel", tg=tg)
    D = x.shape[-1]
    qt, xh, eb = _roundtrip(jnp.asarray(x), t, sdt, tg)

    # storage: dtype, packed width, parameter shapes and dtype
    assert qt.data.dtype == quant.storage_dtype(t)
    assert qt.data.shape == x.shape[:-1] + (D * t.bits // 8,)
    pshape = (x.shape[:-1] + (D // t.group_size(D),) if t.axis == "token"
              else x.shape[:-2] + (x.shape[-2] // tg, D))
    assert qt.scale.shape == pshape
    assert qt.scale.dtype == quant.scale_dtype_of(sdt)
    assert (qt.zero is None) == t.symmetric
    if qt.zero is not None:
        assert qt.zero.shape == pshape and qt.zero.dtype == qt.scale.dtype

    # integer grid values are inside the format's range
    qmin, qmax = quant.qrange(t.bits, t.symmetric)
    assert (qmin, qmax) == ((-(2 ** (t.bits - 1) - 1), 2 ** (t.bits - 1) - 1) if t.symmetric
                            else (0, 2**t.bits - 1))
    g = kv.unpack_np(qt.data, t)
    assert g.min() >= qmin and g.max() <= qmax

    xh = _f64(xh)
    x64 = x.astype(np.float64)
    assert np.all(np.isfinite(xh))
    s = _expanded(qt.scale, t, D, tg)
    z = np.zeros_like(s) if qt.zero is None else _expanded(qt.zero, t, D, tg)
    assert np.all(s >= 0)
    # f32 rounding of x - z, * 1/s, q * s + z: a few ulps of the magnitudes involved
    tol = 8 * F32_EPS * (np.abs(x64) + qmax * s + np.abs(z)) + 1e-30
    err = np.abs(x64 - xh)

    # (1) the library's bound, and (2) the same bound recomputed here from the scales
    bound = s / 2
    np.testing.assert_allclose(_f64(eb), bound, rtol=0, atol=0)
    assert np.all(err <= bound + tol), float(np.max(err - bound - tol))

    # the scales are the ones the formulas of DESIGN.md give (so the bound is not vacuous)
    rel = 2.0**-7 if sdt == "bf16" else 4 * F32_EPS
    red = -1 if t.axis == "token" else -2
    xs = (x64.reshape(*x.shape[:-1], D // t.group_size(D), t.group_size(D)) if t.axis == "token"
          else x64.reshape(*x.shape[:-2], x.shape[-2] // tg, tg, D))
    hi = _expanded(np.max(xs, axis=red), t, D, tg)
    lo = _expanded(np.min(xs, axis=red), t, D, tg)
    if t.symmetric:
        amax = np.maximum(np.abs(hi), np.abs(lo))
        assert np.all(s * qmax >= amax * (1 - 4 * F32_EPS))
        assert np.all(s * qmax <= amax * (1 + rel) + 1e-30)
    else:
        assert np.all(z <= lo)
        assert np.all(z >= lo - np.abs(lo) * rel - 1e-30)
        assert np.all((z + s * qmax) >= hi - 8 * F32_EPS * (np.abs(hi) + np.abs(z)))
        assert np.all(s * qmax <= (hi - z) * (1 + rel) + 1e-30)

    # zero blocks dequantize to exactly 0; symmetric formats keep every 0 exactly 0
    zero_blocks = (hi == 0) & (lo == 0)
    assert np.all(xh[zero_blocks] == 0.0)
    if t.symmetric:
        assert np.all(xh[x64 == 0] == 0.0)
    # constant blocks with f32 asymmetric parameters are exact (scale 0, zero = the constant)
    if not t.symmetric and sdt == "f32":
        const = hi == lo
        assert np.all(xh[const] == x64[const])

    # dequantize agrees with this test's own unpack-and-scale: f32 rounds q * s and the sum + z
    # (once if XLA fuses them into an FMA, twice if not), each by half an ulp of its magnitude
    ref = kv.dequant_np(qt.data, qt.scale, qt.zero, t, tg)
    diff = np.abs(xh - ref)
    assert np.all(diff <= F32_EPS * (np.abs(ref - z) + np.abs(ref)) + 1e-30), float(np.max(diff))


@st.composite
def fp8_cases(draw):
    D = draw(st.sampled_from([8, 16, 64, 128]))
    group = draw(st.sampled_from([g for g in (None, 8, 16, 32) if g is None or D % g == 0]))
    return dict(
        t=TensorSpec("fp8", "token", group, True), shape=draw(st.sampled_from([(3, D), (2, 3, D)])),
        scale_dtype=draw(st.sampled_from(["f32", "bf16"])), seed=draw(st.integers(0, 2**31 - 1)),
        magnitude=10.0 ** draw(st.integers(-3, 3)), outliers=draw(st.booleans()),
        zero_rows=draw(st.integers(0, 1)), const_rows=draw(st.integers(0, 1)),
    )


@SETTINGS
@given(fp8_cases())
def test_fp8_relative_error_bound(case):
    t, sdt = case["t"], case["scale_dtype"]
    rng = np.random.default_rng(case["seed"])
    x = _make_x(rng, case["shape"], magnitude=case["magnitude"], outliers=case["outliers"],
                zero_rows=case["zero_rows"], const_rows=case["const_rows"], channel=False, tg=None)
    D = x.shape[-1]
    qt, xh, eb = _roundtrip(jnp.asarray(x), t, sdt, None)
    assert qt.data.dtype == jnp.float8_e4m3fn and qt.data.shape == x.shape
    assert qt.zero is None and qt.scale.dtype == quant.scale_dtype_of(sdt)
    x64, xh = x.astype(np.float64), _f64(xh)
    assert np.all(np.isfinite(xh)) and np.all(np.isfinite(_f64(qt.data)))
    s = _expanded(qt.scale, t, D, None)
    # e4m3: 3 mantissa bits -> half an ulp is 2**-4 relative; subnormal spacing 2**-9
    bound = np.maximum(np.abs(x64) * 2.0**-4, s * 2.0**-10)
    np.testing.assert_allclose(_f64(eb), bound, rtol=F32_EPS, atol=0)
    err = np.abs(x64 - xh)
    assert np.all(err <= bound * (1 + 8 * F32_EPS) + 4 * F32_EPS * np.abs(x64) + 1e-30)
    # scale = absmax / 448 (rounded up into the scale dtype), so nothing saturates
    g = t.group_size(D)
    amax = _expanded(np.abs(x64).reshape(*x.shape[:-1], D // g, g).max(-1), t, D, None)
    rel = 2.0**-7 if sdt == "bf16" else 4 * F32_EPS
    assert np.all(s * 448 >= amax * (1 - 4 * F32_EPS))
    assert np.all(s * 448 <= amax * (1 + rel) + 1e-30)
    assert np.all(xh[x64 == 0] == 0.0)


@pytest.mark.parametrize("t", [TensorSpec("int8"), TensorSpec("int4", group=8, symmetric=False),
                               TensorSpec("fp8"), TensorSpec("int2", "channel", None, False)])
def test_all_zero_input_is_exactly_zero_not_nan(t):
    x = jnp.zeros((2, 8, 16), jnp.float32)
    qt, xh, eb = _roundtrip(x, t, "bf16", 4 if t.axis == "channel" else None)
    assert np.all(_f64(qt.scale) == 0)
    assert np.all(_f64(xh) == 0.0) and not np.any(np.isnan(_f64(eb)))


def test_bf16_format_is_a_plain_cast():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)
    qt = kvq.quantize(x, TensorSpec("bf16"))
    assert qt.data.dtype == jnp.bfloat16 and qt.scale is None and qt.zero is None
    xh = _f64(kvq.dequantize(qt, TensorSpec("bf16")))
    np.testing.assert_array_equal(xh, _f64(x.astype(jnp.bfloat16)))
    # round to nearest bf16 (8 significant bits): |x - x̂| <= 2**-8 |x|
    eb = _f64(quant.error_bound(qt, TensorSpec("bf16"), x))
    np.testing.assert_allclose(eb, np.abs(_f64(x)) * 2.0**-8, rtol=1e-7)
    assert np.all(np.abs(_f64(x) - xh) <= eb)


def test_quantize_bad_inputs():
    with pytest.raises(TypeError, match="x"):
        kvq.quantize(jnp.ones((2, 8), jnp.int32), TensorSpec("int8"))
    with pytest.raises(ValueError, match="group|head_dim"):
        kvq.quantize(jnp.ones((2, 12)), TensorSpec("int8", group=8))
    with pytest.raises(ValueError, match="token_group"):
        kvq.quantize(jnp.ones((8, 8)), TensorSpec("int4", "channel"))
    with pytest.raises(ValueError, match="token"):
        kvq.quantize(jnp.ones((6, 8)), TensorSpec("int4", "channel"), token_group=4)


# -- pack / unpack ---------------------------------------------------------------

@partial(jax.jit, static_argnums=(1, 2))
def _pack_roundtrip(x, bits, signed):
    pack, unpack = (kvq.pack_int4, kvq.unpack_int4) if bits == 4 else (kvq.pack_int2, kvq.unpack_int2)
    p = pack(x)
    return p, unpack(p, signed=signed)


@SETTINGS
@given(bits=st.sampled_from([4, 2]), signed=st.booleans(),
       lead=st.sampled_from([(), (3,), (2, 5)]), units=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(kv, bits, signed, lead, units, seed):
    per = 8 // bits
    D = per * units
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    x = np.random.default_rng(seed).integers(lo, hi + 1, size=lead + (D,)).astype(np.int8)
    p, back = _pack_roundtrip(jnp.asarray(x), bits, signed)
    assert p.dtype == jnp.uint8 and p.shape == lead + (D // per,)
    assert back.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back), x)
    # the bytes are the split layout: element j + i*D/per sits in bits [bits*i, bits*(i+1))
    np.testing.assert_array_equal(
        kv.unpack_np(p, TensorSpec("int4" if bits == 4 else "int2", symmetric=signed)), x)
    pb = np.asarray(p).astype(np.int64)
    want = np.zeros(lead + (D // per,), np.int64)
    for i in range(per):
        want |= (x[..., i * (D // per):(i + 1) * (D // per)].astype(np.int64) & (2**bits - 1)) << (bits * i)
    np.testing.assert_array_equal(pb, want)


def test_pack_int4_hand_built_bytes():
    x = jnp.array([1, 2, 3, 4, 5, 6, 7, -8], jnp.int8)  # D = 8: byte j = x[j] | x[j+4] << 4
    assert np.asarray(kvq.pack_int4(x)).tolist() == [0x51, 0x62, 0x73, 0x84]
    assert np.asarray(kvq.unpack_int4(jnp.array([0x51, 0x62, 0x73, 0x84], jnp.uint8))).tolist() == [
        1, 2, 3, 4, 5, 6, 7, -8]
    assert np.asarray(kvq.unpack_int4(jnp.array([0xF0], jnp.uint8), signed=False)).tolist() == [0, 15]
    assert np.asarray(kvq.unpack_int4(jnp.array([0xF0], jnp.uint8), signed=True)).tolist() == [0, -1]


def test_pack_int2_hand_built_bytes():
    # D = 8: byte j holds x[j], x[j+2], x[j+4], x[j+6] in bits 0-1, 2-3, 4-5, 6-7
    x = jnp.array([0, 1, 2, 3, -1, -2, 1, 0], jnp.int8)
    # byte 0: 0 | 2<<2 | (-1&3)<<4 | 1<<6 = 0b01_11_10_00; byte 1: 1 | 3<<2 | (-2&3)<<4 | 0<<6
    assert np.asarray(kvq.pack_int2(x)).tolist() == [0b01111000, 0b00101101]
    assert np.asarray(kvq.unpack_int2(jnp.array([0b01111000, 0b00101101], jnp.uint8),
                                      signed=False)).tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert np.asarray(kvq.unpack_int2(jnp.array([0b11100100], jnp.uint8), signed=True)).tolist() == [
        0, 1, -2, -1]


def test_quantize_writes_the_split_layout():
    # int4 symmetric, absmax 7 -> scale 1, q = x; byte j = q[j] | q[j+4] << 4
    t4 = TensorSpec("int4")
    qt = kvq.quantize(jnp.array([7., 1., 2., 3., -7., -1., 0., 4.]), t4)
    assert np.asarray(qt.scale).tolist() == [1.0]
    assert np.asarray(qt.data).tolist() == [0x97, 0xF1, 0x02, 0x43]
    # int2 asymmetric, min 0 max 3 -> scale 1, zero 0, q = x
    t2 = TensorSpec("int2", symmetric=False)
    qt = kvq.quantize(jnp.array([0., 1., 2., 3., 3., 2., 1., 0.]), t2)
    assert (np.asarray(qt.scale).tolist(), np.asarray(qt.zero).tolist()) == ([1.0], [0.0])
    assert np.asarray(qt.data).tolist() == [0b01111000, 0b00101101]
    # int8 symmetric stores the grid values themselves
    qt = kvq.quantize(jnp.array([127., -127., 3., 0.]), TensorSpec("int8"))
    assert qt.data.dtype == jnp.int8 and np.asarray(qt.data).tolist() == [127, -127, 3, 0]


def test_pack_bad_inputs():
    with pytest.raises(TypeError, match="x"):
        kvq.pack_int4(jnp.ones(8, jnp.float32))
    with pytest.raises(ValueError, match="x"):
        kvq.pack_int4(jnp.ones(7, jnp.int8))
    with pytest.raises(ValueError, match="x"):
        kvq.pack_int2(jnp.ones(6, jnp.int8))
    with pytest.raises(TypeError, match="p"):
        kvq.unpack_int4(jnp.ones(4, jnp.int8))
    with pytest.raises(TypeError, match="p"):
        kvq.unpack_int2(jnp.ones(4, jnp.int32))


# -- rotation ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 64, 128])
def test_hadamard_is_orthonormal(kv, n):
    h = np.asarray(kvq.hadamard(n), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(h, kv.hadamard_np(n), atol=1e-7)


def test_rotate_round_trip_and_bad_size():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), jnp.float32)
    np.testing.assert_allclose(_f64(quant.rotate(quant.rotate(x), inverse=True)), _f64(x), atol=1e-5)
    with pytest.raises(ValueError, match="n"):
        kvq.hadamard(96)


def _bf16_neighbours(c):
    """float64 values of the bf16 numbers just below and above float32 bf16-valued ``c >= 0``."""
    u = np.asarray(c, np.float32).view(np.uint32)
    down = np.where(u > 0, u - 0x10000, 0).astype(np.uint32).view(np.float32)
    return down.astype(np.float64), (u + 0x10000).astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("n", [1, 3, 7, 15, 127, 255, 448])
def test_bf16_scale_is_the_exact_ceiling(n):
    """`quant.bf16_scale(a, n)`: the smallest bf16 ``s`` with ``s * n >= a`` (checked in float64), on
    random magnitudes and on values at and one f32 unit around ``c * n`` for bf16 ``c`` (where a
    division or a reciprocal rounded the other way would land on the wrong side)."""
    rng = np.random.default_rng(n)
    c = rng.standard_normal(4000).astype(np.float32)
    c = np.abs(c * np.exp2(rng.integers(-60, 60, c.shape))).astype(jnp.bfloat16).astype(np.float32)
    edges = (c.astype(np.float64) * n).astype(np.float32)  # exact: 8 + 9 significant bits
    a = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, 0),
                        np.abs(rng.standard_normal(4000) * 10.0 ** rng.integers(-30, 30, 4000)), [0.0]]).astype(np.float32)
    s = np.asarray(jax.jit(lambda a: quant.bf16_scale(a, n))(a))
    assert np.array_equal(s, s.astype(jnp.bfloat16).astype(np.float32))  # a bf16 value
    down, _ = _bf16_neighbours(s)
    a64, s64 = a.astype(np.float64), s.astype(np.float64)
    assert np.all(s64 * n >= a64)
    assert np.all((s64 == 0) | (down * n < a64))


def test_bf16_floor_and_ceil_round_toward_their_side():
    rng = np.random.default_rng(3)
    z = (rng.standard_normal(5000) * 10.0 ** rng.integers(-20, 20, 5000)).astype(np.float32)
    z = np.concatenate([z, z.astype(jnp.bfloat16).astype(np.float32), [0.0, -0.0]]).astype(np.float32)
    lo = np.asarray(quant.bf16_floor(jnp.asarray(z)))
    assert np.array_equal(lo, lo.astype(jnp.bfloat16).astype(np.float32)) and np.all(lo <= z)
    # nothing between: the next bf16 up from lo is above z
    up = np.nextafter(lo.astype(jnp.bfloat16), np.array(np.inf, jnp.bfloat16)).astype(np.float32)
    assert np.all(up > z)
    a = np.abs(z)
    hi = np.asarray(quant.bf16_ceil(jnp.asarray(a)))
    dn = np.nextafter(hi.astype(jnp.bfloat16), np.array(-np.inf, jnp.bfloat16)).astype(np.float32)
    assert np.all(hi >= a) and np.all((hi == 0) | (dn < a))


def test_round_div_is_exact_whatever_the_reciprocal():
    """`quant.round_div(v, s)`: ``v / s`` rounded half to even, checked in float64, on random values,
    on exact ties and one f32 unit around them; the same with a reciprocal one or two units off
    (as an approximate division gives), so the stored grid does not depend on where it runs."""
    rng = np.random.default_rng(5)
    s = np.abs(rng.standard_normal(3000) * np.exp2(rng.integers(-30, 30, 3000))).astype(jnp.bfloat16).astype(np.float32)
    k = rng.integers(-127, 128, 3000)
    ties = ((k + 0.5) * s.astype(np.float64)).astype(np.float32)
    v = np.concatenate([ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf),
                        (rng.uniform(-127, 127, 3000) * s).astype(np.float32)]).astype(np.float32)
    ss = np.tile(s, 4)
    exact = np.round(v.astype(np.float64) / ss.astype(np.float64))  # numpy: half to even
    for name, rcp in [("correct", None), ("2 ulp high", lambda d: (1.0 / d) * (1 + 2.0**-22)),
                      ("1 ulp low", lambda d: (1.0 / d) * (1 - 2.0**-23))]:
        got = np.asarray(jax.jit(lambda v, s: quant.round_div(v, s, rcp))(v, ss))
        np.testing.assert_array_equal(got, exact, err_msg=name)
    assert float(quant.round_div(jnp.float32(3.0), jnp.float32(0.0))) == 0.0
