"""Fused-dequant split-K decode attention over the quantized KV cache body.

One program per (sequence b, KV head h, split j) streams its share of the body
``[S, Dp]`` of that head once, in packed form, and computes all ``G * T`` query
rows of the head against it (padded to at least 16 rows for the tensor-core
dot). Partials ``(o, m, l)`` stay f32 and are merged across splits by
log-sum-exp in XLA.

Reading packed data: the body is viewed as uint32 words (a free bitcast of the
byte layout) and unpacked with shifts in registers (see `Piece`). A *piece* is
one shift of a ``[BK, wr]`` word tile: its column w holds element
``c * Dp + 4 * (w0 + w) + i`` of the head vector (DESIGN.md's split packing), for
value slot ``c`` and byte ``i``. Rows of fewer than 16 words use *chunks*
instead: all four bytes unpacked to ``[BK, 4, wr]`` and reshaped. So the kernel
never shuffles: the wrapper permutes q's head_dim into the kernel's column
order once, and un-permutes the tiny output after. Scales apply where cheapest:

* per-token key scales multiply a tile's logits ``q·k_int`` (zero points add
  ``sum(q_tile) * zero``);
* per-channel key scales (KIVI) multiply q (blocks are one token group long);
  zero points add ``q·zero`` per row;
* per-token value scales multiply the probabilities before ``p @ v_int`` (zero
  points add ``(p·zero)`` per row);
* a tile whose columns straddle two scale groups is dequantized in registers
  instead (``precise=True``: one exact dot per group).

Integers are turned into fp16 / bf16 without int->float conversions (magic-number
trick, `_unpack`); key tiles are fp16, value tiles bf16; dots accumulate in f32.
``precise=True`` splits q and p into 16-bit hi + lo parts (two dots each) for
results within f32 rounding of the reference; the default rounds them once, as
flash-attention kernels do (error bound in tests/test_kernel.py).
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


# -- layout of one tensor as the kernel reads it ------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """One tile the kernel unpacks per block, and the head_dim elements it holds.

    ``i >= 0`` (a *piece*): words ``[w0, w0 + wr)`` shifted by ``8 * i + bits * c``,
    a ``[BK, wr]`` tile whose column w is element ``c * Dp + 4 * (w0 + w) + i``.
    ``i == -1`` (a *chunk*, for rows of fewer than 16 words): all four bytes of the
    words, unpacked to ``[BK, 4, wr]`` and reshaped to ``[BK, 4 * wr]``, column
    ``i * wr + w`` holding element ``c * Dp + 4 * (w0 + w) + i``.
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

    @property
    def packed(self) -> bool:
        return self.fmt != "bf16"

    def offsets(self):
        """Start column of each piece in the kernel's column order."""
        out, o = [], 0
        for pc in self.pieces:
            out.append(o)
            o += pc.width
        return out


def _pow2_divisor(n: int) -> int:
    return n & -n


def make_layout(t: TensorSpec, head_dim: int) -> Layout:
    """The kernel's tiling of a tensor stored as ``t`` with vectors of ``head_dim``."""
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
    return Layout(t.format, bits, t.symmetric, D, words, tuple(pieces), tuple(perm))


# -- in-kernel helpers --------------------------------------------------------

_XOR = {8: 0x80808080, 4: 0x88888888, 2: 0xAAAAAAAA}


