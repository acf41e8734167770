"""The Pallas decode kernel (interpret mode on CPU) against reference.py on the same quantized data.

Two modes:
* ``precise=True``: q and p are split into hi + lo 16-bit parts, so the kernel must match
  the f32 reference to f32 rounding (tolerance 5e-5 of max|v| on o, 2e-5 on lse).
* default: q is rounded once to fp16 (packed formats) or bf16 (bf16 format), p once to
  bf16 / fp16, and tiles that straddle scale groups are dequantized to 16 bits. With a
  relative rounding eps (2**-8 covers bf16 and fp16), every logit moves by at most
  Δ = 2 eps * scale * max_t Σ_d |q_d k̂_td|, every value by eps |v̂| and every weight p * s of
  p @ v by w = eps (formed in f32, rounded once), or w = (1 + eps)**3 - 1 for sub-byte values
  whose tiles are not scaled in registers (p, s and their product rounded to 16 bits), so
  |o - o_ref| <= (exp(2Δ) - 1 + w + eps) * max|v̂| (the softmax perturbation bound of
  test_attend_xla.py). That bound is what the default mode is held to. Where q meets
  integer keys in an int8 dot (Config.qk_int8), q is rounded to int8 instead, and Δ grows
  by scale * max|q_row| / 254 * max_t Σ_d |s k_td| over the scaled key integers (two int8
  terms of q, Config.qk_terms: / 64516 instead of / 254; `_q_int8_delta`).

Every format and scale layout meets G in {1, 3, 8}, D in {64, 128, 256}, T in {1, 4},
and lengths 1, block non-multiples and max_len, ragged across the batch. The compiled
(Triton) path is lowered for CUDA on the CPU for every format.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax import reference
from kvq_jax.kernels import decode

FORMATS = {  # every format and scale layout the kernel reads
    "bf16": "bf16",
    "fp8": "fp8",
    "int8": "int8",
    "int8-g32-asym": "k=int8:g32:asym,v=int8:g32:asym",
    "int4": "int4",
    "int4-tok-asym": "k=int4:asym,v=int4:asym",
    "int4-kivi": "int4-kivi",
    "int2-kivi": "int2-kivi",
    "int2": "int2",
    "int4-rot": "int4-rot",
    "k8v4": "k8v4",
    "kbf16-v4": "k=bf16,v=int4:g32:asym",
    "fp8-sinks": "k=fp8,v=fp8,sinks=4,res=8",
}
# (G, D, T) combinations: each format meets every G, D and T value over the list (rows G * T of
# 1, 12 and 32: one 16-row tile padded, and a 32-row one)
SHAPES = [(1, 256, 1), (3, 128, 4), (8, 64, 4)]
MAX_LEN = 200

# compiled once per structure, shapes and options (run op by op, the ops around the kernel and
# the reference took most of these tests' time)
kernel = jax.jit(decode.body_attention, static_argnums=3,
                 static_argnames=("interpret", "precise", "config", "v_token_minor", "v_pairs"))
ref_attention = jax.jit(reference.body_attention, static_argnums=3, static_argnames=("block",))
ref_dequantize = jax.jit(reference.dequantize_body, static_argnames=("dtype",))


def _case(name, spec_str, G, D, T, seed, H=2):
    rng = np.random.default_rng(seed)
    spec = kvq.KVSpec.parse(spec_str)
    B = 3
    lengths = np.array([MAX_LEN, max(T, 1), 133])  # max_len, 1 (or T), a non-multiple of the block
    cache = kvq.init_cache(spec, B, MAX_LEN, H, D)
    k = rng.standard_normal((B, MAX_LEN, H, D)).astype(np.float32)
    k[..., 5] *= 12.0  # an outlier channel, as real keys have
    v = rng.standard_normal((B, MAX_LEN, H, D)).astype(np.float32)
    cache = kvq.append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    q = jnp.asarray(rng.standard_normal((B, T, H * G, D)), jnp.float32)
    return spec, cache, q


def _body_inputs(spec, cache, q):
    B, T, Hq, D = q.shape
    H = cache.num_kv_heads
    qg = q.reshape(B, T, H, Hq // H, D)
    if spec.rotate:
        qg = kvq.quant.rotate(qg)
    qpos = cache.lengths[:, None] - T + jnp.arange(T)[None]
    return qg, qpos, 1.0 / math.sqrt(D)


def _check_kernel(name, shape, seed_key, config=None, fast=True, H=2):
    """The kernel (interpret mode) on `_case` data against ``reference.body_attention``: precise
    mode to f32 rounding; with ``fast``, the default mode within `_fast_bound`. ``config``:
    None, or a function of the cache giving the `decode.Config`. Returns the outputs ``(o, lse)``
    of the precise mode and ``o`` of the default mode (None without ``fast``)."""
    G, D, T = shape
    spec, cache, q = _case(name, FORMATS[name], G, D, T, seed=zlib.crc32(seed_key.encode()), H=H)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    o_ref, lse_ref = ref_attention(qg, cache, qpos, scale)
    k_hat, v_hat = ref_dequantize(cache)
    vmax = float(jnp.max(jnp.abs(v_hat)))
    finite = np.isfinite(np.asarray(lse_ref))
    cfg = None if config is None else config(cache)

    o, lse = kernel(qg, cache, qpos, scale, interpret=True, precise=True, config=cfg)
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=0, atol=5e-5 * vmax)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_ref)[finite], rtol=2e-5, atol=2e-5)
    if fast:
        o_fast, _ = kernel(qg, cache, qpos, scale, interpret=True, config=cfg)
        bound = _fast_bound(qg, k_hat, scale, vmax, q_delta=_q_delta(spec, cache, qg, scale, cfg),
                            p_roundings=_p_roundings(spec, cfg))
        err = float(jnp.max(jnp.abs(o_fast - o_ref)))
        assert err <= bound, f"{name}: fast-mode error {err:.3e} above its bound {bound:.3e}"
    return o, lse, (o_fast if fast else None)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"G{s[0]}-D{s[1]}-T{s[2]}")
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_kernel_matches_reference(name, shape):
    # the default (fast) mode is checked on one shape per format
    _check_kernel(name, shape, f"{name}{shape}", fast=shape == SHAPES[1])


def _fast_bound(qg, k_hat, scale, vmax, eps=2.0**-8, q_delta=0.0, p_roundings=1):
    """The default mode's error bound (module docstring): logits move by <= delta, values by
    eps, the weights ``p * s`` of ``p @ v`` by ``(1 + eps)**p_roundings - 1`` (`_p_roundings`);
    where q is rounded to int8 (Config.qk_int8) the logits also by ``q_delta`` (`_q_delta`)."""
    qk = jnp.einsum("bthgd,bhsd->bthgs", jnp.abs(qg), jnp.abs(k_hat), precision="highest")
    delta = 2 * eps * scale * float(jnp.max(qk)) + q_delta
    return (math.expm1(2 * delta) + (1 + eps) ** p_roundings - 1 + eps) * vmax


def _p_roundings(spec, cfg=None) -> int:
    """16-bit roundings in each weight ``p * s`` of the default mode's ``p @ v``: three where the
    kernel forms it in 16 bits (p, the value scale and their product; `decode.p16_weights`), else
    one (``p * s`` formed in f32, rounded once)."""
    return 3 if decode.p16_weights(spec, cfg or decode.Config(64, 1)) else 1


def _q_delta(spec, cache, qg, scale, cfg) -> float:
    """The logit error of the int8 rounding of q this spec and config run (0 when they do not)."""
    cfg = cfg or decode.Config(64, 1)
    qk, terms = decode.qk_int8_choice(spec, decode.make_layout(spec.k, qg.shape[-1], cfg.unpack), cfg)
    return _q_int8_delta(qg, _key_ints(cache), scale, terms) if qk else 0.0


def _key_ints(cache):
    """The keys' stored integers, centred as the int8 dot reads them (`decode.int8_key_map`), times
    their scales, ``f32[B, H, S, D]``: what q's rounding error multiplies in the int8 dot."""
    t = cache.spec.k
    center = decode.int8_key_map(t.bits, t.symmetric)[1]
    zero = None if not center else -center * cache.k_scale.astype(jnp.float32)
    return kvq.quant.dequantize(kvq.quant.Quantized(cache.k, cache.k_scale, zero), t)


