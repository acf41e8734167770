"""Quantization math: the one home of quantize / dequantize / pack / unpack.

Formats (DESIGN.md, Quantization math):

* symmetric int (b bits): ``qmax = 2**(b-1) - 1``, ``scale = absmax / qmax``,
  ``q = clip(round(x / scale), -qmax, qmax)``, ``x̂ = q * scale``. Stored as int8
  (8 bits) or two's-complement nibbles / crumbs packed into uint8.
* asymmetric int: ``scale = (max - min) / (2**b - 1)``, ``q = round((x - min) / scale)``,
  ``x̂ = q * scale + min``; ``zero`` holds ``min``. Stored as uint8 / packed unsigned.
* fp8 e4m3: ``scale = absmax / 448``, stored as ``float8_e4m3fn``.

Scales and zero points are rounded into ``scale_dtype`` *before* the values are
quantized with them (zero rounded down, scale rounded up), so the stored
parameters are the ones the bound holds for: ``|x - x̂| <= scale / 2`` plus f32
rounding for the integer formats. An all-zero group gets scale 0 and
dequantizes to exactly 0, never NaN.

Two scale layouts:

* per token (``axis="token"``): ``x[..., D]`` -> ``scale[..., D // group]``;
* per channel (``axis="channel"``): ``x[..., N * token_group, D]`` ->
  ``scale[..., N, D]`` (one scale per channel per group of ``token_group`` tokens).

Packing splits head_dim (no interleave): int4 byte j holds element j in the low
nibble and element j + D/2 in the high nibble; int2 byte j holds elements
j, j + D/4, j + D/2, j + 3D/4 in bits 0-1, 2-3, 4-5, 6-7.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvq_jax.spec import TensorSpec

FP8_MAX = 448.0
FP8_DTYPE = jnp.float8_e4m3fn


class Quantized(NamedTuple):
    """One quantized tensor: ``data`` (storage dtype), ``scale`` and ``zero`` (None if symmetric)."""

    data: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None


def pair_slot(t):
    """Storage slot of token ``t`` on a token axis of bytes stored in pairs (``t`` an int or an int
    array, numpy or jax): in each group of 16 tokens, tokens ``j`` and ``j + 8`` are the low and high
    bytes of 16-bit word ``j`` (slots ``2 j`` and ``2 j + 1``). `kvq_jax.serve.PagedKVCache` stores
    sub-byte values so (tokens-minor, ``v_pairs``): the decode kernel loads a tile as 16-bit words
    and each word's two bytes go to the two halves of the block
    (`kvq_jax.kernels.decode.pair_split`), so ``p @ v`` keeps the 16-bit operand layout of the
    logits (Triton sizes a dot's operands by the narrowest load that feeds them)."""
    return 16 * (t // 16) + 2 * (t % 8) + (t % 16) // 8


def scale_dtype_of(name: str):
    """"bf16" | "f32" -> jnp dtype."""
    return {"bf16": jnp.bfloat16, "f32": jnp.float32}[name]


def storage_dtype(t: TensorSpec):
    """dtype of the ``data`` leaf for a tensor stored as ``t``."""
    if t.format == "bf16":
        return jnp.bfloat16
    if t.format == "fp8":
        return FP8_DTYPE
    if t.format == "int8":
        return jnp.int8 if t.symmetric else jnp.uint8
    return jnp.uint8


def packed_dim(t: TensorSpec, head_dim: int) -> int:
    """Last-axis length of the stored data for vectors of ``head_dim``."""
    return {"int4": head_dim // 2, "int2": head_dim // 4}.get(t.format, head_dim)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


# -- packing ----------------------------------------------------------------

def _check_int_input(x, name, d_mult):
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array, got {x.dtype}")
    if x.shape[-1] % d_mult:
        raise ValueError(f"{name}: last axis {x.shape[-1]} must be divisible by {d_mult}")


def pack_int4(x: jax.Array) -> jax.Array:
    """int8[..., D] with values in [-8, 15] -> uint8[..., D/2], split layout.

    Byte j = (x[j] & 0xF) | (x[j + D/2] & 0xF) << 4. Signed values are stored
    as two's-complement nibbles; ``unpack_int4(p, signed=True)`` restores them.
    """
    _check_int_input(x, "x", 2)
    h = x.shape[-1] // 2
    b = x.astype(jnp.uint8)
    return (b[..., :h] & 0xF) | ((b[..., h:] & 0xF) << 4)


def unpack_int4(p: jax.Array, signed: bool = True) -> jax.Array:
    """uint8[..., D/2] -> int8[..., D] (inverse of ``pack_int4``); ``signed`` sign-extends nibbles."""
    if p.dtype != jnp.uint8:
        raise TypeError(f"p: expected uint8, got {p.dtype}")
    lo = (p & 0xF).astype(jnp.int8)
    hi = (p >> 4).astype(jnp.int8)
    if signed:
        lo = (lo ^ 8) - 8
        hi = (hi ^ 8) - 8
    return jnp.concatenate([lo, hi], axis=-1)


def pack_int2(x: jax.Array) -> jax.Array:
    """int8[..., D] with values in [-2, 3] -> uint8[..., D/4], split layout.

    Byte j holds x[j], x[j + D/4], x[j + D/2], x[j + 3D/4] in bits 0-1, 2-3, 4-5, 6-7.
    """
    _check_int_input(x, "x", 4)
    q = x.shape[-1] // 4
    b = x.astype(jnp.uint8) & 0x3
    return b[..., :q] | (b[..., q:2 * q] << 2) | (b[..., 2 * q:3 * q] << 4) | (b[..., 3 * q:] << 6)


def unpack_int2(p: jax.Array, signed: bool = True) -> jax.Array:
    """uint8[..., D/4] -> int8[..., D] (inverse of ``pack_int2``); ``signed`` sign-extends."""
    if p.dtype != jnp.uint8:
        raise TypeError(f"p: expected uint8, got {p.dtype}")
    parts = [((p >> s) & 0x3).astype(jnp.int8) for s in (0, 2, 4, 6)]
    if signed:
        parts = [(v ^ 2) - 2 for v in parts]
    return jnp.concatenate(parts, axis=-1)


def _pack(q: jax.Array, t: TensorSpec) -> jax.Array:
    if t.format == "int4":
        return pack_int4(q)
    if t.format == "int2":
        return pack_int2(q)
    return q.astype(storage_dtype(t))


def unpack(data: jax.Array, t: TensorSpec) -> jax.Array:
    """Stored integer data -> int32 grid values ``q`` of full head_dim."""
    if t.format == "int4":
        return unpack_int4(data, signed=t.symmetric).astype(jnp.int32)
    if t.format == "int2":
        return unpack_int2(data, signed=t.symmetric).astype(jnp.int32)
    return data.astype(jnp.int32)


# -- parameter rounding -----------------------------------------------------

def _round_up(s: jax.Array, dtype) -> jax.Array:
    """Round non-negative f32 ``s`` into ``dtype``, never below ``s``."""
    c = s.astype(dtype)
    up = jnp.nextafter(c, jnp.array(jnp.inf, dtype))
    return jnp.where(c.astype(jnp.float32) < s, up, c)


def _round_down(z: jax.Array, dtype) -> jax.Array:
    """Round f32 ``z`` into ``dtype``, never above ``z``."""
    c = z.astype(dtype)
    dn = jnp.nextafter(c, jnp.array(-jnp.inf, dtype))
    return jnp.where(c.astype(jnp.float32) > z, dn, c)


def _safe_inv(s: jax.Array, rcp=None) -> jax.Array:
    """``1 / s`` (0 where ``s`` is 0), correctly rounded; ``rcp``: the reciprocal to use instead of
    a division (a kernel's correctly rounded instruction)."""
    d = jnp.where(s > 0, s, 1.0)
    return jnp.where(s > 0, 1.0 / d if rcp is None else rcp(d), 0.0)


def _bf16_step(c: jax.Array, n: int) -> jax.Array:
    """f32 ``c`` (a bf16 value) moved by ``n`` bf16 units of its bit pattern (for ``c >= 0``: n ulps)."""
    u = lax.bitcast_convert_type(c, jnp.uint32)
    return lax.bitcast_convert_type(u + jnp.uint32((n % 2**16) << 16), jnp.float32)


def bf16_ceil(a: jax.Array) -> jax.Array:
    """The smallest bf16 value ``>= a`` (f32 ``a >= 0``), as f32 (integer ops only)."""
    u = lax.bitcast_convert_type(a, jnp.uint32)
    up = jnp.where((u & 0xFFFF) != 0, jnp.uint32(1), jnp.uint32(0))
    return lax.bitcast_convert_type(((u >> 16) + up) << 16, jnp.float32)


def bf16_floor(z: jax.Array) -> jax.Array:
    """The largest bf16 value ``<= z`` (f32 ``z``, any sign), as f32 (integer ops only)."""
    u = lax.bitcast_convert_type(z, jnp.uint32)
    up = jnp.where(((u & 0xFFFF) != 0) & ((u >> 31) == 1), jnp.uint32(1), jnp.uint32(0))  # negative: away from 0
    return lax.bitcast_convert_type(((u >> 16) + up) << 16, jnp.float32)


def bf16_scale(a: jax.Array, n: int) -> jax.Array:
    """The smallest bf16 value ``s`` with ``s * n >= a`` (f32 ``a >= 0``, integer ``n``), as f32: ``a / n``
    rounded up into bf16 exactly, whatever rounding a division or a reciprocal has where it runs
    (XLA turns ``a / n`` into ``a * (1 / n)``; a kernel's ``/`` may be approximate). A guess from
    ``a * (1 / n)`` is within one bf16 unit; ``s * n`` of a bf16 ``s`` and ``n < 2**16`` is exact in
    f32, so one step each way settles it."""
    c = bf16_ceil(a * (1.0 / n))
    c = jnp.where(c * n < a, _bf16_step(c, 1), c)
    down = _bf16_step(c, -1)
    return jnp.where((c > 0) & (down * n >= a), down, c)


def round_div(v: jax.Array, s: jax.Array, rcp=None, rint=jnp.round) -> jax.Array:
    """``v / s`` rounded to the nearest integer, ties to even, exactly (f32 ``v``, bf16-valued ``s >= 0``
    with ``|v / s|`` under 2**8; 0 where ``s`` is 0), as f32: a guess ``q = rint(v * (1 / s))``, then
    the exact remainder ``v - q * s`` (``q * s`` has at most 16 significant bits, and ``v`` is within
    a factor of two of it when ``q != 0``) moves it by one where it is past half a step, so the
    result does not depend on how a reciprocal or a product rounds where it runs (XLA may turn
    ``v * (1 / s)`` into a division; a kernel's ``/`` may be approximate)."""
    q = rint(v * _safe_inv(s, rcp))
    r = v - q * s
    h = 0.5 * s
    odd = (q - 2.0 * rint(0.5 * q)) != 0  # q is an integer: odd where halving it leaves a half
    up = jnp.where((r > h) | ((r == h) & odd), 1.0, 0.0)
    down = jnp.where((r < -h) | ((r == -h) & odd), 1.0, 0.0)
    return q + jnp.where(s > 0, up - down, 0.0)


def _scale_up(a: jax.Array, n: int, sdt) -> jax.Array:
    """``a / n`` rounded up into ``sdt``, as f32 (`bf16_scale` for bf16)."""
    if jnp.dtype(sdt) == jnp.bfloat16:
        return bf16_scale(a, n)
    return _round_up(a / n, sdt).astype(jnp.float32)


def _zero_down(z: jax.Array, sdt) -> jax.Array:
    """``z`` rounded down into ``sdt``, as f32."""
    if jnp.dtype(sdt) == jnp.bfloat16:
        return bf16_floor(z)
    return _round_down(z, sdt).astype(jnp.float32)


# -- quantize / dequantize ---------------------------------------------------

def _grouped(x, t: TensorSpec, token_group: int | None):
    """Reshape so that the reduction axis of one scale is axis -2 (channel) or -1 (token)."""
    d = x.shape[-1]
    if t.axis == "token":
        g = t.group_size(d)
        if d % g:
            raise ValueError(f"x: head_dim {d} is not divisible by group {g}")
        return x.reshape(*x.shape[:-1], d // g, g), -1
    if token_group is None:
        raise ValueError("token_group: required for per-channel scales")
    n = x.shape[-2]
    if n % token_group:
        raise ValueError(f"x: token axis {n} must be a multiple of token_group={token_group}")
    return x.reshape(*x.shape[:-2], n // token_group, token_group, d), -2


def quantize(
    x: jax.Array,
    t: TensorSpec,
    *,
    scale_dtype="f32",
    token_group: int | None = None,
    clip: float | None = None,
) -> Quantized:
    """Quantize ``x`` as tensor spec ``t``.

    Args:
      x: ``Float[Array, "... D"]`` (per token) or ``Float[Array, "... N*token_group D"]``
        (per channel), any float dtype; computed in f32.
      t: the TensorSpec (format, axis, group, symmetric).
      scale_dtype: "f32" or "bf16" (or a jnp dtype), dtype of scale and zero.
      token_group: tokens per per-channel scale (axis="channel" only).
      clip: optional clip ratio in (0, 1]: each group's absmax (symmetric, fp8) is
        multiplied by it, or its [min, max] (asymmetric) shrunk by it around the
        midpoint; values outside are clipped. The ``scale / 2`` bound then holds only
        for the values inside the clipped range. None (default) is the plain quantizer.

    Returns:
      ``Quantized(data, scale, zero)``: data ``[..., Dp]`` in ``storage_dtype(t)``;
      scale/zero ``[..., D/group]`` (token) or ``[..., N, D]`` (channel); zero is None
      when symmetric. For "bf16" returns the bf16 data and no scales.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating array, got {x.dtype}")
    if t.format == "bf16":
        return Quantized(x.astype(jnp.bfloat16), None, None)
    sdt = scale_dtype_of(scale_dtype) if isinstance(scale_dtype, str) else scale_dtype
    shape = x.shape
    xg, red = _grouped(x.astype(jnp.float32), t, token_group)

    if t.format == "fp8":
        amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
        if clip is not None:
            amax = amax * clip
        s = _scale_up(amax, FP8_MAX, sdt)
        y = jnp.clip(xg * _safe_inv(s), -FP8_MAX, FP8_MAX)
        data = y.reshape(shape).astype(FP8_DTYPE)
        return Quantized(data, jnp.squeeze(s, red).astype(sdt), None)

    q, s, z = quantize_groups(xg, t, sdt, red, clip)
    data = _pack(q.reshape(shape), t)
    return Quantized(data, jnp.squeeze(s, red).astype(sdt), None if z is None else jnp.squeeze(z, red).astype(sdt))


def quantize_groups(xg: jax.Array, t: TensorSpec, sdt, red: int, clip=None, *, rcp=None, rint=jnp.round):
    """The integer grid of `quantize`: f32 ``xg`` with each scale's values along axis ``red`` ->
    ``(q int32, s f32, z f32 or None)`` (``s`` and ``z`` kept along ``red``, valued in ``sdt``).

    Only elementwise ops, reductions and bit casts, so a Pallas kernel runs the same function on
    its tiles (`kvq_jax.kernels.write`) with ``rcp`` (a correctly rounded reciprocal) and ``rint``
    (round half to even) as its own instructions: the stored bytes are the same."""
    qmin, qmax = qrange(t.bits, t.symmetric)
    if t.symmetric:
        amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
        if clip is not None:
            amax = amax * clip
        s = _scale_up(amax, qmax, sdt)
        q = jnp.clip(_grid(xg, s, sdt, rcp, rint), qmin, qmax)
        z = None
    else:
        lo = jnp.min(xg, axis=red, keepdims=True)
        hi = jnp.max(xg, axis=red, keepdims=True)
        if clip is not None:
            lo, hi = _shrink(lo, hi, clip)
        z = _zero_down(lo, sdt)
        s = _scale_up(hi - z, qmax, sdt)
        q = jnp.clip(_grid(xg - z, s, sdt, rcp, rint), qmin, qmax)
    return q.astype(jnp.int32), s, z


def _grid(v, s, sdt, rcp=None, rint=jnp.round):
    """``v / s`` rounded half to even onto the integer grid: exactly (`round_div`) for bf16 scales."""
    if jnp.dtype(sdt) == jnp.bfloat16:
        return round_div(v, s, rcp, rint)
    return rint(v * _safe_inv(s, rcp))


def _shrink(lo, hi, clip):
    """[lo, hi] shrunk by ``clip`` around its midpoint."""
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo) * clip
    return mid - half, mid + half


def fake_quantize(
    x: jax.Array,
    t: TensorSpec,
    *,
    scale_dtype="f32",
    token_group: int | None = None,
    clip: float | jax.Array | None = None,
) -> jax.Array:
    """``dequantize(quantize(x, ...))`` in f32, differentiable with straight-through rounding.

    The value is that of the stored round trip (same scales, zero points, rounding of
    parameters into ``scale_dtype``, clipping). For gradients, each rounding (of the
    grid value, of scales into ``scale_dtype``, of fp8 values) counts as the identity,
    so the result is differentiable in ``x`` and in ``clip`` (a scalar or an array
    broadcast against the scale groups): the objective of learned clip ratios.

    Args and shapes as `quantize`; returns ``f32`` of x's shape.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating array, got {x.dtype}")
    sg = jax.lax.stop_gradient

    def ste(a, f):  # value f(a), gradient of the identity
        return a + sg(f(sg(a)) - sg(a))

    xf = x.astype(jnp.float32)
    if t.format == "bf16":
        return ste(xf, lambda a: a.astype(jnp.bfloat16).astype(jnp.float32))
    sdt = scale_dtype_of(scale_dtype) if isinstance(scale_dtype, str) else scale_dtype
    down = lambda a: _zero_down(a, sdt)  # noqa: E731

    def scale(a, n):  # a / n, its value rounded up into sdt as `quantize` stores it
        return ste(a / n, lambda _: _scale_up(sg(a), n, sdt))

    def grid(v, s):  # v / s, its value rounded onto the grid as `quantize` rounds it
        return ste(v * _safe_inv(s), lambda _: _grid(sg(v), sg(s), sdt))

    shape = x.shape
    xg, red = _grouped(xf, t, token_group)
    if t.format == "fp8":
        amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
        if clip is not None:
            amax = amax * clip
        s = scale(amax, FP8_MAX)
        y = jnp.clip(xg * _safe_inv(s), -FP8_MAX, FP8_MAX)
        out = ste(y, lambda a: a.astype(FP8_DTYPE).astype(jnp.float32)) * s
        return out.reshape(shape)
    qmin, qmax = qrange(t.bits, t.symmetric)
    if t.symmetric:
        amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
        if clip is not None:
            amax = amax * clip
        s = scale(amax, qmax)
        q = jnp.clip(grid(xg, s), qmin, qmax)
        out = q * s
    else:
        lo = jnp.min(xg, axis=red, keepdims=True)
        hi = jnp.max(xg, axis=red, keepdims=True)
        if clip is not None:
            lo, hi = _shrink(lo, hi, clip)
        z = ste(lo, down)
        s = scale(hi - z, qmax)
        q = jnp.clip(grid(xg - z, s), qmin, qmax)
        out = q * s + z
    return out.reshape(shape)


def dequantize(
    qt: Quantized,
    t: TensorSpec,
    *,
    token_group: int | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """Inverse of ``quantize``: ``x̂ = q * scale (+ zero)`` in ``dtype`` (math in f32)."""
    data, scale, zero = qt
    if t.format == "bf16":
        return data.astype(dtype)
    if t.format == "fp8":
        q = data.astype(jnp.float32)
    else:
        q = unpack(data, t).astype(jnp.float32)
    d = q.shape[-1]
    shape = q.shape
    s = scale.astype(jnp.float32)
    if t.axis == "token":
        g = t.group_size(d)
        qg = q.reshape(*shape[:-1], d // g, g)
        x = qg * s[..., None]
        if zero is not None:
            x = x + zero.astype(jnp.float32)[..., None]
    else:
        n = shape[-2] // token_group
        qg = q.reshape(*shape[:-2], n, token_group, d)
        x = qg * s[..., None, :]
        if zero is not None:
            x = x + zero.astype(jnp.float32)[..., None, :]
    return x.reshape(shape).astype(dtype)


def error_bound(qt: Quantized, t: TensorSpec, x: jax.Array, *, token_group: int | None = None) -> jax.Array:
    """Elementwise worst-case |x - x̂| the format guarantees, broadcast to ``x.shape`` (f32).

    Integer formats: scale / 2 (f32 rounding of the arithmetic is left to the caller's
    tolerance). fp8 e4m3: half an ulp of the scaled value (2**-4 relative, 2**-10 * scale
    absolute in the subnormal range), times the scale.
    """
    if t.format == "bf16":
        return jnp.abs(x.astype(jnp.float32)) * 2.0**-8
    s = qt.scale.astype(jnp.float32)
    d = x.shape[-1]
    if t.axis == "token":
        g = t.group_size(d)
        sb = jnp.repeat(s, g, axis=-1)
    else:
        sb = jnp.repeat(s, token_group, axis=-2)
    if t.format == "fp8":
        return jnp.maximum(jnp.abs(x.astype(jnp.float32)) * 2.0**-4, sb * 2.0**-10)
    return sb / 2


def hadamard(n: int, dtype=jnp.float32) -> jax.Array:
    """Orthonormal Sylvester-Hadamard matrix ``[n, n]`` (n a power of two): H @ H.T = I."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"n: Hadamard rotation needs a power-of-two size, got {n}")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(h / np.sqrt(n), dtype)


def rotate(x: jax.Array, inverse: bool = False) -> jax.Array:
    """``x @ H`` (or ``x @ H.T`` when ``inverse``) on the last axis, f32 at full precision."""
    h = hadamard(x.shape[-1])
    return jnp.matmul(x.astype(jnp.float32), h.T if inverse else h, precision=jax.lax.Precision.HIGHEST)
