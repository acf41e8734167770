"""Fused-dequant split-K decode attention over the quantized KV cache body.

One program per (sequence b, KV head h, split j) streams its share of the body
``[S, Dp]`` of that head once, in packed form, and computes all ``G * T`` query
rows of the head against it (padded to at least 16 rows for the tensor-core
dot). With ``Config.heads`` > 1 a program serves that many KV heads: their rows are
stacked in one tile, each head's dots take the tile with the other heads' rows zeroed,
and the softmax and accumulators are shared (`default_heads`: int4 and int8 decode,
where G = 4 rows would leave 12 of 16 rows padding). Beyond ``Config.row_tile`` rows
(a prefill chunk) the rows are split into tiles of that many, one program each, each
stopping at its own causal limit.
Partials ``(o, m, l)`` stay f32 and are merged across splits by log-sum-exp in XLA.

Reading packed data (``Config.unpack``), three tilings of *natural chunks* (contiguous
head_dim ranges as wide as the scale group allows, so a chunk never straddles a group and
q and the output need no permutation) or *pieces*:

* ``"bytes"``: tiles are loaded as stored. 8-bit formats (int8, uint8, e4m3) are
  converted by ``astype``; packed formats take one bit plane
  ``(x >> bits * c) & mask`` of a byte tile per chunk (DESIGN.md's split packing puts
  element ``c * Dp + j`` in byte j, field c, so a plane of contiguous bytes is a
  contiguous element range). Triton can then convert the narrow tile after moving it
  into the dot-operand layout.
* ``"asm"`` (the default, `auto_unpack`): as ``"bytes"``, but integer tiles are
  converted by inline PTX (`asm_text`: four bytes per instance, two ``prmt`` spreading
  them into 16-bit lanes, ``lop3`` masking the field and adding the magic exponent, one
  ``fma`` per pair; 1.5-1.75 instructions per value, no int->float conversion unit;
  8-bit values into bf16 tiles keep Triton's own conversion). Interpret mode (no PTX)
  computes the same values with jnp ops.
* ``"join"``: the body viewed as uint32 words (a free bitcast); the four bytes of each
  word are shifted out, converted with the magic-number trick (`_to_float`) and
  interleaved back into head_dim order with two rounds of joins.
* ``"split"`` (*pieces*): one shift of a ``[BK, wr]`` word tile per piece; column w holds
  element ``c * Dp + 4 * (w0 + w) + i``. The wrapper permutes q's head_dim into the
  pieces' column order once and un-permutes the tiny output after. Rows of fewer than 16
  words use byte-major chunks ``[BK, 4, wr]`` instead.

Keys of integer formats with per-token scales (int8, int4, int2; `qk_int8_supported`) meet
q in an int8 dot (``Config.qk_int8``; the default, `default_qk_int8`):
q is rounded to int8 once per row (``s_q = max|q| / 127``, one scale for all key chunks), the
stored key integers enter the tensor cores as int8 without any conversion (8-bit as stored;
sub-byte fields moved to the top of their byte by one ``lop3`` per four bytes after a shift,
`asm_int8_text`; unsigned codes centred, `int8_key_map`), the int32 result is exact, each
chunk's key scale multiplies it as it is summed, and ``s_q`` multiplies the block's sum once.
Each logit moves by at most ``s_q / 2 * sum|k|`` beyond the 16-bit path. With two terms
(``Config.qk_terms``, the default for 8-bit keys) q's rounding error is rounded to int8 too
and a second int8 dot adds it in int32 (``254 * q1·k + q2·k``): at most ``s_q / 508 *
sum|k|``, finer than q rounded to fp16. ``precise=True`` keeps the exact path.

Through a page table, each split's page ids are read once, before the loop, into registers
(up to `SPLIT_PAGES_MAX` pages), so no table read sits on the path of a tile's address.

Values stored tokens-minor (``v_token_minor``) and, for sub-byte values, with the tokens in pairs
(``v_pairs``, `kvq_jax.quant.pair_slot`: tokens ``j`` and ``j + 8`` of every 16 side by side, as
the serving pools hold them): a value tile is loaded as 16-bit words and each word's two bytes go
to the two halves of the block, two ``p @ v`` dots over ``p``'s columns split alike
(`pair_split`). Triton sizes a dot's operands by the narrowest load feeding them: byte tiles made
``p`` an operand of 4 consecutive tokens per register pair, shuffled out of the logits' layout
for every value scale group; 16-bit words keep it as the logits hold it.

Scales apply where cheapest:

* per-token key scales multiply a tile's logits ``q·k_int`` (zero points add
  ``sum(q_tile) * zero``);
* per-channel key scales (KIVI) multiply q, one dot per token group of the block
  (the unpacked tile is shared by the dots); zero points add ``q·zero`` per row;
* per-token value scales multiply the probabilities before ``p @ v_int`` (zero
  points add ``(p·zero)`` per row);
* a piece whose columns straddle two scale groups is dequantized in registers
  instead (``precise=True``: one exact dot per group); natural chunks never do.

Key tiles are fp16, value tiles bf16 (fp16 for 8-bit values with ``v_fp16``); dots
accumulate in f32.
``precise=True`` splits q and p into 16-bit hi + lo parts (two dots each) for
results within f32 rounding of the reference; the default rounds them once, as
flash-attention kernels do (error bound in tests/test_kernel.py). For sub-byte values whose
tiles are not scaled in registers, p is rounded to 16 bits once per block and multiplied by
each value scale group's scale in 16 bits (`p16_weights`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvq_jax.cache import KVCache, segment_lengths
from kvq_jax.kernels import _compat
from kvq_jax.kernels._compat import pl
from kvq_jax.spec import TensorSpec

NEG_INF = -1e30  # finite "minus infinity": masked logits, initial running max
NUM_SMS = 132  # H200
SPLIT_TOKENS = 4096  # `_choose`: most tokens per split of a decode program of several warps
NATURAL = -2  # Piece.i of a natural-order chunk
UNPACKS = ("auto", "join", "split", "bytes", "asm")  # Config.unpack: how stored bytes become tiles
STORED = ("bytes", "asm")  # unpackings that read the stored bytes (no 32-bit word view)
MAX_CHUNK = 128  # widest natural chunk (columns)
SPLIT_PAGES_MAX = 128  # paged: a split's page ids are held in registers up to this many pages


# -- layout of one tensor as the kernel reads it ------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """One tile the kernel unpacks per block, and the head_dim elements it holds.

    ``i >= 0`` (a *piece*): words ``[w0, w0 + wr)`` shifted by ``8 * i + bits * c``,
    a ``[BK, wr]`` tile whose column w is element ``c * Dp + 4 * (w0 + w) + i``.
    ``i == -1`` (a *chunk*, for rows of fewer than 16 words): all four bytes of the
    words, unpacked to ``[BK, 4, wr]`` and reshaped to ``[BK, 4 * wr]``, column
    ``i * wr + w`` holding element ``c * Dp + 4 * (w0 + w) + i``.
    ``i == NATURAL`` (a *natural chunk*): all four bytes interleaved back into
    head_dim order, ``[BK, wr, 4]`` reshaped to ``[BK, 4 * wr]``: column ``4 * w + i``
    holds element ``c * Dp + 4 * (w0 + w) + i``, so the chunk is the contiguous
    element range ``[c * Dp + 4 * w0, c * Dp + 4 * (w0 + wr))``.
    ``segs``: ``(group, col_lo, col_hi)`` per-token scale groups the columns fall in.
    """

    c: int
    i: int
    w0: int
    wr: int
    segs: tuple

    @property
    def width(self) -> int:
        return self.wr if self.i >= 0 else 4 * self.wr

    @property
    def natural(self) -> bool:
        return self.i == NATURAL


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the kernel reads one tensor (keys or values) of the body."""

    fmt: str
    bits: int
    signed: bool
    head_dim: int
    words: int  # uint32 words per token (0 for bf16)
    pieces: tuple
    perm: tuple  # kernel column -> natural head_dim index
    unpack: str = "join"  # "join": natural chunks interleaved by joins; "split": byte-shift pieces;
    # "bytes": natural chunks read from the stored bytes (8-bit as stored, packed by bit plane);
    # "asm": "bytes" with integer tiles converted by inline PTX (`_asm_convert`)

    @property
    def packed(self) -> bool:
        return self.fmt != "bf16"

    @property
    def identity(self) -> bool:
        """Kernel columns are head_dim order: q and the output need no permutation."""
        return self.perm == tuple(range(self.head_dim))

    def offsets(self):
        """Start column of each piece in the kernel's column order."""
        out, o = [], 0
        for pc in self.pieces:
            out.append(o)
            o += pc.width
        return out


def _pow2_divisor(n: int) -> int:
    return n & -n


def auto_unpack(t: TensorSpec) -> str:
    """The unpacking of ``t`` measured fastest on the H200 (BENCHMARKS.md, runs G and H):
    "asm" for every quantized format (B=8 S=32K: int8 226 us vs 237 "bytes" / 230 "split",
    int4 254-275 vs 303-314 / 539, int2 318 vs 349 / 376; paged B=16: int8 469 vs 543 / 475;
    fp8 converts in hardware, so "asm" reads it as "bytes" does; KIVI keys within 3 %)."""
    return "asm"


def default_v_dequant(spec) -> bool:
    """Scale value tiles in registers (instead of p per scale group) where measured faster
    (BENCHMARKS.md, run H, "asm" tiles): sub-byte values, except int4 values beside int4
    keys with per-token scales (254 vs 275 us at B=8 S=32K; k8v4 280 vs 306 and int2 318 vs
    342 go the other way)."""
    v, k = spec.v, spec.k
    if not v.quantized or v.bits >= 8:
        return False
    return not (v.bits == 4 and k.bits == 4 and not spec.channel_keys)