@pytest.mark.parametrize("name", ["int4", "k8v4", "int2-kivi", "fp8"])
def test_value_tiles_dequantized_in_registers_stay_within_the_bound(name):
    """Config.v_dequant: value tiles scaled in registers (rounded to 16 bits once more)."""
    spec, cache, q = _case(name, FORMATS[name], 4, 128, 1, seed=zlib.crc32(f"vd{name}".encode()))
    qg, qpos, scale = _body_inputs(spec, cache, q)
    o_ref, _ = ref_attention(qg, cache, qpos, scale)
    k_hat, v_hat = ref_dequantize(cache)
    base = decode.choose_config(cache, 16)
    cfg = decode.Config(base.block_k, base.num_splits, v_dequant=True)
    o, _ = kernel(qg, cache, qpos, scale, interpret=True, config=cfg)
    err = float(jnp.max(jnp.abs(o - o_ref)))
    assert 0 < err <= _fast_bound(qg, k_hat, scale, float(jnp.max(jnp.abs(v_hat))),
                                  q_delta=_q_delta(spec, cache, qg, scale, cfg))


@pytest.mark.parametrize("name", ["int8", "int4-kivi", "k8v4"])
def test_attend_pallas_equals_xla_with_all_segments(name):
    """Through kvq.attend: sinks and residual merged by log-sum-exp around the kernel."""
    spec_str = FORMATS[name] if name != "int8" else "k=int8,v=int8,sinks=4,res=16"
    spec, cache, q = _case(name, spec_str, 4, 64, 4, seed=11)
    want = kvq.attend(q, cache, impl="xla")
    got = kvq.attend(q, cache, impl="pallas", precise=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5 * 4, rtol=0)


def test_split_count_does_not_change_the_result():
    spec, cache, q = _case("int8", "int8", 4, 64, 1, seed=3)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    outs = [kernel(qg, cache, qpos, scale, interpret=True, precise=True,
                   config=decode.Config(64, ns))[0] for ns in (1, 3, 8)]
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("unpack", ["join", "split"])
@pytest.mark.parametrize("name,shape", [("int4", (4, 128, 1)), ("int8", (3, 64, 4)), ("int4-kivi", (1, 128, 4)),
                                        ("int2", (8, 64, 1)), ("int8-g32-asym", (4, 128, 1))])
def test_every_unpacking_matches_reference(name, shape, unpack):
    """Natural chunks (join) and byte-shift pieces (split) read the same data."""
    G, D, T = shape
    spec, cache, q = _case(name, FORMATS[name], G, D, T, seed=zlib.crc32(f"{name}{unpack}".encode()))
    qg, qpos, scale = _body_inputs(spec, cache, q)
    o_ref, _ = ref_attention(qg, cache, qpos, scale)
    vmax = float(jnp.max(jnp.abs(ref_dequantize(cache)[1])))
    base = decode.choose_config(cache, 16)
    cfg = decode.Config(base.block_k, base.num_splits, unpack=unpack)
    o, _ = kernel(qg, cache, qpos, scale, interpret=True, precise=True, config=cfg)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=0, atol=5e-5 * vmax)