def _unpack(words, pc: Piece, lay: Layout, dtype):
    """uint32 words ``[BK, wr]`` -> values ``[BK, width]`` of piece ``pc`` in ``dtype``.

    Integers become exact fp16 / bf16 values without int->float conversions: the
    biased value u (< 2**bits) is OR-ed into the mantissa of 1024.0 (fp16) or
    128.0 (bf16, bits <= 4), then the bias is subtracted in that dtype (exact).
    fp8 (e4m3) becomes fp16 by moving its bits: the result is x * 2**-8 exactly
    (the caller folds 2**8 into the scale).
    """
    bk = words.shape[0]
    if pc.i >= 0:
        x = words >> jnp.uint32(8 * pc.i + lay.bits * pc.c)
    else:
        w3 = jnp.broadcast_to(words[:, None, :], (bk, 4, pc.wr))
        x = w3 >> (lax.broadcasted_iota(jnp.uint32, (1, 4, 1), 1) * 8 + jnp.uint32(lay.bits * pc.c))
    if lay.fmt == "fp8":
        b = x & jnp.uint32(0xFF)
        bits16 = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).astype(jnp.uint16)
        val = lax.bitcast_convert_type(bits16, jnp.float16)
        if dtype != jnp.float16:
            val = val.astype(dtype)
    else:
        u = x & jnp.uint32((1 << lay.bits) - 1)  # biased: words were pre-XOR-ed when signed
        bias = (1 << (lay.bits - 1)) if lay.signed else 0
        if dtype == jnp.float16:
            val = lax.bitcast_convert_type((u | 0x6400).astype(jnp.uint16), jnp.float16) - jnp.float16(1024 + bias)
        elif lay.bits <= 4:
            val = lax.bitcast_convert_type((u | 0x4300).astype(jnp.uint16), jnp.bfloat16) - jnp.bfloat16(128 + bias)
        else:
            val = (u.astype(jnp.int32) - bias).astype(jnp.float32).astype(dtype)
    return val.reshape(bk, pc.width) if pc.i < 0 else val


