"""Fused-dequant split-K decode attention over the quantized KV cache body.

One program per (sequence b, KV head h, split j) streams its share of the body
``[S, Dp]`` of that head once, in packed form, and computes all ``G * T`` query
rows of the head against it (padded to at least 16 rows for the tensor-core
dot). Partials ``(o, m, l)`` stay f32 and are merged across splits by
log-sum-exp in XLA.

Reading packed data: the body is viewed as uint32 words (a free bitcast of the
byte layout), 4 bytes per word, and unpacked with shifts in registers. A tile
of ``wr`` words and value slot ``c`` (``c < 8 / bits``) unpacks to ``[BK, 4, wr]``
values, reshaped to ``[BK, 4 * wr]`` whose column ``i * wr + w`` holds element
``c * Dp + 4 * (w0 + w) + i`` of the head vector (DESIGN.md's split packing). So
the kernel never shuffles: the wrapper permutes q's head_dim into that column
order once, and un-permutes the tiny output after. Such a tile is a *chunk*;
chunks never straddle a scale group, so scales apply per chunk:

* per-token key scales multiply the chunk's logits ``q·k_int`` (zero points add
  ``sum(q_chunk) * zero``);
* per-channel key scales (KIVI) multiply q (blocks are one token group long);
  zero points add ``q·zero`` per row;
* per-token value scales multiply the probabilities before ``p @ v_int`` (zero
  points add ``(p·zero)`` per row).

Dots take bf16 operands (integers up to 255 and fp8 values are exact in bf16)
and accumulate in f32. ``precise=True`` splits q and p into bf16 hi + lo parts
(two dots each) for results within f32 rounding of the reference; the default
rounds q and p to bf16 once, as flash-attention kernels do (error bound in
tests/test_kernel.py).
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
class Chunk:
    """A ``[BK, 4 * wr]`` tile: words ``[w0, w0 + wr)``, value slot ``c``, scale group ``group``."""

    c: int
    w0: int
    wr: int
    group: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the kernel reads one tensor (keys or values) of the body."""

    fmt: str
    bits: int
    signed: bool
    head_dim: int
    words: int  # uint32 words per token (0 for bf16)
    chunk: int  # elements per chunk
    chunks: tuple
    perm: tuple  # kernel column -> natural head_dim index

    @property
    def packed(self) -> bool:
        return self.fmt != "bf16"


def _pow2_divisor(n: int) -> int:
    return n & -n