@pytest.mark.parametrize("name,shape", [("int8", (4, 128, 1)), ("int8-g32-asym", (3, 64, 4)), ("fp8-sinks", (8, 64, 1)),
                                        ("int4", (1, 128, 4)), ("int4-tok-asym", (4, 64, 1)), ("int2-kivi", (3, 128, 1)),
                                        ("k8v4", (8, 64, 4)), ("int4-rot", (4, 256, 1))])
def test_bytes_unpacking_matches_reference(name, shape):
    """Config.unpack="bytes": tiles read from the stored bytes (8-bit as stored, packed by bit
    plane) and converted by astype."""
    _check_kernel(name, shape, f"{name}bytes",
                  config=lambda c: dataclasses.replace(decode.choose_config(c, 16), unpack="bytes"))


def test_asm_unpacking_in_interpret_mode_reads_like_bytes():
    """Without PTX (interpret mode) "asm" computes the values of "bytes" with jnp ops."""
    for name in ("int4", "int8-g32-asym"):
        spec, cache, q = _case(name, FORMATS[name], 4, 64, 1, seed=7)
        qg, qpos, scale = _body_inputs(spec, cache, q)
        out = [kernel(qg, cache, qpos, scale, interpret=True, config=dataclasses.replace(
            decode.choose_config(cache, 16), unpack=u))[0] for u in ("bytes", "asm")]
        np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[1]))


@pytest.mark.parametrize("unpack", ["bytes", "asm"])
def test_stored_byte_unpackings_lower_for_cuda(unpack):
    for fmt in ("int8", "fp8", "k=int8:g32:asym,v=int8:g32:asym", "int4", "int4-kivi", "int2"):
        cache = kvq.init_cache(fmt, 2, 512, 2, 128)
        q = jnp.zeros((2, 1, 8, 128), jnp.bfloat16)
        cfgs = [decode.Config(64, 4, unpack=unpack)]
        if fmt in ("int8", "int4", "int2"):  # the int8 q·k dot, q in one and in two int8 terms
            cfgs += [decode.Config(64, 4, unpack=unpack, qk_int8=True, qk_terms=t) for t in (1, 2)]
        for cfg in cfgs:
            f = jax.jit(lambda q, c, cfg=cfg: kvq.attend(q, c, impl="pallas", interpret=False, config=cfg))
            text = f.trace(q, cache).lower(lowering_platforms=("cuda",)).as_text()
            assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text), (fmt, cfg)


def _exec_ptx(asm: str, reg: dict, fdt=np.float16) -> dict:
    """Evaluate the few PTX instructions `decode.asm_text` and `decode.asm_int8_text` emit;
    ``reg`` maps register names to 32-bit inputs, and gets the results."""

    def val(tok):
        return reg[tok] if tok in reg else int(tok, 0)

    def halves(x):
        return np.array([x & 0xFFFF, x >> 16], np.uint16).view(fdt).astype(np.float64)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "shr.b32":
            reg[d] = src[0] >> src[1]
        elif op == "shl.b32":
            reg[d] = (src[0] << src[1]) & 0xFFFFFFFF
        elif op == "mov.b32":
            reg[d] = src[0]
        elif op == "prmt.b32":  # bytes of {b, a}; selector nibble k picks result byte k
            pool = [(src[0] >> 8 * i) & 0xFF for i in range(4)] + [(src[1] >> 8 * i) & 0xFF for i in range(4)]
            reg[d] = sum(pool[(src[2] >> 4 * k) & 0x7] << 8 * k for k in range(4))
        elif op == "lop3.b32":  # bitwise function given by its truth table on (0xF0, 0xCC, 0xAA)
            a, b, c, lut = src
            reg[d] = sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i
                         for i in range(32))
        elif op.startswith("fma.rn."):
            r = halves(src[0]) * halves(src[1]) + halves(src[2])  # exact here: small integers
            h = r.astype(fdt).view(np.uint16).astype(np.uint32)
            reg[d] = int(h[0]) | int(h[1]) << 16
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return reg