def v_dequant_choice(spec, cfg: "Config") -> bool:
    """``cfg.v_dequant`` resolved: value tiles scaled in registers (else `default_v_dequant`)."""
    return cfg.v_dequant if cfg.v_dequant is not None else default_v_dequant(spec)


def p16_weights(spec, cfg: "Config", precise: bool = False) -> bool:
    """Whether the default mode forms the weights ``p * s`` of ``p @ v`` in 16 bits: ``p`` rounded
    once per block, times each value scale group's scale in 16 bits (three roundings of ``2**-8``
    per weight, against the values' own ``2**-bits`` of their range; int4 307.7 -> 299.0 us,
    BENCHMARKS.md run N). So for sub-byte values whose tiles are not scaled in registers
    (`v_dequant_choice`); elsewhere ``p * s`` is formed in f32 and rounded once (no gain measured
    for int8)."""
    return not precise and spec.v.quantized and spec.v.bits < 8 and not v_dequant_choice(spec, cfg)


def qk_int8_supported(spec, kl: Layout) -> bool:
    """Whether keys stored as ``spec.k`` and read as ``kl`` can enter the int8 q·k dot
    (`Config.qk_int8`): integer keys with per-token scales, read as stored ("bytes", "asm"),
    in chunks of a multiple of 32 columns (the int8 MMA's K)."""
    return (spec.k.format in ("int8", "int4", "int2") and spec.k.axis == "token" and kl.unpack in STORED
            and all(pc.natural and pc.width % 32 == 0 for pc in kl.pieces))


def default_qk_int8(spec, kl: Layout) -> bool:
    """Whether the default mode meets integer keys with an int8 q·k dot: wherever supported.
    Measured (BENCHMARKS.md, runs I and M): paged B=16 S=32K int4 486 -> 455 us and int2
    579 -> 565 with q in one int8 term, no change in SmolLM2's KL to bf16 (int4 0.215 -> 0.201);
    8-bit keys with q in two terms (`default_qk_terms`): int8 386.9 -> 381.9 us, k8v4 521.8 ->
    503.1, KL 0.92e-3 (16-bit q·k) -> 1.02e-3 (XLA's f32 path: 0.99e-3), where one term gave
    1.38e-3."""
    return qk_int8_supported(spec, kl)


def default_qk_terms(kl: Layout) -> int:
    """int8 terms of q in the int8 q·k dot (`Config.qk_terms`): two for 8-bit keys, whose KL on
    SmolLM2 rose 0.92e-3 -> 1.38e-3 with one (BENCHMARKS.md, run I) and is 1.02e-3 with two (run
    M; XLA's f32 path 0.99e-3), at no cost in time (int8 381.9 us with two, 385.7 with one); one
    for sub-byte keys, whose own rounding hides q's (run I) and where a second dot cost 20 % (int4
    383.2 -> 458.5 us)."""
    return 2 if kl.bits == 8 else 1


def qk_int8_choice(spec, kl: Layout, cfg: "Config") -> tuple[bool, int]:
    """``(int8 q·k dot, q's int8 terms)`` that the default mode runs for keys stored as ``spec.k``
    and read as ``kl`` under ``cfg``: its ``qk_int8`` / ``qk_terms``, else `default_qk_int8` /
    `default_qk_terms`. Asking for the dot where it cannot run is an error naming the setting."""
    on = cfg.qk_int8 if cfg.qk_int8 is not None else default_qk_int8(spec, kl)
    if on and not qk_int8_supported(spec, kl):
        if cfg.qk_int8:
            raise ValueError(
                f"config: qk_int8 needs integer keys with per-token scales read as stored (unpack 'bytes' "
                f"or 'asm') in chunks of a multiple of 32 columns; got keys {spec.k}, unpack {kl.unpack!r}, "
                f"chunks {sorted({pc.width for pc in kl.pieces})}")
        on = False
    return on, cfg.qk_terms or default_qk_terms(kl)