def make_layout(t: TensorSpec, head_dim: int) -> Layout:
    """The kernel's chunking of a tensor stored as ``t`` with vectors of ``head_dim``."""
    D = head_dim
    if t.format == "bf16":
        if D != _pow2_divisor(D):
            raise NotImplementedError(f"head_dim: the kernel needs a power-of-two head_dim for bf16, got {D}")
        return Layout("bf16", 16, True, D, 0, D, (Chunk(0, 0, 0, 0),), tuple(range(D)))
    bits = t.bits
    dp = D * bits // 8
    if dp % 4:
        raise NotImplementedError(f"head_dim: {D} {t.format} values are {dp} bytes, not whole 32-bit words")
    g = t.group_size(D) if t.axis == "token" else D
    ce = _pow2_divisor(math.gcd(g, dp))
    if ce < 16:
        raise NotImplementedError(
            f"group: the kernel needs chunks of >= 16 elements; {t.format} group {g} with head_dim {D} gives {ce}")
    wr = ce // 4
    chunks, perm = [], []
    for c in range(8 // bits):
        for w0 in range(0, dp // 4, wr):
            start = c * dp + 4 * w0
            chunks.append(Chunk(c, w0, wr, start // g if t.axis == "token" else 0))
            perm += [start + 4 * w + i for i in range(4) for w in range(wr)]
    assert sorted(perm) == list(range(D))
    return Layout(t.format, bits, t.symmetric, D, dp // 4, ce, tuple(chunks), tuple(perm))


# -- in-kernel helpers --------------------------------------------------------

def _unpack(words, ch: Chunk, lay: Layout):
    """uint32 ``[BK, wr]`` -> bf16 ``[BK, 4 * wr]`` values of chunk ``ch`` (column order i * wr + w)."""
    bk = words.shape[0]
    w3 = jnp.broadcast_to(words[:, None, :], (bk, 4, ch.wr))
    shift = lax.broadcasted_iota(jnp.uint32, (1, 4, 1), 1) * 8 + jnp.uint32(lay.bits * ch.c)
    mask = jnp.uint32((1 << lay.bits) - 1)
    x = (w3 >> shift) & mask
    if lay.fmt == "fp8":
        val = lax.bitcast_convert_type(x.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
    else:
        xi = x.astype(jnp.int32)
        if lay.signed:
            half = 1 << (lay.bits - 1)
            xi = (xi ^ half) - half
        val = xi.astype(jnp.float32)
    return val.reshape(bk, 4 * ch.wr).astype(jnp.bfloat16)


def _perm_row(ref, row, ch: Chunk, lay: Layout):
    """Natural-order row segment of a per-channel scale -> the chunk's column order, f32 ``[4 * wr]``."""
    start = ch.c * lay.words * 4 + 4 * ch.w0
    seg = ref[row, pl.ds(start, 4 * ch.wr)].astype(jnp.float32)
    return seg.reshape(ch.wr, 4).T.reshape(4 * ch.wr)


def _dot(a, b_tile, precise: bool, trans_b: bool):
    """f32 ``a`` times bf16 tile ``b`` (transposed when ``trans_b``), f32 accumulate."""
    hi = a.astype(jnp.bfloat16)
    out = _compat.dot(hi, b_tile, trans_b=trans_b)
    if precise:
        lo = (a - hi.astype(jnp.float32)).astype(jnp.bfloat16)
        out = out + _compat.dot(lo, b_tile, trans_b=trans_b)
    return out


def _decode_kernel(*refs, kl: Layout, vl: Layout, k_mode: str, k_zero: bool, v_scaled: bool,
                   v_zero: bool, block_k: int, num_splits: int, precise: bool):
    it = iter(refs)
    q_ref = next(it)  # [Mp, D] f32: permuted (kl.perm), softmax scale folded in
    lim_ref = next(it)  # [Mp] int32: body tokens visible to each row
    k_ref = next(it)  # [S, words] uint32 | [S, D] bf16
    ks_ref = next(it) if k_mode != "none" else None  # [S, Gk] per token | [S/TG, D] per channel
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

    qs = [q_ref[:, pl.ds(i * kl.chunk, kl.chunk)] for i in range(len(kl.chunks))]
    qsum = [q.sum(axis=1) for q in qs] if (k_zero and k_mode == "token") else None

    def load_words(ref, start, ch, lay, cache):
        if not lay.packed:
            return ref[pl.ds(start, block_k), :]
        if ch.w0 not in cache:
            cache[ch.w0] = ref[pl.ds(start, block_k), pl.ds(ch.w0, ch.wr)]
        return cache[ch.w0]

    def tile(ref, start, ch, lay, cache):
        w = load_words(ref, start, ch, lay, cache)
        return _unpack(w, ch, lay) if lay.packed else w.astype(jnp.bfloat16)

    def body(blk, carry):
        os, m_prev, l_prev = carry
        start = pl.multiple_of(blk * block_k, block_k)
        pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = pos < lim[:, None]  # [Mp, BK]

        logits = jnp.zeros((mp, block_k), jnp.float32)
        zrow = jnp.zeros((mp,), jnp.float32)
        kcache, gcache = {}, {}
        for i, ch in enumerate(kl.chunks):
            kt = tile(k_ref, start, ch, kl, kcache)
            q = qs[i]
            if k_mode == "channel":  # one token group per block: scale q by the group's channel scales
                q = q * _perm_row(ks_ref, blk, ch, kl)[None, :]
                if k_zero:
                    zrow = zrow + (qs[i] * _perm_row(kz_ref, blk, ch, kl)[None, :]).sum(axis=1)
            part = _dot(q, kt, precise, trans_b=True)  # [Mp, BK]
            if k_mode == "token":
                if ch.group not in gcache:
                    s = ks_ref[pl.ds(start, block_k), ch.group].astype(jnp.float32)
                    z = kz_ref[pl.ds(start, block_k), ch.group].astype(jnp.float32) if k_zero else None
                    gcache[ch.group] = (s, z)
                s, z = gcache[ch.group]
                part = part * s[None, :]
                if k_zero:
                    part = part + qsum[i][:, None] * z[None, :]
            logits = logits + part
        if k_mode == "channel" and k_zero:
            logits = logits + zrow[:, None]

        logits = jnp.where(mask, logits, NEG_INF)
        m_new = jnp.maximum(m_prev, logits.max(axis=1))
        corr = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(logits - m_new[:, None]), 0.0)
        l_new = corr * l_prev + p.sum(axis=1)

        vcache, vgcache, new_os = {}, {}, []
        for i, ch in enumerate(vl.chunks):
            vt = tile(v_ref, start, ch, vl, vcache)
            pv = p
            extra = None
            if v_scaled:
                if ch.group not in vgcache:
                    s = vs_ref[pl.ds(start, block_k), ch.group].astype(jnp.float32)
                    z = vz_ref[pl.ds(start, block_k), ch.group].astype(jnp.float32) if v_zero else None
                    vgcache[ch.group] = (s, z)
                s, z = vgcache[ch.group]
                pv = p * s[None, :]
                if v_zero:
                    extra = (p * z[None, :]).sum(axis=1)[:, None]
            acc = corr[:, None] * os[i] + _dot(pv, vt, precise, trans_b=False)
            if extra is not None:
                acc = acc + extra
            new_os.append(acc)
        return tuple(new_os), m_new, l_new

    o0 = tuple(jnp.zeros((mp, vl.chunk), jnp.float32) for _ in vl.chunks)
    m0 = jnp.full((mp,), NEG_INF, jnp.float32)
    l0 = jnp.zeros((mp,), jnp.float32)
    os, m, l = lax.fori_loop(lo, hi, body, (o0, m0, l0))
    for i, o in enumerate(os):
        o_ref[:, pl.ds(i * vl.chunk, vl.chunk)] = o
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


def choose_config(cache: KVCache, rows: int) -> Config:
    """Heuristic launch config for this cache shape (B * Hkv * splits fills the SMs)."""
    spec = cache.spec
    S = cache.body_capacity
    if spec.channel_keys:
        block_k = spec.token_group
    else:
        block_k = 64 if cache.head_dim >= 256 or rows > 32 else 128
    block_k = min(block_k, _next_pow2(S))
    programs = cache.batch * cache.num_kv_heads
    nblk = -(-S // block_k)
    splits = 1
    while programs * splits < 2 * NUM_SMS and splits * 2 <= max(1, nblk // 4):
        splits *= 2
    return Config(block_k, splits)


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
        specs.append(pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, j: (b, h, 0, 0)))

    if k_mode != "none":
        add(cache.k_scale)
        if cache.k_zero is not None:
            add(cache.k_zero)
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
        num_splits=ns, precise=precise)
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