def _run_ptx(asm: str, word: int, dtype) -> list:
    """`decode.asm_text`'s PTX on one 32-bit input ``$2``: the four 16-bit floats of ``$0`` and
    ``$1`` (low half first)."""
    fdt = np.float16 if dtype == jnp.float16 else jnp.bfloat16
    reg = _exec_ptx(asm, {"$2": word}, fdt)
    return [float(x) for r in ("$0", "$1") for x in np.array([reg[r] & 0xFFFF, reg[r] >> 16], np.uint16).view(fdt)]


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False), (2, True), (2, False)])
def test_asm_conversion_gives_every_field_value(bits, signed):
    """The inline PTX of Config.unpack="asm", evaluated instruction by instruction, turns
    every byte into the value of each of its fields (two's complement when signed)."""
    mask = (1 << bits) - 1
    rng = np.random.default_rng(bits * 2 + signed)
    for dtype in (jnp.float16, jnp.bfloat16) if bits <= 4 else (jnp.float16,):
        for c in range(8 // bits):
            asm = decode.asm_text(bits, signed, c, dtype)
            data = rng.permutation(256).astype(np.uint8)  # every byte once, in random groups of 4
            for i in range(0, 256, 4):
                word = int(data[i:i + 4].view(np.uint32)[0])
                field = (data[i:i + 4].astype(np.int64) >> bits * c) & mask
                want = np.where(signed & (field >> (bits - 1) == 1), field - (1 << bits), field)
                assert _run_ptx(asm, word, dtype) == want.tolist(), (bits, signed, c, dtype, data[i:i + 4])
    if bits == 8:
        with pytest.raises(ValueError, match="bits"):
            decode.asm_text(8, signed, 0, jnp.bfloat16)


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (2, True), (2, False)])
def test_asm_pair_conversion_gives_every_field_value(bits, signed):
    """The inline PTX of value tiles stored in pairs (`asm_text` with ``pair``, two 16-bit words in
    one 32-bit input), evaluated instruction by instruction: ``pair`` 0 gives the field of the
    words' low bytes (bytes 0, 2), ``pair`` 1 of their high bytes (1, 3), for every byte."""
    mask = (1 << bits) - 1
    rng = np.random.default_rng(bits * 2 + signed + 100)
    for dtype in (jnp.float16, jnp.bfloat16):
        fdt = np.float16 if dtype == jnp.float16 else jnp.bfloat16
        for c in range(8 // bits):
            for h in (0, 1):
                asm = decode.asm_text(bits, signed, c, dtype, pair=h)
                data = rng.permutation(256).astype(np.uint8)
                for i in range(0, 256, 4):
                    out = _exec_ptx(asm, {"$1": int(data[i:i + 4].view(np.uint32)[0])}, fdt)["$0"]
                    got = np.array([out & 0xFFFF, out >> 16], np.uint16).view(fdt).astype(np.float64)
                    field = (data[i + h:i + 4:2].astype(np.int64) >> bits * c) & mask
                    want = np.where(signed & (field >> (bits - 1) == 1), field - (1 << bits), field)
                    assert got.tolist() == want.tolist(), (bits, signed, c, h, dtype, data[i:i + 4])


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False), (2, True), (2, False)])
def test_int8_key_tiles_give_every_field_value(bits, signed):
    """The int8 key tiles of Config.qk_int8 (`asm_int8_text`'s PTX evaluated instruction by
    instruction, and the interpret-mode jnp path) hold ``scale * (k - center)`` (`int8_key_map`)
    for every field value k of every byte: centred, and within int8."""
    scale, center = decode.int8_key_map(bits, signed)
    assert center == (0 if signed else 1 << (bits - 1)) and scale == 1 << (8 - bits)
    lay = types.SimpleNamespace(bits=bits, signed=signed)
    data = np.arange(256, dtype=np.uint8)
    for c in range(8 // bits):
        f = (data >> (bits * c)) & ((1 << bits) - 1)
        k = f.astype(np.int64) - ((f >= (1 << (bits - 1))) << bits if signed else 0)  # two's complement
        want = scale * (k - center)
        assert want.min() == -128 and want.max() == 128 - scale  # centred, the int8 range's bottom used
        stored = data.view(np.int8) if bits == 8 and signed else data  # int8 is stored as int8
        tile = decode._int8_tile(jnp.asarray(stored.reshape(64, 4)), lay, c, interpret=True)
        assert tile.dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(tile).reshape(-1).astype(np.int64), want)
        if bits == 8 and signed:
            continue  # int8 enters the dot as stored: no PTX
        asm = decode.asm_int8_text(bits, c, signed)
        for i in range(0, 256, 4):
            word = int(data[i:i + 4].view(np.uint32)[0])
            got = np.array([_exec_ptx(asm, {"$1": word})["$0"]], np.uint32).view(np.int8).astype(np.int64)
            np.testing.assert_array_equal(got, want[i:i + 4], err_msg=f"{bits} {signed} {c} {data[i:i + 4]}")


def _q_int8_delta(qg, k_int, scale, terms=1):
    """Logit error of rounding q to int8 per row (one scale for the row): each element of q moves by
    at most max|q_row| / 254 (one term), max|q_row| / (127 * 508) (two terms), so a logit by
    that times scale * sum_d |k_d| over the scaled key integers ``k_int`` (`_key_ints`)."""
    qmax = jnp.max(jnp.abs(qg), axis=-1)  # [B, T, H, G]
    ksum = jnp.sum(jnp.abs(k_int), axis=-1)  # [B, H, S]
    return float(scale * jnp.max(qmax[..., None] * ksum[:, None, :, None, :]) / (254 if terms == 1 else 127 * 508))


@pytest.mark.parametrize("shape", [(4, 128, 1), (3, 64, 4), (8, 256, 1)], ids=lambda s: f"G{s[0]}-D{s[1]}-T{s[2]}")
@pytest.mark.parametrize("name", ["int8", "int8-g32-asym", "int4", "int4-tok-asym", "int2"])  # every key field kind
def test_int8_qk_dot_stays_within_its_bound(name, shape):
    """Config.qk_int8: q rounded to int8 per row, q·k an int8 dot on the stored
    key integers. Held to the default mode's bound with the q rounding term added; it must
    differ from the 16-bit path (the int8 dot really ran), and precise mode ignores it."""
    G, D, T = shape
    spec, cache, q = _case(name, FORMATS[name], G, D, T, seed=zlib.crc32(f"qk{name}{shape}".encode()))
    qg, qpos, scale = _body_inputs(spec, cache, q)
    base = decode.choose_config(cache, G * T)
    if not decode.qk_int8_supported(spec, decode.make_layout(spec.k, D, base.unpack)):
        assert name == "int2" and D == 64  # 16-column chunks: below the int8 MMA's K of 32
        with pytest.raises(ValueError, match="qk_int8"):
            kernel(qg, cache, qpos, scale, interpret=True,
                   config=dataclasses.replace(base, qk_int8=True))
        return
    o_ref, lse_ref = ref_attention(qg, cache, qpos, scale)
    k_hat, v_hat = ref_dequantize(cache)
    vmax = float(jnp.max(jnp.abs(v_hat)))
    o16, lse16 = kernel(qg, cache, qpos, scale, interpret=True,
                        config=dataclasses.replace(base, qk_int8=False))
    k_int = _key_ints(cache)
    # both term counts: lse depends on the logits alone (m and l stay f32), so it is held to
    # the int8 rounding of q, plus f32 rounding; two terms beat the 16-bit path's fp16 q
    finite = np.isfinite(np.asarray(lse_ref))
    lse_err = {}
    for terms in (1, 2):
        o_t, lse_t = kernel(qg, cache, qpos, scale, interpret=True,
                            config=dataclasses.replace(base, qk_int8=True, qk_terms=terms))
        lse_err[terms] = float(np.max(np.abs(np.asarray(lse_t - lse_ref)[finite])))
        delta = _q_int8_delta(qg, k_int, scale, terms)
        assert lse_err[terms] <= delta + 1e-5, (terms, lse_err[terms], delta)
        assert float(jnp.max(jnp.abs(o_t - o_ref))) <= _fast_bound(qg, k_hat, scale, vmax, q_delta=delta,
                                                                   p_roundings=_p_roundings(spec, base))
        assert not np.array_equal(np.asarray(o_t), np.asarray(o16))
    assert lse_err[2] < lse_err[1] / 4, lse_err
    assert lse_err[2] < float(np.max(np.abs(np.asarray(lse16 - lse_ref)[finite]))), lse_err
    op, lp = kernel(qg, cache, qpos, scale, interpret=True, precise=True,
                    config=dataclasses.replace(base, qk_int8=True))
    np.testing.assert_allclose(np.asarray(op), np.asarray(o_ref), rtol=0, atol=5e-5 * vmax)


