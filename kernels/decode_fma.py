"""Split-K decode attention on CUDA cores (FMA, no tensor-core dot), for few query rows.

Same contract as `decode.body_attention`: one program per (sequence b, KV head h,
split j) streams its share of the body ``[S, Dp]`` of that head once, in packed
form, and computes the ``R = G * T`` query rows of the head against it; partials
``(o, m, l)`` stay f32 and are merged across splits by log-sum-exp in XLA.

In decode R is small (usually 4), so the work per byte read is tiny. Here the
logits and the output are broadcast-multiply-and-sum on CUDA cores: no tile is
ever moved into an MMA operand layout, and rows are padded only to a power of
two (at most 16; `decode.body_attention` is for more rows). Only the real rows
are computed; padding rows are written empty (o = 0, m = NEG_INF, l = 0).

Reading packed data (`fma_layout`): the body is viewed as uint32 words and cut
into byte-shift pieces (`decode.Piece` with ``i >= 0``): a ``[BK, wr]`` word tile
shifted by ``8 * i + bits * c``, column w holding element ``c * Dp + 4 * (w0 + w) + i``.
``wr`` is chosen so that no piece straddles a per-token scale group. The wrapper
permutes q's head_dim into the pieces' column order and un-permutes the output.
bf16 tensors are read in pieces of up to 32 columns, in head_dim order.

Integers become f32 without int->float conversion instructions: the biased value
u (< 2**bits) is OR-ed into the mantissa of 2**23 and ``2**23 + bias`` is subtracted
(exact). fp8 (e4m3) becomes fp16 by moving its bits (x * 2**-8, the 2**8 is folded
into the scale), then f32. Everything after the unpacking is f32.

Per block of BK tokens and query row r:

* keys: ``acc[r][grp] += q_piece[r] * x`` over the pieces of scale group grp
  (``[BK, wr]`` accumulators), one row sum per (row, group), then
  ``logit_r = sum_grp k_scale[:, grp] * rowsum (+ k_zero[:, grp] * sum(q_r over grp))``.
  Per-channel keys (KIVI): q's pieces are multiplied by the token group's channel
  scales once per block; zero points add ``q_r . zero_row`` to every logit.
* online softmax per row (running max and sum are scalars per row);
* values: ``o[r][piece] = corr_r * o[r][piece] + sum((p_r * v_scale[:, grp])[:, None] * x, 0)``;
  zero points add ``sum(p_r * v_zero[:, grp])`` to every column of the group.
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
from kvq_jax.kernels.decode import (
    NEG_INF,
    NUM_SMS,
    _XOR,
    Layout,
    Piece,
    _as_words,
    _channel_row,
    _next_pow2,
    _pow2_divisor,
    _to_float,
)
from kvq_jax.spec import TensorSpec

MAX_ROWS = 16  # query rows (T * G) per KV head this kernel takes; more: decode.body_attention
MAX_PIECE = 32  # widest piece (columns)


# -- layout -------------------------------------------------------------------

def fma_layout(t: TensorSpec, head_dim: int) -> Layout:
    """The FMA kernel's tiling of a tensor stored as ``t`` with vectors of ``head_dim``.

    Packed formats: byte-shift pieces (``Piece.i >= 0``) of ``wr`` words, ``wr`` the
    largest power of two with ``4 * wr`` dividing both the scale group (head_dim for
    per-channel scales) and the packed row ``Dp``, at most 32: the ``4 * wr`` elements
    a word tile holds lie in one scale group, so no piece straddles one
    (``Piece.segs`` has a single entry). Pieces are ordered by (c, w0, i), hence
    grouped by scale group. bf16: pieces of up to 32 columns in head_dim order.
    """
    D = head_dim
    if t.format == "bf16":
        if D != _pow2_divisor(D):
            raise NotImplementedError(f"head_dim: the kernel needs a power-of-two head_dim for bf16, got {D}")
        w = min(MAX_PIECE, D)
        pieces = tuple(Piece(0, 0, c0, w, ((0, 0, w),)) for c0 in range(0, D, w))
        return Layout("bf16", 16, True, D, 0, pieces, tuple(range(D)), "split")
    bits = t.bits
    dp = D * bits // 8
    if dp % 4:
        raise NotImplementedError(f"head_dim: {D} {t.format} values are {dp} bytes, not whole 32-bit words")
    words = dp // 4
    g = t.group_size(D) if t.axis == "token" else D
    span = _pow2_divisor(math.gcd(g, dp))  # elements of one word tile, all in one group
    if span < 4:
        raise NotImplementedError(
            f"group: the kernel needs scale groups of a multiple of 4 channels; {t.format} group {g} "
            f"with head_dim {D} gives word tiles of {span} elements")
    wr = min(span // 4, MAX_PIECE)
    pieces, perm = [], []
    for c in range(8 // bits):
        for w0 in range(0, words, wr):
            for i in range(4):
                elems = [c * dp + 4 * (w0 + w) + i for w in range(wr)]
                grp = elems[0] // g if t.axis == "token" else 0
                assert t.axis != "token" or all(e // g == grp for e in elems)
                pieces.append(Piece(c, i, w0, wr, ((grp, 0, wr),)))
                perm += elems
    assert sorted(perm) == list(range(D))
    return Layout(t.format, bits, t.symmetric, D, words, tuple(pieces), tuple(perm), "split")


def _groups(lay: Layout) -> dict:
    """Scale group -> indices of the pieces in it (insertion order = first piece order)."""
    out: dict = {}
    for n, pc in enumerate(lay.pieces):
        out.setdefault(pc.segs[0][0], []).append(n)
    return out


# -- in-kernel helpers --------------------------------------------------------

def _unpack_f32(words, pc: Piece, lay: Layout):
    """uint32 words ``[BK, wr]`` (pre-XOR-ed when signed) -> f32 values ``[BK, wr]`` of ``pc``.

    Integers: magic number, ``bitcast(u | 0x4B000000) - (2**23 + bias)`` (exact, no
    int->float conversion). fp8: `decode._to_float` (the result is x * 2**-8).
    """
    shift = 8 * pc.i + lay.bits * pc.c
    x = words >> jnp.uint32(shift) if shift else words
    if lay.fmt == "fp8":
        return _to_float(x, lay, jnp.float32)
    if shift + lay.bits < 32:
        x = x & jnp.uint32((1 << lay.bits) - 1)
    bias = (1 << (lay.bits - 1)) if lay.signed else 0
    return lax.bitcast_convert_type(x | jnp.uint32(0x4B000000), jnp.float32) - jnp.float32(2 ** 23 + bias)


def _fma_kernel(*refs, kl: Layout, vl: Layout, k_mode: str, k_zero: bool, v_scaled: bool, v_zero: bool,
                rows: int, block_k: int, num_splits: int, page_size: int | None, token_group: int):
    # refs of the body are [S, ...] per (b, h); paged (page_size set): pools [P, page, ...]
    it = iter(refs)
    q_ref = next(it)  # [Mp, D] f32: columns in kl.perm order, softmax scale folded in
    lim_ref = next(it)  # [Mp] int32: body tokens visible to each row
    pt_ref = next(it) if page_size else None  # [max_pages] int32: page of each page_size stream slots
    k_ref = next(it)  # [S, words] uint32 | [S, D] bf16
    ks_ref = next(it) if k_mode != "none" else None  # [S, Gk] per token | [S/TG, D/4, 4] per channel
    kz_ref = next(it) if k_zero else None  # same shape as ks_ref
    v_ref = next(it)  # [S, words] uint32 | [S, D] bf16
    vs_ref = next(it) if v_scaled else None  # [S, Gv]
    vz_ref = next(it) if v_zero else None  # [S, Gv]
    o_ref, m_ref, l_ref = next(it), next(it), next(it)  # [Mp, D] f32 (vl.perm order), [Mp] f32, [Mp] f32

    mp, D = q_ref.shape
    j = pl.program_id(2)
    lims = [lim_ref[r] for r in range(rows)]  # scalars
    nblk = (functools.reduce(jnp.maximum, lims) + block_k - 1) // block_k
    per_split = (nblk + num_splits - 1) // num_splits
    lo = j * per_split
    hi = jnp.minimum(nblk, lo + per_split)
    k_fix = 256.0 if kl.fmt == "fp8" else 1.0  # _unpack_f32 gives e4m3 values * 2**-8
    v_fix = 256.0 if vl.fmt == "fp8" else 1.0
    kgroups, vgroups = _groups(kl), _groups(vl)
    tg = token_group

    # q columns of each key piece, per row: kq[r][n] f32[wr] (loaded once, before the loop)
    kq = [[q_ref[r, pl.ds(off, pc.width)] for off, pc in zip(kl.offsets(), kl.pieces)] for r in range(rows)]
    qsum = None
    if k_zero and k_mode == "token":  # sum of q_r over each scale group's columns
        qsum = [{g: sum(jnp.sum(kq[r][n]) for n in ns) for g, ns in kgroups.items()} for r in range(rows)]
    pos0 = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def tile(ref, at, pc, lay, cache):
        """f32 ``[BK, wr]`` values of piece ``pc`` in this block; packed words are loaded once
        per word range (``cache``) and pre-XOR-ed when signed."""
        if not lay.packed:
            return ref[(*at, pl.ds(pc.w0, pc.wr))].astype(jnp.float32)
        if pc.w0 not in cache:
            w = ref[(*at, pl.ds(pc.w0, pc.wr))]
            if lay.signed and lay.fmt != "fp8":
                w = w ^ jnp.uint32(_XOR[lay.bits])
            cache[pc.w0] = w
        return _unpack_f32(cache[pc.w0], pc, lay)

    def col_scale(ref, at, grp, cache, key, fix=1.0):
        """f32 ``[BK]`` scale (or zero) column ``grp`` of this block (times ``fix``): the block's
        ``[BK, groups]`` tile is loaded once, contiguously, and columns are picked in registers."""
        if (key, grp) not in cache:
            ngroups = ref.shape[-1]
            if (key, "tile") not in cache:
                cache[(key, "tile")] = ref[(*at, slice(None))].astype(jnp.float32)
            tile_ = cache[(key, "tile")]
            if ngroups == 1:
                col = tile_.reshape(block_k)
            else:
                idx = lax.broadcasted_iota(jnp.int32, (1, ngroups), 1)
                col = jnp.sum(jnp.where(idx == grp, tile_, 0.0), axis=1)
            cache[(key, grp)] = col * fix if fix != 1.0 else col
        return cache[(key, grp)]

    def body(blk, carry):
        os, ms, ls = carry  # os[r][n]: f32[width]; ms[r], ls[r]: f32 scalars
        start = pl.multiple_of(blk * block_k, block_k)
        if page_size:  # the block lies in one page (page_size % block_k == 0)
            page = pt_ref[start // page_size]
            row = pl.multiple_of(start % page_size, block_k)
            at, grp_at = (page, pl.ds(row, block_k)), (page, row // tg)
        else:
            at, grp_at = (pl.ds(start, block_k),), (start // tg,)
        pos = start + pos0  # [BK]
        sc = {}

        # logits: per-channel keys scale q once per block (the block lies in one token group)
        qk, zq = kq, None
        if k_mode == "channel":
            qk = [[None] * len(kl.pieces) for _ in range(rows)]
            zq = [None] * rows
            for n, pc in enumerate(kl.pieces):
                base = pc.c * kl.words + pc.w0
                srow = _channel_row(ks_ref, grp_at, base, pc)  # [wr]
                zrow = _channel_row(kz_ref, grp_at, base, pc) if k_zero else None
                for r in range(rows):
                    qk[r][n] = kq[r][n] * srow
                    if k_zero:
                        z = jnp.sum(kq[r][n] * zrow)
                        zq[r] = z if zq[r] is None else zq[r] + z
        acc = {}  # (r, grp) -> f32[BK, wr]
        wc = {}
        for n, pc in enumerate(kl.pieces):
            x = tile(k_ref, at, pc, kl, wc)  # [BK, wr]
            grp = pc.segs[0][0]
            for r in range(rows):
                t = qk[r][n][None, :] * x
                acc[(r, grp)] = t if (r, grp) not in acc else acc[(r, grp)] + t
        logits = []
        for r in range(rows):
            lg = None
            for grp in kgroups:
                s = jnp.sum(acc[(r, grp)], axis=1)  # [BK]
                if k_mode == "token":
                    s = s * col_scale(ks_ref, at, grp, sc, "ks", k_fix)
                    if k_zero:
                        s = s + qsum[r][grp] * col_scale(kz_ref, at, grp, sc, "kz")
                lg = s if lg is None else lg + s
            if zq is not None:
                lg = lg + zq[r]
            logits.append(lg)

        # online softmax, one row at a time
        ps, corrs, new_ms, new_ls = [], [], [], []
        for r in range(rows):
            mask = pos < lims[r]
            lg = jnp.where(mask, logits[r], NEG_INF)
            m_new = jnp.maximum(ms[r], jnp.max(lg))
            corr = jnp.exp(ms[r] - m_new)
            p = jnp.where(mask, jnp.exp(lg - m_new), 0.0)  # [BK]
            ps.append(p)
            corrs.append(corr)
            new_ms.append(m_new)
            new_ls.append(corr * ls[r] + jnp.sum(p))

        # values: p times the scale column of each group, once per (row, group)
        pv, zv = {}, {}
        for r in range(rows):
            for grp in vgroups:
                if v_scaled:
                    pv[(r, grp)] = ps[r] * col_scale(vs_ref, at, grp, sc, "vs", v_fix)
                    if v_zero:
                        zv[(r, grp)] = jnp.sum(ps[r] * col_scale(vz_ref, at, grp, sc, "vz"))
                else:
                    pv[(r, grp)] = ps[r]
        new_os = [[None] * len(vl.pieces) for _ in range(rows)]
        wc = {}
        for n, pc in enumerate(vl.pieces):
            x = tile(v_ref, at, pc, vl, wc)  # [BK, wr]
            grp = pc.segs[0][0]
            for r in range(rows):
                part = jnp.sum(pv[(r, grp)][:, None] * x, axis=0)  # [wr]
                if v_zero:
                    part = part + zv[(r, grp)]
                new_os[r][n] = corrs[r] * os[r][n] + part
        return tuple(tuple(o) for o in new_os), tuple(new_ms), tuple(new_ls)

    o0 = tuple(tuple(jnp.zeros((pc.width,), jnp.float32) for pc in vl.pieces) for _ in range(rows))
    m0 = tuple(jnp.full((), NEG_INF, jnp.float32) for _ in range(rows))
    l0 = tuple(jnp.zeros((), jnp.float32) for _ in range(rows))
    os, ms, ls = lax.fori_loop(lo, hi, body, (o0, m0, l0))

    for r in range(rows):
        for off, pc, o in zip(vl.offsets(), vl.pieces, os[r]):
            o_ref[r, pl.ds(off, pc.width)] = o
    for r in range(rows, mp):  # padding rows
        o_ref[r, pl.ds(0, D)] = jnp.zeros((D,), jnp.float32)
    ridx = lax.broadcasted_iota(jnp.int32, (mp,), 0)
    m_vec = jnp.full((mp,), NEG_INF, jnp.float32)
    l_vec = jnp.zeros((mp,), jnp.float32)
    for r in range(rows):
        m_vec = jnp.where(ridx == r, ms[r], m_vec)
        l_vec = jnp.where(ridx == r, ls[r], l_vec)
    m_ref[...] = m_vec
    l_ref[...] = l_vec


# -- wrapper ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FmaConfig:
    """Launch configuration of the FMA kernel: tokens per block, sequence splits, warps, pipeline stages."""

    block_k: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


def choose_fma_config(spec, programs: int, S: int, rows: int = 4) -> FmaConfig:
    """Heuristic launch config (as `decode._choose`): B * Hkv * splits fills the SMs.

    Args:
      spec: the KVSpec.
      programs: ``B * Hkv``.
      S: body tokens per sequence (capacity, or pages * page size).
      rows: query rows ``T * G``. The per-row ``[BK, wr]`` key accumulators bound
        block_k: ``block_k * rows <= 256``, between 16 and 64; with per-channel keys
        block_k also divides the token group (a block lies in one group).

    Returns:
      FmaConfig with 4 warps and 3 pipeline stages.
    """
    block_k = max(16, min(64, 256 // max(1, _next_pow2(rows))))
    if spec.channel_keys:
        block_k = min(block_k, _pow2_divisor(spec.token_group))
    block_k = min(block_k, _next_pow2(S))
    nblk = -(-S // block_k)
    splits = 1
    while programs * splits < 4 * NUM_SMS and splits * 2 <= max(1, nblk // 4):
        splits *= 2
    return FmaConfig(block_k, splits, num_warps=4, num_stages=3)


def body_attention_fma(qg, cache: KVCache, qpos, scale, *, interpret: bool, config: FmaConfig | None = None,
                       page_table: jax.Array | None = None):
    """FMA twin of `decode.body_attention` (and of ``reference.body_attention``): ``(o, lse)`` over the body.

    Args:
      qg: ``f32[B, T, Hkv, G, D]`` queries (rotated when the spec rotates); ``T * G <= 16``.
      cache: the KVCache; with ``page_table``, any object with ``spec``, ``lengths``
        (``int32[B]``) and page pools named like KVCache's body: ``k, v: [P, Hkv, page, Dp]``,
        ``k_scale, k_zero, v_scale, v_zero`` (None where the spec has none;
        ``[P, Hkv, page, D / group]`` per token, ``[P, Hkv, page / TG, D]`` per channel).
      qpos: ``int32[B, T]`` absolute query positions (causal limit per row).
      scale: softmax scale.
      interpret: run in Pallas interpret mode (CPU); False lowers with Triton.
      config: launch configuration; default `choose_fma_config`.
      page_table: ``int32[B, max_pages]``: body stream slot ``s`` of sequence ``b`` lives in
        page ``page_table[b, s // page]``, row ``s % page``. None: ``cache`` is contiguous.

    Returns:
      ``o: f32[B, T, Hkv, G, D]`` (normalized), ``lse: f32[B, T, Hkv, G]``.
    """
    spec = cache.spec
    B, T, H, G, D = qg.shape
    rows = T * G
    if rows > MAX_ROWS:
        raise ValueError(f"qg: T * G = {T} * {G} = {rows} query rows per KV head; the FMA kernel takes at "
                         f"most {MAX_ROWS} (use decode.body_attention for more)")
    mp = _next_pow2(rows)
    page_size = None
    if page_table is None:
        S = cache.body_capacity
    else:
        page_size = cache.k.shape[2]
        if page_table.ndim != 2 or page_table.shape[0] != B or page_table.dtype != jnp.int32:
            raise ValueError(f"page_table: expected int32[{B}, max_pages], "
                             f"got {page_table.dtype}{list(page_table.shape)}")
        S = page_table.shape[1] * page_size
    cfg = config or choose_fma_config(spec, B * H, S, rows)
    kl, vl = fma_layout(spec.k, D), fma_layout(spec.v, D)
    if spec.channel_keys and spec.token_group % cfg.block_k:
        raise ValueError(f"config: block_k {cfg.block_k} must divide token_group={spec.token_group} "
                         "for per-channel keys")
    if (page_size or S) % cfg.block_k:
        what = f"the page size {page_size}" if page_size else f"the body capacity {S}"
        raise ValueError(f"config: block_k {cfg.block_k} must divide {what}")

    # rows r = t * G + g, padded to mp; softmax scale folded into q; columns in kl.perm order
    q = jnp.transpose(qg.astype(jnp.float32), (0, 2, 1, 3, 4)).reshape(B, H, rows, D) * scale
    q = jnp.pad(q, ((0, 0), (0, 0), (0, mp - rows), (0, 0)))
    if not kl.identity:
        q = q[..., np.asarray(kl.perm)]
    _, q_len, _ = segment_lengths(spec, cache.lengths)
    vis = jnp.clip(qpos - spec.sinks + 1, 0, q_len[:, None])  # [B, T]
    lim = jnp.pad(jnp.repeat(vis, G, axis=1), ((0, 0), (0, mp - rows))).astype(jnp.int32)  # [B, Mp]

    k_mode = "none" if not spec.k.quantized else spec.k.axis
    args = [q, lim]
    specs = [
        pl.BlockSpec((None, None, mp, D), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, mp), lambda b, h, j: (b, 0)),
    ]
    if page_size:  # padded to a power of two (Triton block shapes); padding is never read
        maxp = _next_pow2(page_table.shape[1])
        args.append(jnp.pad(page_table, ((0, 0), (0, maxp - page_table.shape[1]))))
        specs.append(pl.BlockSpec((None, maxp), lambda b, h, j: (b, 0)))

    def add(x):
        args.append(x)
        zeros = (0,) * (x.ndim - 2)
        if page_size:  # the whole pool of head h: [P, page, ...]
            specs.append(pl.BlockSpec((x.shape[0], None, *x.shape[2:]), lambda b, h, j: (0, h, *zeros)))
        else:
            specs.append(pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, j: (b, h, *zeros)))

    def kscale(x):
        return x.reshape(*x.shape[:-1], D // 4, 4) if k_mode == "channel" else x

    add(_as_words(cache.k))
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
        _fma_kernel, kl=kl, vl=vl, k_mode=k_mode, k_zero=cache.k_zero is not None, v_scaled=v_scaled,
        v_zero=cache.v_zero is not None, rows=rows, block_k=cfg.block_k, num_splits=ns,
        page_size=page_size, token_group=spec.token_group)
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
        name=f"kvq_decode_fma_{spec.k.format}_{spec.v.format}",
    )(*args)

    # merge the splits (f32 log-sum-exp), un-permute V's columns, back to [B, T, H, G, D]
    m_tot = jnp.max(m, axis=2)
    w = jnp.where(l > 0, jnp.exp(m - m_tot[:, :, None]), 0.0)
    l_tot = jnp.sum(w * l, axis=2)
    o = jnp.sum(w[..., None] * o, axis=2) / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]
    if not vl.identity:
        o = o[..., np.argsort(np.asarray(vl.perm))]
    lse = jnp.where(l_tot > 0, m_tot + jnp.log(jnp.where(l_tot > 0, l_tot, 1.0)), -jnp.inf)
    o = o[:, :, :rows].reshape(B, H, T, G, D).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :rows].reshape(B, H, T, G).transpose(0, 2, 1, 3)
    return o, lse