def make_layout(t: TensorSpec, head_dim: int, unpack: str = "auto") -> Layout:
    """The kernel's tiling of a tensor stored as ``t`` with vectors of ``head_dim``.

    ``unpack`` "join": natural chunks (head_dim order, no permutation of q
    or o), each as wide as the largest power of two <= MAX_CHUNK that divides both the
    scale group and the packed row, so a chunk never straddles a scale group.
    "split": one tile per byte shift (``Piece``), columns permuted. "bytes": the natural
    chunks of "join" read from the stored bytes, no 32-bit words: 8-bit formats as
    stored (int8, uint8, float8_e4m3fn), packed ones one bit plane (``(x >> bits * c) &
    mask``) of a byte tile per chunk, converted by ``astype``. "asm": the tiles of "bytes",
    integers converted by inline PTX (`_asm_convert`). "auto": `auto_unpack`.
    """
    if unpack not in UNPACKS:
        raise ValueError(f"unpack: expected one of {UNPACKS}, got {unpack!r}")
    if unpack == "auto":
        unpack = auto_unpack(t)
    D = head_dim
    if t.format == "bf16":
        if D != _pow2_divisor(D):
            raise NotImplementedError(f"head_dim: the kernel needs a power-of-two head_dim for bf16, got {D}")
        return Layout("bf16", 16, True, D, 0, (Piece(0, 0, 0, D, ((0, 0, D),)),), tuple(range(D)))
    bits = t.bits
    dp = D * bits // 8
    if dp % 4:
        raise NotImplementedError(f"head_dim: {D} {t.format} values are {dp} bytes, not whole 32-bit words")
    words = dp // 4
    g = t.group_size(D) if t.axis == "token" else D
    if g % 4:
        raise NotImplementedError(f"group: the kernel needs scale groups of a multiple of 4 channels, got {g}")
    pieces, perm = [], []
    if unpack != "split":  # "join", "bytes", "asm": natural chunks
        ce = min(_pow2_divisor(math.gcd(g, dp)), MAX_CHUNK)
        if ce < 16:
            raise NotImplementedError(
                f"group: the kernel needs tiles of >= 16 elements; {t.format} group {g} with head_dim {D} gives {ce}")
        wr = ce // 4
        for c in range(8 // bits):
            for w0 in range(0, words, wr):
                start = c * dp + 4 * w0
                pieces.append(Piece(c, NATURAL, w0, wr, ((start // g if t.axis == "token" else 0, 0, ce),)))
                perm += range(start, start + ce)
        assert sorted(perm) == list(range(D))
        return Layout(t.format, bits, t.symmetric, D, words, tuple(pieces), tuple(perm), unpack)
    wr = min(_pow2_divisor(words), 64)
    if wr >= 16:  # pieces: one shift per tile, no reshape
        for c in range(8 // bits):
            for i in range(4):
                for w0 in range(0, words, wr):
                    elems = [c * dp + 4 * (w0 + w) + i for w in range(wr)]
                    segs, lo = [], 0
                    for w in range(1, wr + 1):
                        if w == wr or elems[w] // g != elems[lo] // g:
                            segs.append((elems[lo] // g if t.axis == "token" else 0, lo, w))
                            lo = w
                    pieces.append(Piece(c, i, w0, wr, tuple(segs)))
                    perm += elems
    else:  # chunks: reshape [BK, 4, wr] -> [BK, 4 wr]; never straddle a group
        ce = _pow2_divisor(math.gcd(g, dp))
        if ce < 16:
            raise NotImplementedError(
                f"group: the kernel needs tiles of >= 16 elements; {t.format} group {g} with head_dim {D} gives {ce}")
        wr = ce // 4
        for c in range(8 // bits):
            for w0 in range(0, words, wr):
                start = c * dp + 4 * w0
                grp = start // g if t.axis == "token" else 0
                pieces.append(Piece(c, -1, w0, wr, ((grp, 0, ce),)))
                perm += [start + 4 * w + i for i in range(4) for w in range(wr)]
    assert sorted(perm) == list(range(D))
    return Layout(t.format, bits, t.symmetric, D, words, tuple(pieces), tuple(perm), unpack)


# -- in-kernel helpers --------------------------------------------------------

_XOR = {8: 0x80808080, 4: 0x88888888, 2: 0xAAAAAAAA}


def _to_float(x, lay: Layout, dtype):
    """Shifted uint32 words -> the low byte's value in ``dtype`` (same shape).

    Integers become exact fp16 / bf16 values without int->float conversions: the
    biased value u (< 2**bits) is OR-ed into the mantissa of 1024.0 (fp16) or
    128.0 (bf16, bits <= 4), then the bias is subtracted in that dtype (exact).
    fp8 (e4m3) becomes fp16 by moving its bits: the result is x * 2**-8 exactly
    (the caller folds 2**8 into the scale).
    """
    if lay.fmt == "fp8":
        b = x & jnp.uint32(0xFF)
        bits16 = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).astype(jnp.uint16)
        val = lax.bitcast_convert_type(bits16, jnp.float16)
        return val if dtype == jnp.float16 else val.astype(dtype)
    u = x & jnp.uint32((1 << lay.bits) - 1)  # biased: words were pre-XOR-ed when signed
    bias = (1 << (lay.bits - 1)) if lay.signed else 0
    if dtype == jnp.float16:
        return lax.bitcast_convert_type((u | 0x6400).astype(jnp.uint16), jnp.float16) - jnp.float16(1024 + bias)
    if lay.bits <= 4:
        return lax.bitcast_convert_type((u | 0x4300).astype(jnp.uint16), jnp.bfloat16) - jnp.bfloat16(128 + bias)
    return (u.astype(jnp.int32) - bias).astype(jnp.float32).astype(dtype)


_MAGIC = {jnp.float16: (0x6400, 1024.0), jnp.bfloat16: (0x4300, 128.0)}  # magic exponent bits, its value


def _half2(x: float, dtype) -> int:
    """Two copies of the 16-bit pattern of ``x`` in ``dtype``, as one 32-bit immediate."""
    h = int(np.asarray(x, dtype).view(np.uint16))
    return (h << 16) | h


def asm_text(bits: int, signed: bool, c: int, dtype, pair: int | None = None) -> str:
    """PTX of `_asm_convert` for field ``c`` of ``bits``-bit values: the input (``$2``) holds four
    bytes, ``$0`` / ``$1`` get the values of bytes 0, 1 / 2, 3 as two 16-bit floats each. With
    ``pair`` 0 / 1 (`_asm_pair_convert`: the input ``$1``, two 16-bit words), the one output ``$0``
    gets the values of the low / high bytes of the two words (bytes 0, 2 / 1, 3).

    The bytes are shifted so the field is the low ``bits`` bits, spread into the low byte of
    16-bit lanes (``prmt``; a pair's bytes 0, 2 / 1, 3 already head the lanes, after a shift by
    8 for the high ones), masked and combined with the magic exponent (``lop3``
    ``(x & mask) ^ magic``: for signed formats the magic also holds the field's sign bit,
    so the XOR turns two's complement into offset binary), and the magic value plus the
    offset taken off (``fma`` by 1.0, exact)."""
    bits16, value = _MAGIC[dtype]
    if dtype == jnp.bfloat16 and bits > 4:
        raise ValueError(f"bits: bf16 has 7 mantissa bits, too few for {bits}-bit fields")
    mask = (1 << bits) - 1
    bias = (1 << (bits - 1)) if signed else 0
    magic = ((bits16 | bias) << 16) | bits16 | bias
    kind = "f16x2" if dtype == jnp.float16 else "bf16x2"
    inp = "$2" if pair is None else "$1"
    shift = bits * c + 8 * (pair or 0)
    src, asm = inp, ["{", ".reg .b32 t0, t1, t2, k1, k0;"]
    if shift:
        asm.append(f"shr.b32 t2, {inp}, {shift};")
        src = "t2"
    if pair is None:
        asm += ["prmt.b32 t0, %s, 0, 0x4140;" % src, "prmt.b32 t1, %s, 0, 0x4342;" % src]
        lanes = ["t0", "t1"]
    else:  # the field of bytes 0 and 2 (after the shift) already at bits 0 and 16
        lanes = [src]
    asm += [f"lop3.b32 t{n}, {x}, {(mask << 16) | mask:#010x}, {magic:#010x}, 0x6a;" for n, x in enumerate(lanes)]
    asm += [f"mov.b32 k1, {_half2(1.0, dtype):#010x};", f"mov.b32 k0, {_half2(-(value + bias), dtype):#010x};"]
    asm += [f"fma.rn.{kind} ${n}, t{n}, k1, k0;" for n in range(len(lanes))]
    return "\n".join(asm + ["}"])


def int8_key_map(bits: int, signed: bool) -> tuple[int, int]:
    """``(scale, center)`` of the int8 key tiles of the int8 q·k dot (`Config.qk_int8`): a stored
    field of integer value ``k`` (8, 4 or 2 bits; two's complement when ``signed``, else the
    unsigned code) enters the dot as the int8 ``scale * (k - center)``. The field is moved to
    the top bits of its byte (``scale = 2**(8 - bits)``: the sign of a signed field lands on the
    byte's, no sign extension needed) and unsigned codes have the top bit flipped (``center =
    2**(bits - 1)``), so every tile is centred: q's rounding error, multiplied by it, cancels
    like q's own, where codes of one sign would add it up. The kernel adds ``center * sum(q)``
    with the real q."""
    return 1 << (8 - bits), (0 if signed else 1 << (bits - 1))


def asm_int8_text(bits: int, c: int, signed: bool) -> str:
    """PTX of `_int8_tile` for field ``c`` of ``bits``-bit values: ``$1`` holds four bytes, ``$0``
    gets the four int8 values of `int8_key_map`: ``((byte << (8 - bits * (c + 1))) & top) ^ flip``
    (``top`` the byte's ``bits`` top bits, ``flip`` its top bit for unsigned codes): one ``lop3``,
    after a shift for all but the top field. Bits shifted across bytes fall outside ``top``."""
    top = (((1 << bits) - 1) << (8 - bits)) * 0x01010101
    flip = 0 if signed else 0x80808080
    shift = 8 - bits * (c + 1)
    src, asm = "$1", ["{", ".reg .b32 t0;"]
    if shift:
        asm.append(f"shl.b32 t0, $1, {shift};")
        src = "t0"
    asm += [f"lop3.b32 $0, {src}, {top:#010x}, {flip:#010x}, 0x6a;", "}"]
    return "\n".join(asm)


def _as_u8(x: jax.Array) -> jax.Array:
    """8-bit storage (int8, uint8, e4m3) as uint8 (a bitcast)."""
    return x if x.dtype == jnp.uint8 else lax.bitcast_convert_type(x, jnp.uint8)


def _bit_plane(x, bits: int, c: int):
    """Field ``c`` of every byte of the 8-bit tile ``x``, as uint8 (``(x >> bits * c) & mask``)."""
    return (_as_u8(x) >> jnp.uint8(bits * c)) & jnp.uint8((1 << bits) - 1)


def _byte_asm(asm: str, x, constraints: str, dtype):
    """One pure inline-PTX op on four bytes of ``x`` per instance, giving a tile of ``x``'s
    shape in ``dtype``; pure and unary, so Triton can still apply it after moving the narrow
    tile into the dot-operand layout."""
    from jax.experimental.pallas import triton as plgpu

    [out] = plgpu.elementwise_inline_asm(asm, args=[_as_u8(x)], constraints=constraints, pack=4,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, dtype)])
    return out


def _asm_convert(x, lay: Layout, c: int, dtype):
    """Bit field ``c`` of every byte of ``x`` (uint8 / int8 ``[BK, W]``) -> its integer value
    in ``dtype`` (fp16; bf16 for fields of <= 4 bits), by inline PTX (`asm_text`)."""
    return _byte_asm(asm_text(lay.bits, lay.signed, c, dtype), x, "=r,=r,r", dtype)


def _asm_pair_convert(x, lay: Layout, c: int, dtype):
    """uint16 tile ``x`` -> the values of field ``c`` of its low bytes and of its high bytes, two
    tiles of ``x``'s shape in ``dtype``, by inline PTX (`asm_text` with ``pair``): one instance per
    two words, so the loads stay 32 bits wide."""
    from jax.experimental.pallas import triton as plgpu

    return tuple(plgpu.elementwise_inline_asm(
        asm_text(lay.bits, lay.signed, c, dtype, pair=h), args=[x], constraints="=r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, dtype)])[0] for h in (0, 1))


def _field_values(x, lay: Layout, c: int, dtype):
    """Field ``c`` of every byte of the 8-bit tile ``x`` -> its integer value in ``dtype``, by jnp ops
    (the "bytes" unpacking, and interpret mode)."""
    if lay.bits == 8:
        return x.astype(dtype)
    u = _bit_plane(x, lay.bits, c)
    if not lay.signed:
        return u.astype(dtype)
    bias = 1 << (lay.bits - 1)  # two's complement -> biased, then the bias off (exact)
    return (u ^ jnp.uint8(bias)).astype(dtype) - jnp.asarray(bias, dtype)


def pair_split(x):
    """``x [..., BK]`` (a block's tokens on the last axis) -> the halves that meet the value tiles
    of ``v_pairs`` (`kvq_jax.quant.pair_slot`): tokens ``16 g + j`` and ``16 g + 8 + j`` (``j < 8``),
    each ``[..., BK / 2]`` in ``(g, j)`` order."""
    lead, bk = x.shape[:-1], x.shape[-1]
    a, b = jnp.split(x.reshape(*lead, bk // 16, 2, 8), 2, axis=-2)
    return a.reshape(*lead, bk // 2), b.reshape(*lead, bk // 2)


def _int8_tile(x, lay: Layout, c: int, interpret: bool):
    """Stored bytes ``[BK, W]`` -> the int8 tile of field ``c`` for the int8 q·k dot
    (`int8_key_map`): signed int8 passes as stored; otherwise one inline-PTX ``lop3`` per four
    bytes, after a shift (`asm_int8_text`), or the same values from jnp ops in interpret mode."""
    if lay.bits == 8 and lay.signed:
        return x
    if interpret:
        scale, center = int8_key_map(lay.bits, lay.signed)
        k = _bit_plane(x, lay.bits, c).astype(jnp.int32)
        if lay.signed:  # two's complement field
            k = jnp.where(k >= (1 << (lay.bits - 1)), k - (1 << lay.bits), k)
        return (scale * (k - center)).astype(jnp.int8)
    return _byte_asm(asm_int8_text(lay.bits, c, lay.signed), x, "=r,r", jnp.int8)


Q_LO = 254  # weight of q's first int8 term against its second (`_quantize_rows`)


def _q_weights(terms: int) -> tuple[int, ...]:
    """int32 weights of q's int8 terms in the int8 q·k dot: ``q = s / w[0] * sum(w_t q_t)``."""
    return (1,) if terms == 1 else (Q_LO, 1)


def _quantize_rows(q, terms: int = 1):
    """f32 ``[..., M, W]`` -> int8 terms of q per row and the f32 row scale ``s = max|q| / 127``
    (1 for all-zero rows).

    One term: ``q1 = round(q / s)``, ``|q - s * q1| <= s / 2``. Two terms: also
    ``q2 = round(Q_LO * (q / s - q1))`` (``|q / s - q1| <= 1/2``, so ``|q2| <= 127``), and
    ``|q - s * (q1 + q2 / Q_LO)| <= s / (2 * Q_LO)``, i.e. ``max|q| / 64516``: finer than
    q rounded to fp16 (``|q| / 2048``) wherever ``|q| > max|q| / 32``.
    Returns ``(int8 terms, s)``."""
    amax = jnp.max(jnp.abs(q), axis=-1)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    x = q / s[..., None]
    q1 = jnp.floor(x + 0.5)
    if terms == 1:
        return (q1.astype(jnp.int8),), s
    q2 = jnp.floor((x - q1) * Q_LO + 0.5)
    return (q1.astype(jnp.int8), q2.astype(jnp.int8)), s


def int8_q_terms(q, terms: int, k_mult: int, heads: int, rows_per_head: int):
    """The int8 q·k dot's q operand, before the kernel: f32 ``q [B, Hg, M, D]`` (``heads`` KV heads'
    rows stacked per group, ``rows_per_head`` each) -> ``(int8 [B, Hg, heads, terms, M, D]``, each
    head's copy with the other heads' rows zeroed; ``f32 [B, Hg, M]`` logit units per int32 unit of
    the dot, ``s / (w_0 * k_mult)`` with ``s`` the rows' scale (`_quantize_rows`) and ``w_0`` the
    first term's weight)."""
    qt, s = _quantize_rows(q, terms)
    # selected by broadcast index masks, not stacked: XLA fuses the terms, their placement and
    # the heads' masks into one elementwise kernel (a stack and a select were two)
    term = np.arange(terms)[:, None, None]  # [terms, 1, 1]
    q8 = qt[-1][:, :, None]
    for t in range(terms - 2, -1, -1):
        q8 = jnp.where(term == t, qt[t][:, :, None], q8)  # [B, Hg, terms, M, D]
    q8 = q8[:, :, None]  # [B, Hg, 1, terms, M, D]
    if heads > 1:
        row_head = np.arange(q.shape[2]) // rows_per_head
        own = row_head[None, :] == np.arange(heads)[:, None]  # [heads, M]
        q8 = jnp.where(own[None, None, :, None, :, None], q8, jnp.int8(0))
    return q8, s / (_q_weights(terms)[0] * k_mult)


LOG2E = 1.4426950408889634  # log2(e): the block loop's exponentials are powers of two


def _exp2(x, interpret: bool):
    """``2**x`` of an f32 tile: on the GPU one ``ex2.approx.ftz.f32`` per element (relative error
    below 2**-22, far under the 16-bit rounding of the weights; ``jnp.exp`` lowers to libdevice's
    ``expf``, about six instructions around the same ex2), ``jnp.exp2`` in interpret mode."""
    return jnp.exp2(x) if interpret else _compat.f32_asm("ex2.approx.ftz.f32")(x)


def _unpack(words, pc: Piece, lay: Layout, dtype):
    """uint32 words ``[BK, wr]`` -> values ``[BK, width]`` of piece ``pc`` in ``dtype``.

    Natural chunks interleave the four bytes of every word back into head_dim order:
    "join" converts the four shifted tiles and interleaves them with two rounds of
    joins (``jnp.stack(..., -1)``, Triton's ``join``: the new minor axis stays in
    each thread's registers). A broadcast-and-shift of ``[BK, wr, 4]`` words measured
    slower on the H200 (BENCHMARKS.md, run D) and was dropped.
    """
    bk = words.shape[0]
    shift0 = lay.bits * pc.c
    if pc.natural:
        b = [_to_float(words >> jnp.uint32(8 * i + shift0), lay, dtype) for i in range(4)]
        x = jnp.stack([jnp.stack([b[0], b[2]], axis=-1), jnp.stack([b[1], b[3]], axis=-1)], axis=-1)
        return x.reshape(bk, pc.width)  # [BK, wr, a, b] holds byte 2a + b
    if pc.i >= 0:
        return _to_float(words >> jnp.uint32(8 * pc.i + shift0), lay, dtype)
    w3 = jnp.broadcast_to(words[:, None, :], (bk, 4, pc.wr))
    x = w3 >> (lax.broadcasted_iota(jnp.uint32, (1, 4, 1), 1) * 8 + jnp.uint32(shift0))
    return _to_float(x, lay, dtype).reshape(bk, pc.width)


def _channel_row(ref, grp: tuple, base, pc: Piece):
    """Per-channel scales of one token group for the columns of ``pc``, f32 ``[width]``.

    ``ref``: ``[S / TG, D / 4, 4]`` (natural element ``4 * word + byte``), or the pool
    ``[P, page / TG, D / 4, 4]``; ``grp``: the group's leading index, ``(g,)`` or ``(page, g)``.
    """
    if pc.i >= 0:
        return ref[(*grp, pl.ds(base, pc.wr), pc.i)].astype(jnp.float32)
    seg = ref[(*grp, pl.ds(base, pc.wr), slice(None))].astype(jnp.float32)  # [wr, 4]
    return seg.reshape(pc.width) if pc.natural else seg.T.reshape(pc.width)


def _dequant_tile(t, pc: Piece, col, scale_of, has_zero: bool):
    """``t * scale (+ zero)`` for a tile whose columns span several per-token scale groups.

    ``scale_of(group, "s" | "z")`` gives the f32 ``[BK]`` scale / zero of a group;
    column ranges come from ``pc.segs``. Returns a tile of ``t``'s dtype.
    """
    def pick(key):
        out = None
        for (grp, a, b) in reversed(pc.segs):
            val = scale_of(grp, key)[:, None]
            out = val if out is None else jnp.where(col < b, val, out)
        return out

    x = t.astype(jnp.float32) * pick("s")
    if has_zero:
        x = x + pick("z")
    return x.astype(t.dtype)


def _dot(a, b_tile, precise: bool, trans_b: bool):
    """f32 ``a`` times tile ``b`` (fp16 or bf16; transposed when ``trans_b``), f32 accumulate."""
    hi = a.astype(b_tile.dtype)
    out = _compat.dot(hi, b_tile, trans_b=trans_b)
    if precise:
        lo = (a - hi.astype(jnp.float32)).astype(b_tile.dtype)
        out = out + _compat.dot(lo, b_tile, trans_b=trans_b)
    return out


def _kdtype(lay: Layout):
    """Key tiles: fp16 (exact for 8-bit integers and e4m3, 3 more mantissa bits for q than bf16)."""
    return jnp.bfloat16 if not lay.packed else jnp.float16


def _vdtype(lay: Layout, v_fp16: bool):
    """Value tiles: fp16 (magic-number unpack, no int->float converts) for 8-bit formats when
    ``v_fp16``, with p * scale normalized per block so it cannot underflow; bf16 otherwise."""
    return jnp.float16 if (v_fp16 and lay.fmt in ("int8", "fp8")) else jnp.bfloat16


def _decode_kernel(*refs, kl: Layout, vl: Layout, k_mode: str, k_zero: bool, v_scaled: bool,
                   v_zero: bool, block_k: int, num_splits: int, precise: bool, v_fp16: bool,
                   page_size: int | None, split_pages: int, token_group: int, v_dequant: bool, qk_int8: bool,
                   qk_terms: int, p_16bit: bool, v_token_minor: bool, v_pairs: bool, heads: int,
                   rows_per_head: int, fast_exp: bool, interpret: bool):
    # refs of the body are [heads, S, ...] per (b, head group); paged (page_size set): pools
    # [P, heads, page, ...]. Row r of the tile belongs to head r // rows_per_head of the group.
    it = iter(refs)
    q_ref = next(it)  # [Rt, D] f32, one tile of rows: columns in kl.perm order, softmax scale folded in
    lim_ref = next(it)  # [Rt] int32: body tokens visible to each row
    # int8 q·k: q's int8 terms per head (rows of the other heads zeroed), [heads, terms, Rt, D], and
    # the rows' logit units per int32 unit, [Rt] (read in the loop: loaded into the dot's operand
    # layout, where a tile computed before the loop is moved there again in every block)
    q8_ref = next(it) if qk_int8 else None
    srow_ref = next(it) if qk_int8 else None
    pt_ref = next(it) if page_size else None  # [maxp] int32: page of each page_size stream slots (padded)
    k_ref = next(it)  # [heads, S, words] uint32 | [.., S, D] bf16 | [.., S, Dp] as stored ("bytes", "asm")
    ks_ref = next(it) if k_mode != "none" else None  # [heads, S, Gk] per token | [heads, S/TG, D/4, 4] per channel
    kz_ref = next(it) if k_zero else None
    # as k_ref; v_token_minor: [heads, Dp, S] (bf16: D), tokens contiguous per channel; v_pairs: uint16
    # [heads, Dp, S / 2], the tokens in pairs (`kvq_jax.quant.pair_slot`)
    v_ref = next(it)
    vs_ref = next(it) if v_scaled else None  # [heads, S, Gv]
    vz_ref = next(it) if v_zero else None
    o_ref, m_ref, l_ref = next(it), next(it), next(it)  # [Rt, D] f32, [Rt] f32, [Rt] f32

    mp = q_ref.shape[0]
    j = pl.program_id(2)
    lim = lim_ref[...]
    nblk = (jnp.max(lim) + block_k - 1) // block_k
    per_split = (nblk + num_splits - 1) // num_splits
    lo = j * per_split
    hi = jnp.minimum(nblk, lo + per_split)
    kdt, vdt = _kdtype(kl), _vdtype(vl, v_fp16)
    # _unpack gives e4m3 values * 2**-8 (the STORED unpackings convert them exactly)
    k_fp8_fix = 256.0 if kl.fmt == "fp8" and kl.unpack not in STORED else 1.0
    v_fp8_fix = 256.0 if vl.fmt == "fp8" and vl.unpack not in STORED else 1.0

    if split_pages:  # this split's pages, loaded once: no table read on the tile addresses' path
        p0 = jnp.minimum(lo // (page_size // block_k), pt_ref.shape[0] - split_pages)
        pages = pt_ref[pl.ds(p0, split_pages)]
        page_idx = lax.broadcasted_iota(jnp.int32, (split_pages,), 0)

    # several KV heads per program (``heads``): each head's rows meet only its own tiles; a dot
    # takes the tile's rows masked to one head (zeros elsewhere) and the heads' dots are summed,
    # so the softmax and the running accumulators are shared by all rows of the tile
    row_head = lax.broadcasted_iota(jnp.int32, (mp, 1), 0) // rows_per_head if heads > 1 else None

    def only(x, i):
        """``x`` (``[Mp, ...]`` or ``[Mp]``) with the rows of heads other than ``i`` zeroed."""
        if heads == 1:
            return x
        rows_i = row_head == i if x.ndim == 2 else row_head[:, 0] == i
        return jnp.where(rows_i, x, jnp.zeros((), x.dtype))

    def rows_times(x, vals):
        """``x`` (``[Mp, BK]`` or ``[Mp, 1]``) times per-head ``[BK]`` vectors, each row its own
        head's: the products selected per row, so Triton forms them in ``x``'s (the dot's) layout
        and converts only the ``[BK]`` vectors (a ``[Mp, BK]`` tile of each row's scales, selected
        first, was built in a blocked layout and moved to the dot's through shared memory every
        block: BENCHMARKS.md run S)."""
        out = x * vals[-1][None, :]
        for i in range(heads - 2, -1, -1):
            out = jnp.where(row_head == i, x * vals[i][None, :], out)
        return out

    # q columns of each key piece (loaded once, before the loop)
    koffs = list(kl.offsets())
    kq = [q_ref[:, pl.ds(off, pc.width)] for off, pc in zip(koffs, kl.pieces)]
    kq_h = None if qk_int8 else [[only(q, i) for q in kq] for i in range(heads)]  # the other dots' q per head
    k_mult, k_center = int8_key_map(kl.bits, kl.signed) if qk_int8 else (1, 0)
    # sum(q) per row and chunk: for zero points, and for the centre of unsigned codes in the int8 dot
    qsum = [q.sum(axis=1) for q in kq] if (k_mode == "token" and (k_zero or k_center)) else None
    if qk_int8:  # q rounded to int8 per row (`int8_q_terms`): q·k in int32 on the keys' integers
        q_w = _q_weights(qk_terms)
        s_row = srow_ref[...]
    if fast_exp:  # exp(x) as 2**(x * log2(e)), one ex2 per logit (`_exp2`)
        def exp(x):
            return _exp2(x * LOG2E, interpret)
    else:
        exp = jnp.exp
    kcols = [lax.broadcasted_iota(jnp.int32, (1, pc.width), 1) for pc in kl.pieces]
    tg = token_group  # per-channel keys: tokens per scale group; a block holds groups_per_block of them
    groups_per_block = block_k // tg if k_mode == "channel" else 1
    tok_group = lax.broadcasted_iota(jnp.int32, (1, block_k), 1) // tg  # [1, BK]
    vcols = [lax.broadcasted_iota(jnp.int32, (1, pc.width), 1) for pc in vl.pieces]

    def words(ref, at, pc, lay, cache):
        if not lay.packed:
            return ref[(*at, slice(None))]
        if pc.w0 not in cache:
            w = ref[(*at, pl.ds(pc.w0, pc.wr))]
            if lay.signed and lay.fmt != "fp8":
                w = w ^ jnp.uint32(_XOR[lay.bits])
            cache[pc.w0] = w
        return cache[pc.w0]

    def stored(ref, at, pc, lay, cache, token_minor=False):
        """Piece ``pc``'s columns as stored (bf16: all of them), ``[BK, width]`` (``[width, BK]``
        when the tensor is stored tokens-minor), loaded once per column range."""
        if pc.w0 not in cache:
            cols = pl.ds(4 * pc.w0, pc.width) if lay.packed else slice(None)
            cache[pc.w0] = ref[(*at[:-1], cols, at[-1])] if token_minor else ref[(*at, cols)]
        return cache[pc.w0]

    def asm_tiles(lay, dtype):
        """Tiles of ``lay`` converted to ``dtype`` by inline PTX (8-bit -> bf16: Triton's own prmt path)."""
        return (lay.unpack == "asm" and lay.fmt != "fp8" and not interpret
                and (dtype == jnp.float16 or lay.bits <= 4))

    def pair_tiles(pc, at, half, cache):
        """``v_pairs``: the value tiles of piece ``pc`` in ``vdt``, ``(low, high)``: the values of the
        block's tokens ``16 g + j`` / ``16 g + 8 + j``, each ``[width, BK / 2]``
        (`kvq_jax.quant.pair_slot`), from one load of ``[width, BK / 2]`` 16-bit words (``at``: a
        head's block index, ``half``: the block's words)."""
        if pc.w0 not in cache:
            cache[pc.w0] = v_ref[(*at[:-1], pl.ds(4 * pc.w0, pc.width), half)]
        x = cache[pc.w0]
        if asm_tiles(vl, vdt):
            return _asm_pair_convert(x, vl, pc.c, vdt)
        return tuple(_field_values((x >> jnp.uint16(8 * h)).astype(jnp.uint8), vl, pc.c, vdt) for h in (0, 1))

    def tile(ref, at, pc, lay, cache, dtype, token_minor=False):
        """The block's values of piece ``pc`` in ``dtype``: ``[BK, width]``, or ``[width, BK]``
        when the tensor is stored tokens-minor (``token_minor``)."""
        if token_minor or lay.unpack in STORED:
            x = stored(ref, at, pc, lay, cache, token_minor)
            if not lay.packed:
                return x.astype(dtype)
            if asm_tiles(lay, dtype):
                return _asm_convert(x, lay, pc.c, dtype)
            return _field_values(x, lay, pc.c, dtype)
        w = words(ref, at, pc, lay, cache)
        return _unpack(w, pc, lay, dtype) if lay.packed else w.astype(dtype)

    def col_scale(ref, at, grp, cache, key):
        """f32 ``[BK]`` scale (or zero) column ``grp`` of this block: the block's
        ``[BK, groups]`` tile is loaded once, contiguously, and columns are picked in registers."""
        if (key, grp) not in cache:
            ngroups = ref.shape[-1]
            if (key, "tile") not in cache:
                cache[(key, "tile")] = ref[(*at, slice(None))].astype(jnp.float32)
            tile_ = cache[(key, "tile")]
            if ngroups == 1:
                cache[(key, grp)] = tile_.reshape(block_k)
            else:
                col = lax.broadcasted_iota(jnp.int32, (1, ngroups), 1)
                cache[(key, grp)] = jnp.sum(jnp.where(col == grp, tile_, 0.0), axis=1)
        return cache[(key, grp)]

    def block(blk):
        """Block ``blk``'s places: ``(ats, grps, half, pos)``: each head's index of the block's tokens
        and of its scale groups, the block's 16-bit words of a value pool stored in pairs (else
        None), and the tokens' stream positions ``[1, BK]``."""
        start = pl.multiple_of(blk * block_k, block_k)
        if page_size:  # the block lies in one page (page_size % block_k == 0)
            if split_pages:
                page = jnp.sum(jnp.where(page_idx == start // page_size - p0, pages, 0))
            else:
                page = pt_ref[start // page_size]
            row = pl.multiple_of(start % page_size, block_k)
            at, grp_at = (page, pl.ds(row, block_k)), (page, row // tg)
        else:
            at, grp_at = (pl.ds(start, block_k),), (blk * groups_per_block,)
        # the block's index of head i of the group, before its token (or token group) index
        ats = [(*at[:-1], i, at[-1]) for i in range(heads)]
        half = None
        if v_pairs:  # the block's 16-bit words of a value pool stored in pairs
            half = pl.ds(pl.multiple_of((row if page_size else start) // 2, block_k // 2), block_k // 2)
        grps = [(*grp_at[:-1], i, grp_at[-1]) for i in range(heads)]
        pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        return ats, grps, half, pos

    def key_logits(blk):
        """Block ``blk``'s logits ``[Mp, BK]``, before the causal mask."""
        ats, grps, _, _ = block(blk)
        logits = jnp.zeros((mp, block_k), jnp.float32)
        logits_z = None  # int8 q·k: zero-point terms, in logit units (logits is in s_row units until the end)
        wc, sc = [{} for _ in range(heads)], [{} for _ in range(heads)]

        def key_part(n, pc, i):
            """Head ``i``'s logits from key piece ``pc`` (its rows; zero elsewhere), other than the
            int8 q·k dot."""
            kq_n, at_i, wc_i, sc_i = kq_h[i][n], ats[i], wc[i], sc[i]
            kt = tile(k_ref, at_i, pc, kl, wc_i, kdt)
            if k_mode == "channel":  # per token group: its channel scales multiply q, one dot per group
                base = (pc.c * kl.words * 4) // 4 + pc.w0
                out = 0.0
                for sg in range(groups_per_block):
                    gidx = (*grps[i][:-1], grps[i][-1] + sg)
                    srow = _channel_row(ks_ref, gidx, base, pc)
                    part = _dot(kq_n * srow[None, :], kt, precise, trans_b=True)
                    if k_zero:
                        zr = _channel_row(kz_ref, gidx, base, pc)
                        part = part + (kq_n * zr[None, :]).sum(axis=1)[:, None]
                    out = out + (part if groups_per_block == 1 else jnp.where(tok_group == sg, part, 0.0))
                return out
            if len(pc.segs) > 1 and precise:  # exact: one dot per scale group, q masked to its columns
                out = 0.0
                for (grp, a, b) in pc.segs:
                    qm = jnp.where((kcols[n] >= a) & (kcols[n] < b), kq_n, 0.0)
                    part = _dot(qm, kt, precise, trans_b=True) * col_scale(ks_ref, at_i, grp, sc_i, "s")[None, :]
                    if k_zero:
                        part = part + qm.sum(axis=1)[:, None] * col_scale(kz_ref, at_i, grp, sc_i, "z")[None, :]
                    out = out + part
                return out
            if len(pc.segs) > 1:  # the piece straddles scale groups: dequantize the tile in registers
                kt = _dequant_tile(kt, pc, kcols[n], lambda g, key: col_scale(
                    ks_ref if key == "s" else kz_ref, at_i, g, sc_i, key), k_zero)
                return _dot(kq_n, kt, precise, trans_b=True)
            part = _dot(kq_n, kt, precise, trans_b=True)  # [Mp, BK]
            if k_mode == "token":
                grp = pc.segs[0][0]
                part = part * col_scale(ks_ref, at_i, grp, sc_i, "s")[None, :]
                if k_zero:
                    part = part + only(qsum[n], i)[:, None] * col_scale(kz_ref, at_i, grp, sc_i, "z")[None, :]
            return part

        for n, pc in enumerate(kl.pieces):
            if not qk_int8:
                for i in range(heads):
                    logits = logits + key_part(n, pc, i)
                continue
            # per-token scales (qk_int8_supported): logits += s_k * sum_t w_t (q_t . k_int); the heads'
            # int32 dots sum into one tile (each fills only its own rows), scaled by each row's head's s_k
            acc_i = None
            for i in range(heads):
                ki = _int8_tile(stored(k_ref, ats[i], pc, kl, wc[i]), kl, pc.c, interpret)
                for t in range(qk_terms):  # 254 q1.k + q2.k: |.| <= 255 * 128 * 128 * width < 2**31
                    qi = q8_ref[i, t, :, pl.ds(koffs[n], pc.width)]
                    d = lax.dot_general(qi, ki, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
                    if t + 1 < len(q_w):  # the first of two terms: weighted in int32
                        d = d * q_w[t]
                    acc_i = d if acc_i is None else acc_i + d  # addi(c, dot): Triton folds c into the dot
            grp = pc.segs[0][0]
            s_i = [col_scale(ks_ref, ats[i], grp, sc[i], "s") for i in range(heads)]
            # exact below 2**24 (one term); two terms: within 2**-24 relative
            logits = logits + rows_times(acc_i.astype(jnp.float32), s_i)
            if k_zero or k_center:  # sum(q) * (zero + k_center * s_k), per row and token
                shift = [k_center * s if k_center else 0.0 for s in s_i]
                if k_zero:
                    shift = [sh + col_scale(kz_ref, ats[i], grp, sc[i], "z") for i, sh in enumerate(shift)]
                z = rows_times(qsum[n][:, None], shift)
                logits_z = z if logits_z is None else logits_z + z
        if qk_int8:
            logits = logits * s_row[:, None] + (logits_z if logits_z is not None else 0.0)
        if k_fp8_fix != 1.0:
            logits = logits * k_fp8_fix
        return logits

    def update(blk, carry, logits):
        """The running ``(os, m, l)`` after block ``blk``, whose unmasked logits are ``logits``."""
        os, m_prev, l_prev = carry
        ats, _, half, pos = block(blk)
        mask = pos < lim[:, None]  # [Mp, BK]
        sc = [{} for _ in range(heads)]
        logits = jnp.where(mask, logits, NEG_INF)
        m_new = jnp.maximum(m_prev, logits.max(axis=1))
        corr = exp(m_prev - m_new)
        # the difference first, so p keeps f32 precision whatever the size of m (a fused
        # l * log2(e) - m * log2(e) would err by |m| * 2**-24)
        p = jnp.where(mask, exp(logits - m_new[:, None]), 0.0)
        l_new = corr * l_prev + p.sum(axis=1)

        p16 = p.astype(vdt) if p_16bit else None  # p * s formed in 16 bits (`p16_weights`)
        p_h = [only(p, i) for i in range(heads)]
        p16_h = [only(p16, i) if p16 is not None else None for i in range(heads)]
        tb = v_token_minor  # the dots take value tiles transposed

        def vdot(a, vt, acc=None):
            """``acc + a @ vt`` over the block's tokens (``vt``: ``[BK, width]``, ``[width, BK]``
            tokens-minor, or with ``v_pairs`` the pair of halves, ``a``'s columns split alike:
            `pair_split`); each dot added to the sum before it (Triton makes it the dot's
            accumulator)."""
            if not v_pairs:
                out = _dot(a, vt, precise, trans_b=tb)
                return out if acc is None else acc + out
            (a_lo, a_hi), (v_lo, v_hi) = pair_split(a), vt
            out = _dot(a_lo, v_lo, precise, trans_b=tb)
            out = out if acc is None else acc + out
            return out + _dot(a_hi, v_hi, precise, trans_b=tb)

        tok = (None, slice(None)) if tb else (slice(None), None)  # the token axis of a value tile

        def per_token(f, vt, s):
            """``f(tile, s)`` for value tile(s) ``vt`` and a per-token ``s [BK]`` laid along the tile's
            token axis; with ``v_pairs`` each half with its half of ``s`` (`pair_split`)."""
            if not v_pairs:
                return f(vt, s[tok])
            return tuple(f(v_h, s_h[tok]) for v_h, s_h in zip(vt, pair_split(s)))

        def to_dtype(x, dtype):
            return tuple(x_h.astype(dtype) for x_h in x) if v_pairs else x.astype(dtype)

        def value_part(n, pc, i, vt, acc):
            """``acc`` plus head ``i``'s ``p @ v`` of value piece ``pc`` (its rows; zero elsewhere)."""
            p_i, at_i, sc_i = p_h[i], ats[i], sc[i]
            if len(pc.segs) > 1 and precise:  # exact: one dot per scale group, masked to its columns
                out = 0.0
                for (grp, a, b) in pc.segs:
                    cm = (vcols[n] >= a) & (vcols[n] < b)
                    s_g = col_scale(vs_ref, at_i, grp, sc_i, "vs") * v_fp8_fix
                    part = _dot(p_i * s_g[None, :], vt, precise, trans_b=tb)
                    if v_zero:
                        part = part + (p_i * col_scale(vz_ref, at_i, grp, sc_i, "vz")[None, :]).sum(axis=1)[:, None]
                    out = out + jnp.where(cm, part, 0.0)
                return acc + out
            if len(pc.segs) > 1:
                vt = _dequant_tile(vt, pc, vcols[n], lambda g, key: col_scale(
                    vs_ref if key == "s" else vz_ref, at_i, g, sc_i, "v" + key) * (v_fp8_fix if key == "s" else 1.0),
                    v_zero)
                return acc + _dot(p_i, vt, precise, trans_b=tb)
            grp = pc.segs[0][0]
            if v_dequant and v_scaled and not precise:  # scale (and shift) the tile: p is shared by all dots
                x = per_token(lambda v, s: v.astype(jnp.float32) * s, vt,
                              col_scale(vs_ref, at_i, grp, sc_i, "vs") * v_fp8_fix)
                if v_zero:
                    x = per_token(jnp.add, x, col_scale(vz_ref, at_i, grp, sc_i, "vz"))
                return vdot(p_i, to_dtype(x, vdt), acc)
            if v_scaled and vdt == jnp.float16:  # p * s / max(s) is in [0, 1]: no fp16 underflow
                sv = col_scale(vs_ref, at_i, grp, sc_i, "vs") * v_fp8_fix
                smax = jnp.maximum(jnp.max(sv), 1e-30)
                out = acc + vdot(p_i * (sv / smax)[None, :], vt) * smax
            else:
                pv = p_i
                if v_scaled:  # p16: p rounded once for all groups, times each group's scale
                    s_v = (col_scale(vs_ref, at_i, grp, sc_i, "vs") * v_fp8_fix)[None, :]
                    pv = p16_h[i] * s_v.astype(vdt) if p16 is not None else p_i * s_v
                out = vdot(pv, vt, acc)  # [Mp, width]
            if v_zero:
                out = out + (p_i * col_scale(vz_ref, at_i, grp, sc_i, "vz")[None, :]).sum(axis=1)[:, None]
            return out

        wcv, new_os = [{} for _ in range(heads)], []
        for n, pc in enumerate(vl.pieces):
            acc = corr[:, None] * os[n]
            for i in range(heads):
                if v_pairs:
                    vt = pair_tiles(pc, ats[i], half, wcv[i])  # ([width, BK / 2], [width, BK / 2])
                else:
                    # [BK, width] ([width, BK] tokens-minor)
                    vt = tile(v_ref, ats[i], pc, vl, wcv[i], vdt, v_token_minor)
                acc = value_part(n, pc, i, vt, acc)
            new_os.append(acc)
        return tuple(new_os), m_new, l_new

    o0 = tuple(jnp.zeros((mp, pc.width), jnp.float32) for pc in vl.pieces)
    m0 = jnp.full((mp,), NEG_INF, jnp.float32)
    l0 = jnp.zeros((mp,), jnp.float32)
    os, m, l = lax.fori_loop(lo, hi, lambda blk, c: update(blk, c, key_logits(blk)), (o0, m0, l0))
    for off, pc, o in zip(vl.offsets(), vl.pieces, os):
        o_ref[:, pl.ds(off, pc.width)] = o
    m_ref[...] = m
    l_ref[...] = l


# -- wrapper ------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _as_words(x: jax.Array) -> jax.Array:
    """``[..., Dp]`` 8-bit storage -> ``uint32[..., Dp / 4]`` (bitcast, little-endian bytes)."""
    if x.dtype == jnp.bfloat16:
        return x
    u8 = _as_u8(x)
    return lax.bitcast_convert_type(u8.reshape(*x.shape[:-1], x.shape[-1] // 4, 4), jnp.uint32)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration: tokens per block, sequence splits, warps, pipeline stages,
    and how packed words are unpacked (`make_layout`'s ``unpack``)."""

    block_k: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2
    v_fp16: bool = False
    unpack: str = "auto"
    v_dequant: bool | None = None  # default mode: scale value tiles in registers instead of p per
    # group; None = `default_v_dequant` (measured per format: BENCHMARKS.md runs E and H)
    row_tile: int = 64  # query rows (T * G) per program when there are more (chunked prefill)
    qk_int8: bool | None = None  # default mode: q rounded to int8 (per row) and q·k as an int8 dot on
    # the stored key integers (`qk_int8_supported`); None = `default_qk_int8`
    qk_terms: int | None = None  # int8 terms of q in that dot: 1 (q rounded once) or 2 (q and its rounding
    # error, two int8 dots summed in int32: finer than the 16-bit path); None = `default_qk_terms`
    heads: int = 1  # KV heads per program: their query rows stacked in one tile (decode: G rows each)

    def __post_init__(self):
        if self.unpack not in UNPACKS:
            raise ValueError(f"unpack: expected one of {UNPACKS}, got {self.unpack!r}")
        if self.row_tile < 16 or self.row_tile & (self.row_tile - 1):
            raise ValueError(f"row_tile: expected a power of two >= 16, got {self.row_tile}")
        if self.qk_terms not in (None, 1, 2):
            raise ValueError(f"qk_terms: expected None, 1 or 2, got {self.qk_terms!r}")
        if self.heads < 1:
            raise ValueError(f"heads: expected a positive number of KV heads per program, got {self.heads}")


def choose_config(cache: KVCache, rows: int, page_size: int | None = None) -> Config:
    """Heuristic launch config for this cache shape and ``rows = T * G`` query rows per KV
    head (B * Hkv * row tiles * splits fills the SMs, and decode programs of several warps take
    at most `SPLIT_TOKENS` tokens per split; `default_heads` KV heads per program); with
    ``page_size``, for the body read through pages of that size (blocks within one page), as
    `body_attention` picks it."""
    return _default_config(cache.spec, cache.batch * cache.num_kv_heads, rows, cache.body_capacity, page_size,
                           cache.num_kv_heads)


def _default_config(spec, heads: int, rows: int, S: int, page_size: int | None = None,
                    kv_heads: int = 1) -> Config:
    """`_choose` for ``heads`` (B * Hkv) KV heads of ``rows`` query rows each, `default_heads` of
    the ``kv_heads`` per program (the splits fill the SMs with the programs launched)."""
    rt, nr = _row_tiles(rows, Config.row_tile)
    hp = default_heads(spec, rows, kv_heads)
    cfg = _choose(spec, heads * nr // hp, S, page_size, rt, hp)
    return cfg if hp == 1 else dataclasses.replace(cfg, heads=hp)


def default_heads(spec, rows: int, kv_heads: int) -> int:
    """KV heads per program (`Config.heads`) where two heads' ``rows`` fill at most one 16-row
    tile and ``kv_heads`` is even: two for one-warp decode programs (`one_warp`) of sub-byte keys
    with per-token scales beside int4 values whose weights are formed in 16 bits (`p16_weights`:
    int4, int4-rot), and for int8 keys and values with one symmetric scale per token (the int8
    preset); else one. Measured (paged B=16 S=32K, pages of 64, BENCHMARKS.md run Q; the splits
    `_choose` gives the programs launched): int4 314-331 -> 259-277 us, int8 336-354 -> 311-333;
    four heads per program: int4 379 (255 registers, spills), int8 333-371; k8v4 (value tiles
    scaled in registers) 398 -> 569-713."""
    if 2 * rows > 16 or kv_heads % 2:
        return 1
    k, v = spec.k, spec.v
    sub_byte = (one_warp(spec, 16) and k.quantized and k.format != "fp8" and k.bits < 8 and k.axis == "token"
                and not default_v_dequant(spec))
    int8 = all(t.format == "int8" and t.axis == "token" and t.group is None and t.symmetric for t in (k, v))
    return 2 if sub_byte or int8 else 1


def fast_exp(cfg: Config) -> bool:
    """Whether the block loop takes its exponentials as one ``ex2.approx`` each (`_exp2`) instead of
    libdevice's ``expf`` (about six instructions around the same ex2): in one-warp programs, whose
    block loop is short of issue slots (BENCHMARKS.md run V, 8B engine at 16 x 32K, alternated: int4
    1394.9 / 1409.2 -> 1457.1 / 1456.3 tok/s, its loop 1578 -> 1450 SASS instructions per block).
    Programs of four warps lost (int8 1188.7 / 1188.1 -> 1171.8 / 1167.1 tok/s with it)."""
    return cfg.num_warps == 1


def _row_tiles(rows: int, row_tile: int) -> tuple[int, int]:
    """``(rows per program, programs)`` for ``rows`` query rows: one program of
    ``max(16, next_pow2(rows))`` rows up to ``row_tile``, else tiles of ``row_tile``."""
    rt = max(16, _next_pow2(rows))
    if rt <= row_tile:
        return rt, 1
    return row_tile, -(-rows // row_tile)


def one_warp(spec, row_tile: int) -> bool:
    """Whether decode programs (``row_tile`` 16) run as one warp each: sub-byte values. One warp
    needs no barrier between warps (a 4-warp int4 block loop has 30: `p` exchanged through shared
    memory for every value scale group) and fits more programs per SM. Measured (B=16 S=32K,
    BENCHMARKS.md run N; paged): int4 368 -> 310 us, k8v4 503 -> 405, int2 501 -> 487;
    (contiguous) int4-kivi 943 -> 634, int2-kivi 1085 -> 928; 8-bit values do not gain (int8
    386 -> 393 at best)."""
    return row_tile <= 16 and spec.v.quantized and spec.v.bits < 8


def default_block_k(spec, row_tile: int) -> int:
    """Tokens per block for programs of ``row_tile`` query rows: a token group for per-channel
    keys (several groups per block measured slower, run E); 32 for one-warp decode programs
    (`one_warp`; run N: int4 310 us vs 316 at 64 and 548 at 128); 128 in decode (``row_tile``
    16) for other sub-byte keys with per-token scales (run J: int4 with 4 warps 426 -> 377 us);
    else 64."""
    if spec.channel_keys:
        return spec.token_group
    if one_warp(spec, row_tile):
        return 32
    return 128 if spec.k.quantized and spec.k.bits < 8 and row_tile <= 16 else 64


def _choose(spec, programs: int, S: int, page_size: int | None = None, row_tile: int = 16,
            heads: int = 1) -> Config:
    block_k = min(default_block_k(spec, row_tile), _next_pow2(S))
    small_pages = bool(page_size) and _pow2_divisor(page_size) < block_k
    if small_pages:  # a block lies in one page
        block_k = _pow2_divisor(page_size)
    nblk = -(-S // block_k)
    # warps: one for `one_warp` programs; two for other decode programs held to blocks of <= 32
    # tokens by small pages (run O, paged B=16 S=32K, page 16 / 32: int8 755 / 469 us with 4
    # warps, 431 / 354 with 2; bf16 806 / 577 -> 524 / 518); else 4
    if one_warp(spec, row_tile):
        warps = 1
    else:
        warps = 2 if (small_pages and block_k <= 32 and row_tile <= 16) else 4
    # programs to launch: 4 per SM of 2 or 4 warps; 12 per SM of one warp (run N, 128 heads: 16
    # splits 310 us, 32 splits 328)
    fill = (12 if warps == 1 else 4) * NUM_SMS
    # and, for decode programs of several warps, at most SPLIT_TOKENS tokens per split (run P, paged
    # B=32 S=32K int8: 4 splits 672 us, 8 598, 16 621; B=16: 8 splits 317-332, 16 330, 4 374)
    cap_tokens = warps > 1 and row_tile <= 16
    splits = 1
    if warps == 1 and heads > 1:
        # one-warp programs of several KV heads hold ~254 registers, 8 per SM: as many splits as one
        # wave of them holds (run R, paged B=16 S=32K int4, values in pairs: 16 splits 236.1 us, 32
        # 247.0, 64 248.1)
        while programs * splits * 2 <= 8 * NUM_SMS and splits * 2 <= max(1, nblk // 4):
            splits *= 2
        return Config(block_k, splits, num_warps=warps, num_stages=3)
    while ((programs * splits < fill or (cap_tokens and splits * SPLIT_TOKENS < S))
           and splits * 2 <= max(1, nblk // 4)):
        splits *= 2
    return Config(block_k, splits, num_warps=warps, num_stages=3)


def body_attention(qg, cache: KVCache, qpos, scale, *, interpret: bool, config: Config | None = None,
                   precise: bool = False, page_table: jax.Array | None = None, v_token_minor: bool = False,
                   v_pairs: bool = False):
    """Pallas twin of ``reference.body_attention``: ``(o, lse)`` over the quantized body.

    Args:
      qg: ``f32[B, T, Hkv, G, D]`` queries (rotated when the spec rotates).
      cache: the KVCache; with ``page_table``, any object with ``spec``, ``lengths``
        (``int32[B]``) and page pools named like KVCache's body: ``k, v: [P, Hkv, page, Dp]``
        (``v: [P, Hkv, Dp, page]`` with ``v_token_minor``, as `kvq_jax.serve.PagedKVCache` stores it),
        ``k_scale, k_zero, v_scale, v_zero`` (None where the spec has none;
        ``[P, Hkv, page, D / group]`` per token, ``[P, Hkv, page / TG, D]`` per channel).
      page_table: ``int32[B, max_pages]``: body stream slot ``s`` of sequence ``b`` lives in
        page ``page_table[b, s // page]``, row ``s % page``. None: ``cache`` is contiguous.
      qpos: ``int32[B, T]`` absolute query positions (causal limit per row).
      scale: softmax scale.
      interpret: run in Pallas interpret mode (CPU); False lowers with Triton.
      config: launch configuration; default ``choose_config``.
      precise: hi/lo bf16 splitting of q and p (f32-level accuracy, twice the dots).
      v_token_minor: ``cache.v`` holds the values tokens-minor, ``[B, Hkv, Dp, S]`` (pools
        ``[P, Hkv, Dp, page]``; bf16 ``D`` for ``Dp``): each channel's tokens contiguous, the
        order ``p @ v`` contracts in. `kvq_jax.serve.PagedKVCache` stores its value pool so
        (``kvq.attend`` passes its ``v_token_minor``); the contiguous KVCache does not.
      v_pairs: with ``v_token_minor``, sub-byte values whose token axis is stored in pairs
        (`kvq_jax.quant.pair_slot`: in each 16 tokens, tokens ``j`` and ``j + 8`` side by side), as
        `kvq_jax.serve.PagedKVCache` stores them (its ``v_pairs``): the kernel loads a value tile
        as 16-bit words and converts each word's two bytes into the two halves of the block, so
        ``p @ v`` keeps the 16-bit operand layout of the logits (no register shuffles of ``p``).

    Returns:
      ``o: f32[B, T, Hkv, G, D]`` (normalized), ``lse: f32[B, T, Hkv, G]``.
    """
    spec = cache.spec
    B, T, H, G, D = qg.shape
    rows = T * G
    page_size = None
    if page_table is None:
        S = cache.body_capacity
    else:
        page_size = cache.k.shape[2]
        if page_table.ndim != 2 or page_table.shape[0] != B or page_table.dtype != jnp.int32:
            raise ValueError(f"page_table: expected int32[{B}, max_pages], got {page_table.dtype}{list(page_table.shape)}")
        S = page_table.shape[1] * page_size
    cfg = config or _default_config(spec, B * H, rows, S, page_size, H)
    hp = cfg.heads  # KV heads per program, their rows stacked in one tile
    if H % hp:
        raise ValueError(f"config: heads {hp} must divide the {H} KV heads")
    rt, nr = _row_tiles(hp * rows, cfg.row_tile)  # rows per program, row tiles (chunked prefill: many)
    if hp > 1 and nr > 1:
        raise ValueError(f"config: heads {hp} x {rows} query rows exceed row_tile {cfg.row_tile}")
    mp = rt * nr
    # several heads per program: each head's rows padded to rph = mp / hp, head i at rows
    # [i * rph, i * rph + rows). Two heads in a 16-row tile then sit at rows 0-3 and 8-11, and an MMA
    # layout's thread holds rows r and r + 8, one of each head, so part of the per-row head selection
    # in the block loop folds away (sm_90 offline: int4 1450 -> 1431 SASS per block, int8 947 -> 929;
    # no change in time beyond the noise, BENCHMARKS.md run W)
    rph = mp // hp if hp > 1 else rows
    kl, vl = make_layout(spec.k, D, cfg.unpack), make_layout(spec.v, D, cfg.unpack)
    if spec.channel_keys and cfg.block_k % spec.token_group:
        raise ValueError(f"config: block_k must be a multiple of token_group={spec.token_group} for per-channel keys")
    qk_int8, qk_terms = qk_int8_choice(spec, kl, cfg)
    if (page_size or S) % cfg.block_k:
        what = f"the page size {page_size}" if page_size else f"the body capacity {S}"
        raise ValueError(f"config: block_k {cfg.block_k} must divide {what}")

    # rows r = t * G + g, each head's padded to rph, then to mp; softmax scale folded into q;
    # columns in kl.perm order
    q = jnp.transpose(qg.astype(jnp.float32), (0, 2, 1, 3, 4)).reshape(B, H // hp, hp, rows, D) * scale
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, rph - rows), (0, 0))).reshape(B, H // hp, hp * rph, D)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, mp - hp * rph), (0, 0)))
    if not kl.identity:
        q = q[..., np.asarray(kl.perm)]
    _, q_len, _ = segment_lengths(spec, cache.lengths)
    vis = jnp.clip(qpos - spec.sinks + 1, 0, q_len[:, None])  # [B, T]
    lim = jnp.pad(jnp.repeat(vis, G, axis=1), ((0, 0), (0, rph - rows)))  # [B, rph]: the same for every head
    lim = jnp.pad(jnp.tile(lim, (1, hp)), ((0, 0), (0, mp - hp * rph))).astype(jnp.int32)  # [B, Mp]

    k_mode = "none" if not spec.k.quantized or spec.k.format == "bf16" else spec.k.axis
    # grid (b, head group h, split j, row tile r): a row tile's programs stop at its own causal limit
    args = [q, lim]
    specs = [
        pl.BlockSpec((None, None, rt, D), lambda b, h, j, r: (b, h, r, 0)),
        pl.BlockSpec((None, rt), lambda b, h, j, r: (b, r)),
    ]
    qk_int8 = qk_int8 and not precise
    if qk_int8:
        q8, s_row = int8_q_terms(q, qk_terms, int8_key_map(kl.bits, kl.signed)[0], hp, rph)
        args += [q8, s_row]
        specs += [pl.BlockSpec((None, None, hp, qk_terms, rt, D), lambda b, h, j, r: (b, h, 0, 0, r, 0)),
                  pl.BlockSpec((None, None, rt), lambda b, h, j, r: (b, h, r))]
    ns = cfg.num_splits
    split_pages = 0
    if page_size:  # padded to a power of two (Triton block shapes); padding is never read
        per_split = -(-(S // cfg.block_k) // ns)  # most blocks one split reads
        split_pages = _next_pow2(-(-per_split * cfg.block_k // page_size) + 1)  # most pages they touch
        if split_pages > SPLIT_PAGES_MAX:
            split_pages = 0  # a page-table read per block instead
        maxp = _next_pow2(page_table.shape[1] + split_pages)
        args.append(jnp.pad(page_table, ((0, 0), (0, maxp - page_table.shape[1]))))
        specs.append(pl.BlockSpec((None, maxp), lambda b, h, j, r: (b, 0)))

    def add(x):
        args.append(x)
        zeros = (0,) * (x.ndim - 2)
        if page_size:  # the whole pool of head group h: [P, hp, page, ...]
            specs.append(pl.BlockSpec((x.shape[0], hp, *x.shape[2:]), lambda b, h, j, r: (0, h, *zeros)))
        else:
            specs.append(pl.BlockSpec((None, hp, *x.shape[2:]), lambda b, h, j, r: (b, h, *zeros)))

    add(cache.k if kl.unpack in STORED else _as_words(cache.k))

    def kscale(x):
        return x.reshape(*x.shape[:-1], D // 4, 4) if k_mode == "channel" else x

    if k_mode != "none":
        add(kscale(cache.k_scale))
        if cache.k_zero is not None:
            add(kscale(cache.k_zero))
    if v_token_minor:
        want = D * vl.bits // 8 if vl.packed else D
        if vl.packed and vl.unpack not in STORED:
            raise ValueError(f"v_token_minor: needs values read as stored (unpack 'bytes' or 'asm'), got {vl.unpack!r}")
        if cache.v.shape[-2] != want or cache.v.shape[-1] != (page_size or S):
            raise ValueError(f"v_token_minor: expected cache.v [..., {want}, {page_size or S}], got {list(cache.v.shape)}")
    if v_pairs:
        if not (v_token_minor and vl.packed and vl.bits < 8 and vl.unpack in STORED and vl.fmt != "fp8"):
            raise ValueError(f"v_pairs: needs sub-byte integer values stored tokens-minor (v_token_minor) and read "
                             f"as stored (unpack 'bytes' or 'asm'); got values {spec.v}, v_token_minor="
                             f"{v_token_minor}, unpack {vl.unpack!r}")
        v = cache.v  # [.., Dp, tokens] bytes -> [.., Dp, tokens / 2] 16-bit words (a bitcast)
        add(lax.bitcast_convert_type(v.reshape(*v.shape[:-1], v.shape[-1] // 2, 2), jnp.uint16))
    else:
        add(cache.v if vl.unpack in STORED or v_token_minor else _as_words(cache.v))
    v_scaled = spec.v.quantized
    if v_scaled:
        add(cache.v_scale)
        if cache.v_zero is not None:
            add(cache.v_zero)

    kernel = functools.partial(
        _decode_kernel, kl=kl, vl=vl, k_mode=k_mode, k_zero=cache.k_zero is not None,
        v_scaled=v_scaled, v_zero=cache.v_zero is not None, block_k=cfg.block_k,
        num_splits=ns, precise=precise, v_fp16=cfg.v_fp16, page_size=page_size, split_pages=split_pages,
        token_group=spec.token_group,
        v_dequant=v_dequant_choice(spec, cfg),
        qk_int8=qk_int8, qk_terms=qk_terms, p_16bit=p16_weights(spec, cfg, precise),
        v_token_minor=v_token_minor, v_pairs=v_pairs, heads=hp, rows_per_head=rph,
        fast_exp=fast_exp(cfg), interpret=interpret)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, H // hp, ns, nr),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rt, D), lambda b, h, j, r: (b, h, j, r, 0)),
            pl.BlockSpec((None, None, None, rt), lambda b, h, j, r: (b, h, j, r)),
            pl.BlockSpec((None, None, None, rt), lambda b, h, j, r: (b, h, j, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H // hp, ns, mp, D), jnp.float32),
            jax.ShapeDtypeStruct((B, H // hp, ns, mp), jnp.float32),
            jax.ShapeDtypeStruct((B, H // hp, ns, mp), jnp.float32),
        ],
        compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name=f"kvq_decode_{spec.k.format}_{spec.v.format}",
    )(*args)

    # merge the splits (f32 log-sum-exp), un-permute V's columns, back to [B, T, H, G, D]
    m_tot = jnp.max(m, axis=2)
    w = jnp.where(l > 0, jnp.exp(m - m_tot[:, :, None]), 0.0)
    l_tot = jnp.sum(w * l, axis=2)
    o = jnp.sum(w[..., None] * o, axis=2) / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]
    if not vl.identity:
        o = o[..., np.argsort(np.asarray(vl.perm))]
    lse = jnp.where(l_tot > 0, m_tot + jnp.log(jnp.where(l_tot > 0, l_tot, 1.0)), -jnp.inf)
    o = o[:, :, :hp * rph].reshape(B, H // hp, hp, rph, D)[:, :, :, :rows]
    o = o.reshape(B, H, T, G, D).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :hp * rph].reshape(B, H // hp, hp, rph)[:, :, :, :rows]
    lse = lse.reshape(B, H, T, G).transpose(0, 2, 1, 3)
    return o, lse