@pytest.mark.parametrize("name,unpack", [("fp8", "auto"), ("int4-kivi", "auto"), ("bf16", "auto"),
                                         ("kbf16-v4", "auto"), ("int8", "join"), ("int4", "split")])
def test_int8_qk_dot_on_other_keys_is_a_clear_error(name, unpack):
    """Keys the int8 dot cannot read (fp8, per-channel, bf16; the 32-bit word views) are not
    given it by default, and asking for it is an error naming the setting."""
    spec, cache, q = _case(name, FORMATS[name], 4, 128, 1, seed=3)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    cfg = dataclasses.replace(decode.choose_config(cache, 4), unpack=unpack)
    assert not decode.default_qk_int8(spec, decode.make_layout(spec.k, 128, unpack))
    with pytest.raises(ValueError, match="config: qk_int8 needs integer keys with per-token scales"):
        kernel(qg, cache, qpos, scale, interpret=True, config=dataclasses.replace(cfg, qk_int8=True))


@pytest.mark.parametrize("block_k", [64, 128])
def test_per_channel_keys_with_several_token_groups_per_block(block_k):
    """KIVI keys: one dot per token group of a block (the default block is one group of 32)."""
    spec, cache, q = _case("int4-kivi", FORMATS["int4-kivi"], 4, 128, 1, seed=block_k)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    o_ref, _ = ref_attention(qg, cache, qpos, scale)
    vmax = float(jnp.max(jnp.abs(ref_dequantize(cache)[1])))
    o, _ = kernel(qg, cache, qpos, scale, interpret=True, precise=True,
                  config=decode.Config(block_k, 2))
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=0, atol=5e-5 * vmax)
    with pytest.raises(ValueError, match="token_group"):
        kernel(qg, cache, qpos, scale, interpret=True, config=decode.Config(16, 2))


def test_natural_chunks_follow_scale_groups():
    spec = kvq.KVSpec.parse("int4")  # groups of 32: four chunks of 32 contiguous channels
    lay = decode.make_layout(spec.k, 128, "join")
    assert lay.identity and [pc.width for pc in lay.pieces] == [32] * 4
    assert [pc.segs for pc in lay.pieces] == [((g, 0, 32),) for g in range(4)]
    for name in ("int8", "fp8", "int4", "int2", "int4-kivi"):
        assert decode.auto_unpack(kvq.KVSpec.parse(name).k) == "asm"
    assert [decode.default_v_dequant(kvq.KVSpec.parse(n)) for n in ("bf16", "int8", "int4", "k8v4", "int2", "int4-kivi")] \
        == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="unpack"):
        decode.Config(64, 1, unpack="shuffle")
    with pytest.raises(ValueError, match="qk_terms: expected None, 1 or 2"):
        decode.Config(64, 1, qk_terms=3)
    assert [decode.default_qk_terms(decode.make_layout(kvq.KVSpec.parse(n).k, 128)) for n in ("int8", "int4", "int2")] \
        == [2, 1, 1]


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["spec"],
                   data_fields=["lengths", "k", "v", "k_scale", "k_zero", "v_scale", "v_zero"])
@dataclasses.dataclass(frozen=True)
class Pools:
    """What the kernel reads of a paged cache (not a PagedKVCache: any such object will do)."""
    spec: kvq.KVSpec
    lengths: jax.Array
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    k_zero: jax.Array | None
    v_scale: jax.Array | None
    v_zero: jax.Array | None