def _channel_row(ref, grp, base, pc: Piece):
    """Per-channel scales of token group ``grp`` for the columns of ``pc``, f32 ``[width]``.

    ``ref``: ``[S / TG, D / 4, 4]`` (natural element ``4 * word + byte``).
    """
    if pc.i >= 0:
        return ref[grp, pl.ds(base, pc.wr), pc.i].astype(jnp.float32)
    seg = ref[grp, pl.ds(base, pc.wr), :].astype(jnp.float32)  # [wr, 4]
    return seg.T.reshape(pc.width)


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
                   v_zero: bool, block_k: int, num_splits: int, precise: bool, v_fp16: bool):
    it = iter(refs)
    q_ref = next(it)  # [Mp, D] f32: columns in kl.perm order, softmax scale folded in
    lim_ref = next(it)  # [Mp] int32: body tokens visible to each row
    k_ref = next(it)  # [S, words] uint32 | [S, D] bf16
    ks_ref = next(it) if k_mode != "none" else None  # [S, Gk] per token | [S/TG, D/4, 4] per channel
    kz_ref = next(it) if k_zero else None
    v_ref = next(it)  # [S, words] uint32 | [S, D] bf16
    vs_ref = next(it) if v_scaled else None  # [S, Gv]
    vz_ref = next(it) if v_zero else None
    o_ref, m_ref, l_ref = next(it), next(it), next(it)  # [Mp, D] f32, [Mp] f32, [Mp] f32

    mp = q_ref.shape[0]
    j = pl.program_id(2)
    lim = lim_ref[...]
    nblk = (jnp.max(lim) + block_k - 1) // block_k
    per_split = (nblk + num_splits - 1) // num_splits
    lo = j * per_split
    hi = jnp.minimum(nblk, lo + per_split)
    kdt, vdt = _kdtype(kl), _vdtype(vl, v_fp16)
    k_fp8_fix = 256.0 if kl.fmt == "fp8" else 1.0  # _unpack gives e4m3 values * 2**-8
    v_fp8_fix = 256.0 if vl.fmt == "fp8" else 1.0

    # q columns of each key piece (loaded once, before the loop)
    kq = [q_ref[:, pl.ds(off, pc.width)] for off, pc in zip(kl.offsets(), kl.pieces)]
    qsum = [q.sum(axis=1) for q in kq] if (k_zero and k_mode == "token") else None
    kcols = [lax.broadcasted_iota(jnp.int32, (1, pc.width), 1) for pc in kl.pieces]
    vcols = [lax.broadcasted_iota(jnp.int32, (1, pc.width), 1) for pc in vl.pieces]

    def words(ref, start, pc, lay, cache):
        if not lay.packed:
            return ref[pl.ds(start, block_k), :]
        if pc.w0 not in cache:
            w = ref[pl.ds(start, block_k), pl.ds(pc.w0, pc.wr)]
            if lay.signed and lay.fmt != "fp8":
                w = w ^ jnp.uint32(_XOR[lay.bits])
            cache[pc.w0] = w
        return cache[pc.w0]

    def tile(ref, start, pc, lay, cache, dtype):
        w = words(ref, start, pc, lay, cache)
        return _unpack(w, pc, lay, dtype) if lay.packed else w.astype(dtype)

    def col_scale(ref, start, grp, cache, key):
        """f32 ``[BK]`` scale (or zero) column ``grp`` of this block: the block's
        ``[BK, groups]`` tile is loaded once, contiguously, and columns are picked in registers."""
        if (key, grp) not in cache:
            ngroups = ref.shape[-1]
            if (key, "tile") not in cache:
                cache[(key, "tile")] = ref[pl.ds(start, block_k), :].astype(jnp.float32)
            tile_ = cache[(key, "tile")]
            if ngroups == 1:
                cache[(key, grp)] = tile_.reshape(block_k)
            else:
                col = lax.broadcasted_iota(jnp.int32, (1, ngroups), 1)
                cache[(key, grp)] = jnp.sum(jnp.where(col == grp, tile_, 0.0), axis=1)
        return cache[(key, grp)]

    def body(blk, carry):
        os, m_prev, l_prev = carry
        start = pl.multiple_of(blk * block_k, block_k)
        pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = pos < lim[:, None]  # [Mp, BK]

        logits = jnp.zeros((mp, block_k), jnp.float32)
        zrow = jnp.zeros((mp,), jnp.float32)
        wc, sc = {}, {}
        for n, pc in enumerate(kl.pieces):
            kt = tile(k_ref, start, pc, kl, wc, kdt)
            if k_mode == "channel":  # one token group per block: the group's channel scales multiply q
                base = (pc.c * kl.words * 4) // 4 + pc.w0
                srow = _channel_row(ks_ref, blk, base, pc)
                logits = logits + _dot(kq[n] * srow[None, :], kt, precise, trans_b=True)
                if k_zero:
                    zr = _channel_row(kz_ref, blk, base, pc)
                    zrow = zrow + (kq[n] * zr[None, :]).sum(axis=1)
                continue
            if len(pc.segs) > 1 and precise:  # exact: one dot per scale group, q masked to its columns
                for (grp, a, b) in pc.segs:
                    qm = jnp.where((kcols[n] >= a) & (kcols[n] < b), kq[n], 0.0)
                    part = _dot(qm, kt, precise, trans_b=True) * col_scale(ks_ref, start, grp, sc, "s")[None, :]
                    if k_zero:
                        part = part + qm.sum(axis=1)[:, None] * col_scale(kz_ref, start, grp, sc, "z")[None, :]
                    logits = logits + part
                continue
            if len(pc.segs) > 1:  # the piece straddles scale groups: dequantize the tile in registers
                kt = _dequant_tile(kt, pc, kcols[n], lambda g, key: col_scale(
                    ks_ref if key == "s" else kz_ref, start, g, sc, key), k_zero)
                logits = logits + _dot(kq[n], kt, precise, trans_b=True)
                continue
            part = _dot(kq[n], kt, precise, trans_b=True)  # [Mp, BK]
            if k_mode == "token":
                grp = pc.segs[0][0]
                part = part * col_scale(ks_ref, start, grp, sc, "s")[None, :]
                if k_zero:
                    part = part + qsum[n][:, None] * col_scale(kz_ref, start, grp, sc, "z")[None, :]
            logits = logits + part
        if k_mode == "channel" and k_zero:
            logits = logits + zrow[:, None]
        if k_fp8_fix != 1.0:
            logits = logits * k_fp8_fix

        logits = jnp.where(mask, logits, NEG_INF)
        m_new = jnp.maximum(m_prev, logits.max(axis=1))
        corr = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(logits - m_new[:, None]), 0.0)
        l_new = corr * l_prev + p.sum(axis=1)

        wc, new_os = {}, []
        for n, pc in enumerate(vl.pieces):
            vt = tile(v_ref, start, pc, vl, wc, vdt)
            acc = corr[:, None] * os[n]
            if len(pc.segs) > 1 and precise:  # exact: one dot per scale group, masked to its columns
                for (grp, a, b) in pc.segs:
                    cm = (vcols[n] >= a) & (vcols[n] < b)
                    s_g = col_scale(vs_ref, start, grp, sc, "vs") * v_fp8_fix
                    part = _dot(p * s_g[None, :], vt, precise, trans_b=False)
                    if v_zero:
                        part = part + (p * col_scale(vz_ref, start, grp, sc, "vz")[None, :]).sum(axis=1)[:, None]
                    acc = acc + jnp.where(cm, part, 0.0)
            elif len(pc.segs) > 1:
                vt = _dequant_tile(vt, pc, vcols[n], lambda g, key: col_scale(
                    vs_ref if key == "s" else vz_ref, start, g, sc, "v" + key) * (v_fp8_fix if key == "s" else 1.0),
                    v_zero)
                acc = acc + _dot(p, vt, precise, trans_b=False)
            else:
                grp = pc.segs[0][0]
                if v_scaled and vdt == jnp.float16:  # p * s / max(s) is in [0, 1]: no fp16 underflow
                    sv = col_scale(vs_ref, start, grp, sc, "vs") * v_fp8_fix
                    smax = jnp.maximum(jnp.max(sv), 1e-30)
                    acc = acc + _dot(p * (sv / smax)[None, :], vt, precise, trans_b=False) * smax
                else:
                    pv = p
                    if v_scaled:
                        pv = p * (col_scale(vs_ref, start, grp, sc, "vs") * v_fp8_fix)[None, :]
                    acc = acc + _dot(pv, vt, precise, trans_b=False)  # [Mp, width]
                if v_zero:
                    acc = acc + (p * col_scale(vz_ref, start, grp, sc, "vz")[None, :]).sum(axis=1)[:, None]
            new_os.append(acc)
        return tuple(new_os), m_new, l_new

    o0 = tuple(jnp.zeros((mp, pc.width), jnp.float32) for pc in vl.pieces)
    m0 = jnp.full((mp,), NEG_INF, jnp.float32)
    l0 = jnp.zeros((mp,), jnp.float32)
    os, m, l = lax.fori_loop(lo, hi, body, (o0, m0, l0))
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
    u8 = lax.bitcast_convert_type(x, jnp.uint8) if x.dtype != jnp.uint8 else x
    return lax.bitcast_convert_type(u8.reshape(*x.shape[:-1], x.shape[-1] // 4, 4), jnp.uint32)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration: tokens per block, sequence splits, warps, pipeline stages."""

    block_k: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2
    v_fp16: bool = False


def choose_config(cache: KVCache, rows: int) -> Config:
    """Heuristic launch config for this cache shape (B * Hkv * splits fills the SMs)."""
    spec = cache.spec
    S = cache.body_capacity
    if spec.channel_keys:
        block_k = spec.token_group
    else:
        block_k = 64
    block_k = min(block_k, _next_pow2(S))
    programs = cache.batch * cache.num_kv_heads
    nblk = -(-S // block_k)
    splits = 1
    while programs * splits < 4 * NUM_SMS and splits * 2 <= max(1, nblk // 4):
        splits *= 2
    return Config(block_k, splits, num_warps=4, num_stages=3)


def body_attention(qg, cache: KVCache, qpos, scale, *, interpret: bool, config: Config | None = None,
                   precise: bool = False):
    """Pallas twin of ``reference.body_attention``: ``(o, lse)`` over the quantized body.

    Args:
      qg: ``f32[B, T, Hkv, G, D]`` queries (rotated when the spec rotates).
      cache: the KVCache.
      qpos: ``int32[B, T]`` absolute query positions (causal limit per row).
      scale: softmax scale.
      interpret: run in Pallas interpret mode (CPU); False lowers with Triton.
      config: launch configuration; default ``choose_config``.
      precise: hi/lo bf16 splitting of q and p (f32-level accuracy, twice the dots).

    Returns:
      ``o: f32[B, T, Hkv, G, D]`` (normalized), ``lse: f32[B, T, Hkv, G]``.
    """
    spec = cache.spec
    B, T, H, G, D = qg.shape
    kl, vl = make_layout(spec.k, D), make_layout(spec.v, D)
    rows = T * G
    mp = max(16, _next_pow2(rows))
    cfg = config or choose_config(cache, mp)
    if spec.channel_keys and cfg.block_k != spec.token_group:
        raise ValueError(f"config: block_k must equal token_group={spec.token_group} for per-channel keys")
    if cache.body_capacity % cfg.block_k:
        raise ValueError(f"config: block_k {cfg.block_k} must divide the body capacity {cache.body_capacity}")

    # rows r = t * G + g, padded to mp; softmax scale folded into q; columns in kl.perm order
    q = jnp.transpose(qg.astype(jnp.float32), (0, 2, 1, 3, 4)).reshape(B, H, rows, D) * scale
    q = jnp.pad(q, ((0, 0), (0, 0), (0, mp - rows), (0, 0)))[..., np.asarray(kl.perm)]
    _, q_len, _ = segment_lengths(spec, cache.lengths)
    vis = jnp.clip(qpos - spec.sinks + 1, 0, q_len[:, None])  # [B, T]
    lim = jnp.pad(jnp.repeat(vis, G, axis=1), ((0, 0), (0, mp - rows))).astype(jnp.int32)  # [B, Mp]

    S = cache.body_capacity
    k_mode = "none" if not spec.k.quantized or spec.k.format == "bf16" else spec.k.axis
    args = [q, lim, _as_words(cache.k)]
    specs = [
        pl.BlockSpec((None, None, mp, D), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, mp), lambda b, h, j: (b, 0)),
        pl.BlockSpec((None, None, S, args[2].shape[-1]), lambda b, h, j: (b, h, 0, 0)),
    ]

    def add(x):
        args.append(x)
        zeros = (0,) * (x.ndim - 2)
        specs.append(pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, j: (b, h, *zeros)))

    def kscale(x):
        return x.reshape(*x.shape[:-1], D // 4, 4) if k_mode == "channel" else x

    if k_mode != "none":
        add(kscale(cache.k_scale))
        if cache.k_zero is not None:
            add(kscale(cache.k_zero))
    add(_as_words(cache.v))
    v_scaled = spec.v.quantized
    if v_scaled:
        add(cache.v_scale)
        if cache.v_zero is not None:
            add(cache.v_zero)

    ns = cfg.num_splits
    kernel = functools.partial(
        _decode_kernel, kl=kl, vl=vl, k_mode=k_mode, k_zero=cache.k_zero is not None,
        v_scaled=v_scaled, v_zero=cache.v_zero is not None, block_k=cfg.block_k,
        num_splits=ns, precise=precise, v_fp16=cfg.v_fp16)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, H, ns),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, None, None, mp, D), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, mp), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, mp), lambda b, h, j: (b, h, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, ns, mp, D), jnp.float32),
            jax.ShapeDtypeStruct((B, H, ns, mp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, ns, mp), jnp.float32),
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
    o = o[..., np.argsort(np.asarray(vl.perm))]
    lse = jnp.where(l_tot > 0, m_tot + jnp.log(jnp.where(l_tot > 0, l_tot, 1.0)), -jnp.inf)
    o = o[:, :, :rows].reshape(B, H, T, G, D).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :rows].reshape(B, H, T, G).transpose(0, 2, 1, 3)
    return o, lse