def _paged(cache, page_size, rng):
    """The body of a contiguous cache moved into a pool of pages in scrambled order (+ 3 spare pages)."""
    B, H, S = cache.k.shape[:3]
    npg = S // page_size
    P = B * npg + 3
    order = rng.permutation(P)[: B * npg]

    def pool(x):
        if x is None:
            return None
        rows = x.shape[2] // npg  # tokens (or token groups) per page
        pages = x.reshape(B, H, npg, rows, *x.shape[3:]).transpose(0, 2, 1, 3, *range(4, x.ndim + 1))
        pages = pages.reshape(B * npg, H, rows, *x.shape[3:])
        out = jnp.asarray(rng.standard_normal((P, *pages.shape[1:])) * 7).astype(x.dtype)  # junk in spare pages
        return out.at[order].set(pages)

    fields = {n: pool(getattr(cache, n)) for n in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")}
    paged = Pools(spec=cache.spec, lengths=cache.lengths, **fields)
    return paged, jnp.asarray(order.reshape(B, npg), jnp.int32)


@pytest.mark.parametrize("name", ["bf16", "fp8", "int8", "int4", "int4-kivi", "int2-kivi", "k8v4", "fp8-sinks"])
def test_paged_body_equals_contiguous(name):
    """Reading through a page table gives the contiguous kernel's result on the same data."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    spec, cache, q = _case(name, FORMATS[name], 4, 64, 4, seed=zlib.crc32(name.encode()))
    qg, qpos, scale = _body_inputs(spec, cache, q)
    paged, table = _paged(cache, 64, rng)
    cfg = decode.Config(64, 2)  # the same blocks both ways (the default for the contiguous cache may be wider)
    want, lse_want = kernel(qg, cache, qpos, scale, interpret=True, precise=True, config=cfg)
    got, lse = kernel(qg, paged, qpos, scale, interpret=True, precise=True, page_table=table,
                      config=cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,heads", [("int4", 2), ("int4", 4), ("int8", 2), ("int8", 4), ("k8v4", 2),
                                        ("bf16", 2), ("int4-kivi", 2), ("int4-tok-asym", 2), ("fp8-sinks", 2),
                                        ("int2", 2)])
def test_several_heads_per_program_give_each_head_its_own_result(name, heads):
    """Config.heads: KV heads sharing a program (their query rows stacked in one tile, each dot on
    one head's rows) match the reference as one head per program does (precise mode to f32
    rounding, the default mode within its bound) and give one head per program's result to f32
    rounding, contiguous and through pages."""
    shape, key = (4, 64, 1), f"heads{name}"
    H = 4

    def cfg(c, hp):
        return dataclasses.replace(decode.choose_config(c, 4), heads=hp)

    o1, lse1, f1 = _check_kernel(name, shape, key, config=lambda c: cfg(c, 1), H=H)
    o, lse, f = _check_kernel(name, shape, key, config=lambda c: cfg(c, heads), H=H)
    vmax = float(jnp.max(jnp.abs(o1))) + 1.0
    for got, want in ((o, o1), (lse, lse1), (f, f1)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * vmax)
    spec, cache, q = _case(name, FORMATS[name], *shape, seed=zlib.crc32(key.encode()), H=H)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    paged, table = _paged(cache, 64, np.random.default_rng(1))
    c = dataclasses.replace(cfg(cache, heads), block_k=min(64, cfg(cache, heads).block_k))
    got, _ = kernel(qg, paged, qpos, scale, interpret=True, page_table=table, config=c)
    want, _ = kernel(qg, cache, qpos, scale, interpret=True, config=c)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * vmax)


def test_heads_per_program_default_and_errors():
    """`decode.default_heads`: two KV heads per program for int4's one-warp decode programs and for
    int8's when two heads' rows fit one 16-row tile, else one (the splits count the programs
    launched); a count that does not divide the KV heads, or rows
    that overflow the row tile, is an error naming ``heads``."""
    names = ("int4", "int4-rot", "int8", "k8v4", "bf16", "int4-kivi", "int2", "k=int8:g32:asym,v=int8:g32:asym")
    spec = {n: kvq.KVSpec.parse(n) for n in names}
    assert [decode.default_heads(spec[n], 4, 8) for n in spec] == [2, 2, 2, 1, 1, 1, 1, 1]
    assert decode.default_heads(spec["int4"], 12, 8) == 1  # 24 rows: more than one tile
    assert decode.default_heads(spec["int4"], 4, 3) == 1  # an odd head count
    _, cache, q = _case("int4", "int4", 3, 64, 4, seed=3)
    qg, qpos, scale = _body_inputs(spec["int4"], cache, q)
    assert decode.choose_config(cache, 4).heads == 2 and decode.choose_config(cache, 12).heads == 1
    # the splits: int4's two-head one-warp programs, one wave of 8 per SM; int8's 4-warp ones, 4 per SM
    assert [decode._default_config(spec[n], 128, 4, 32768, kv_heads=8).num_splits for n in ("int4", "int8")] == [16, 16]
    assert [decode._default_config(spec["int4"], 8 * b, 4, s, kv_heads=8).num_splits
            for b, s in ((8, 32768), (32, 32768), (1, 131072))] == [32, 8, 256]
    assert decode._default_config(spec["k8v4"], 128, 4, 32768, kv_heads=8).num_splits == 16  # one head: 12 per SM
    with pytest.raises(ValueError, match="heads 4 must divide the 2 KV heads"):
        kernel(qg, cache, qpos, scale, interpret=True, config=decode.Config(32, 1, heads=4))
    with pytest.raises(ValueError, match="heads 2 x 12 query rows exceed row_tile 16"):
        kernel(qg, cache, qpos, scale, interpret=True, config=decode.Config(32, 1, heads=2, row_tile=16))
    with pytest.raises(ValueError, match="heads: expected a positive"):
        decode.Config(32, 1, heads=0)


def test_default_block_k_fits_pages_and_rows():
    """The default config: one-warp decode programs for sub-byte values (32-token blocks, a token
    group for per-channel keys), 128-token blocks for other sub-byte per-token keys in decode, 64
    for wider keys and for prefill row tiles, a token group for per-channel keys, never more than
    a page holds (two warps where pages hold 4-warp decode programs to <= 32 tokens); and a small
    page with the default config reads as the contiguous cache does."""
    spec = {n: kvq.KVSpec.parse(n) for n in ("int4", "int2", "int8", "k8v4", "int4-kivi", "k=int4,v=int8")}
    cfgs = [decode._choose(spec[n], 128, 32768) for n in spec]
    assert [c.block_k for c in cfgs] == [32, 32, 64, 32, 32, 128]
    assert [c.num_warps for c in cfgs] == [1, 1, 4, 1, 1, 4]
    assert [c.num_splits for c in cfgs] == [16, 16, 8, 16, 16, 8]
    # decode programs of several warps hold at most SPLIT_TOKENS tokens per split (B = 32, 64 at
    # 32K: 8 splits, not the 4 / 2 that filling the SMs alone gives); one-warp programs fill the SMs
    more = [(n, programs, decode._choose(spec[n], programs, 32768).num_splits)
            for n in ("int8", "int4") for programs in (256, 512)]
    assert more == [("int8", 256, 8), ("int8", 512, 8), ("int4", 256, 8), ("int4", 512, 4)]
    assert decode._choose(spec["int8"], 256, 32768, row_tile=64).num_splits == 4  # prefill row tiles: as before
    prefill = decode._choose(spec["int4"], 128, 32768, row_tile=64)
    assert (prefill.block_k, prefill.num_warps) == (64, 4)
    assert decode._choose(spec["int4"], 128, 32768, page_size=48).block_k == 16
    # pages under the block: two warps for the 4-warp formats' decode programs, not for prefill
    small = [decode._choose(spec[n], 128, 32768, page_size=ps) for n, ps in (("int8", 16), ("int8", 32),
                                                                              ("int4", 16), ("int8", 64))]
    assert [(c.block_k, c.num_warps, c.num_splits) for c in small] == [(16, 2, 8), (32, 2, 8), (16, 1, 16),
                                                                        (64, 4, 8)]
    assert decode._choose(spec["int8"], 128, 32768, page_size=16, row_tile=64).num_warps == 4
    sp, cache, q = _case("int4", "int4", 4, 64, 1, seed=5)
    qg, qpos, scale = _body_inputs(sp, cache, q)
    paged, table = _paged(cache, 16, np.random.default_rng(5))
    want, _ = kernel(qg, cache, qpos, scale, interpret=True, precise=True)  # 64-token blocks
    got, _ = kernel(qg, paged, qpos, scale, interpret=True, precise=True, page_table=table)  # 16
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_k,splits,split_pages_max", [(32, 3, 128), (32, 1, 128), (64, 5, 128), (32, 3, 0)])
def test_paged_splits_inside_pages(block_k, splits, split_pages_max, monkeypatch):
    """Several blocks per page, split boundaries inside pages: each split's page ids held in
    registers (`decode.SPLIT_PAGES_MAX`), or read per block when beyond it, give the contiguous result."""
    monkeypatch.setattr(decode, "SPLIT_PAGES_MAX", split_pages_max)
    rng = np.random.default_rng(block_k * splits)
    spec, cache, q = _case("int4", "int4", 4, 64, 1, seed=block_k + splits)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    paged, table = _paged(cache, 128, rng)
    cfg = decode.Config(block_k, splits)
    want, lse_want = decode.body_attention(qg, cache, qpos, scale, interpret=True, config=cfg)
    got, lse = decode.body_attention(qg, paged, qpos, scale, interpret=True, page_table=table, config=cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_want), rtol=0, atol=1e-6)


def _values_tokens_minor(name, tag):
    """A case of preset ``name`` (seeded by ``tag``): ``(spec, cache, (qg, qpos, scale), page table,
    the cache with values tokens-minor, its pages with values tokens-minor)``."""
    seed = zlib.crc32(f"{tag}{name}".encode())
    spec, cache, q = _case(name, FORMATS[name], 4, 128, 1, seed=seed)
    paged, table = _paged(cache, 128, np.random.default_rng(seed))
    minor = dataclasses.replace(cache, v=jnp.swapaxes(cache.v, -1, -2))
    paged_minor = dataclasses.replace(paged, v=jnp.swapaxes(paged.v, -1, -2))
    return spec, cache, _body_inputs(spec, cache, q), table, minor, paged_minor


@pytest.mark.parametrize("name", ["bf16", "fp8", "int8", "int4", "k8v4", "int4-kivi"])
def test_values_stored_tokens_minor_give_the_same_result(name):
    """``v_token_minor``: the same values stored [Dp, tokens] (contiguous and paged) give
    the token-major result bit for bit, in both modes."""
    spec, cache, (qg, qpos, scale), table, minor, paged_minor = _values_tokens_minor(name, "vt")
    for precise in (False, True):
        want, lse_want = kernel(qg, cache, qpos, scale, interpret=True, precise=precise)
        for c, kw in ((minor, {}), (paged_minor, dict(page_table=table))):
            got, lse = kernel(qg, c, qpos, scale, interpret=True, precise=precise, v_token_minor=True, **kw)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_want))
    with pytest.raises(ValueError, match="v_token_minor: expected cache.v"):
        kernel(qg, cache, qpos, scale, interpret=True, v_token_minor=True)
    if spec.v.quantized:
        with pytest.raises(ValueError, match="v_token_minor: needs values read as stored"):
            kernel(qg, minor, qpos, scale, interpret=True, v_token_minor=True,
                   config=dataclasses.replace(decode.choose_config(cache, 4), unpack="join"))


def _in_pairs(v):
    """Values stored tokens-minor ``[..., Dp, n]`` -> the same values with the token axis in pairs (`pair_slot`)."""
    n = v.shape[-1]
    return jnp.zeros_like(v).at[..., kvq.quant.pair_slot(np.arange(n))].set(v)


def test_pair_slots_interleave_each_16_tokens():
    t = np.arange(64)
    slots = kvq.quant.pair_slot(t)
    assert sorted(slots.tolist()) == t.tolist()  # a permutation, within each 16 tokens
    assert np.all(slots // 16 == t // 16)
    words = slots // 2  # tokens j and j + 8 of a group share a 16-bit word: j low, j + 8 high
    assert np.all(words[t % 16 < 8] == words[t % 16 >= 8]) and np.all(slots[t % 16 < 8] % 2 == 0)
    lo, hi = decode.pair_split(jnp.asarray(t)[None])
    assert lo.tolist() == [t[slots % 2 == 0][np.argsort(slots[slots % 2 == 0])].tolist()]
    assert hi.tolist() == [t[slots % 2 == 1][np.argsort(slots[slots % 2 == 1])].tolist()]


@pytest.mark.parametrize("name", ["int4", "int4-tok-asym", "int2", "k8v4", "int4-kivi"])
def test_values_stored_in_pairs_give_the_same_result(name):
    """``v_pairs``: sub-byte values stored tokens-minor with the tokens in pairs (contiguous and
    paged) give the tokens-minor result within f32 rounding (each block's ``p @ v`` is two dots
    over its halves, summed in another order: up to 6.5e-6 where int2's large scaled values
    cancel), in both modes; the layout is refused where it cannot be read."""
    spec, cache, (qg, qpos, scale), table, minor, paged_minor = _values_tokens_minor(name, "vp")
    pairs = dataclasses.replace(minor, v=_in_pairs(minor.v))
    paged_pairs = dataclasses.replace(paged_minor, v=_in_pairs(paged_minor.v))
    for precise in (False, True):
        want, lse_want = kernel(qg, minor, qpos, scale, interpret=True, precise=precise, v_token_minor=True)
        for c, kw in ((pairs, {}), (paged_pairs, dict(page_table=table))):
            got, lse = kernel(qg, c, qpos, scale, interpret=True, precise=precise, v_token_minor=True,
                              v_pairs=True, **kw)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_want), rtol=0, atol=1e-6)
            if not kw:  # and the layout matters: the same bytes read as plain tokens-minor differ
                other, _ = kernel(qg, c, qpos, scale, interpret=True, precise=precise, v_token_minor=True)
                assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-2
    with pytest.raises(ValueError, match="v_pairs: needs sub-byte integer values stored tokens-minor"):
        kernel(qg, cache, qpos, scale, interpret=True, v_pairs=True)


def test_pairs_refused_for_8_bit_values():
    spec, cache, q = _case("int8", "int8", 4, 64, 1, seed=3)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    minor = dataclasses.replace(cache, v=jnp.swapaxes(cache.v, -1, -2))
    with pytest.raises(ValueError, match="v_pairs: needs sub-byte integer values"):
        kernel(qg, minor, qpos, scale, interpret=True, v_token_minor=True, v_pairs=True)


def test_paged_kernel_lowers_for_cuda_and_checks_its_table():
    rng = np.random.default_rng(0)
    spec, cache, q = _case("int4", "int4", 4, 128, 1, seed=5)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    paged, table = _paged(cache, 128, rng)
    f = jax.jit(lambda qg, t: kernel(qg, paged, qpos, scale, interpret=False, page_table=t))
    text = f.trace(qg, table).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text)
    with pytest.raises(ValueError, match="page_table"):
        kernel(qg, paged, qpos, scale, interpret=True, page_table=table[:1])
    with pytest.raises(ValueError, match="page size"):
        kernel(qg, paged, qpos, scale, interpret=True, page_table=table,
               config=decode.Config(256, 1))


def test_overflowed_sequence_gives_nan_rows_only():
    spec = kvq.KVSpec.parse("int8")
    cache = kvq.init_cache(spec, 2, 64, 1, 64)
    k = jax.random.normal(jax.random.key(0), (2, 40, 1, 64))
    step = jax.jit(kvq.append)
    cache = step(cache, k, k)
    cache = step(cache, k, k, jnp.array([1, 30]))  # sequence 1 overflows (70 > 64)
    out = kvq.attend(jax.random.normal(jax.random.key(1), (2, 1, 4, 64)), cache, impl="pallas")
    assert bool(jnp.all(jnp.isfinite(out[0]))) and bool(jnp.all(jnp.isnan(out[1])))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_compiled_path_lowers_for_cuda_with_the_triton_call(name):
    spec = kvq.KVSpec.parse(FORMATS[name])
    cache = kvq.init_cache(spec, 2, 512, 2, 128)
    q = jnp.zeros((2, 2, 8, 128), jnp.bfloat16)
    f = jax.jit(lambda q, c: kvq.attend(q, c, impl="pallas", interpret=False))
    text = f.trace(q, cache).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text), "no Triton call in the lowered module"


def test_unsupported_layout_is_a_clear_error():
    spec = kvq.KVSpec.parse("k=int4:g8,v=int4:g8")
    cache = kvq.init_cache(spec, 1, 64, 1, 64)
    with pytest.raises(NotImplementedError, match="group"):
        decode.make_layout(spec.k, 64)
    del cache


def test_one_warp_programs_take_exponentials_as_powers_of_two():
    """`decode.fast_exp`: one-warp programs take exp(x) as 2**(x * log2 e) (`decode._exp2`), others
    jnp.exp; the two give the same attention to f32 rounding (precise mode) on fresh data."""
    assert decode.fast_exp(decode.Config(32, 2, num_warps=1))
    assert not decode.fast_exp(decode.Config(64, 2, num_warps=4))
    x = jax.random.normal(jax.random.key(3), (16, 32), jnp.float32) * 4  # |x| < 20: x * log2(e) rounds to 2**-19 absolute
    np.testing.assert_allclose(np.asarray(decode._exp2(x * decode.LOG2E, True)), np.asarray(jnp.exp(x)), rtol=2e-6)
    spec, cache, q = _case("int4", FORMATS["int4"], 2, 128, 1, seed=11, H=2)
    qg, qpos, scale = _body_inputs(spec, cache, q)
    out = [kernel(qg, cache, qpos, scale, interpret=True, precise=True, config=decode.Config(32, 2, num_warps=w))
           for w in (1, 4)]
    for a, b in zip(*out):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)
