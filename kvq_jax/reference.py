"""Plain-jnp twins of the kernels: the oracle of the tests and the ``impl="xla"`` path.

Every function returns the *partial* result of attending to one segment of the
cache: the normalized output ``o`` and the log-sum-exp ``lse`` of the scaled
logits of each query row, both f32, so that segments merge exactly
(``attention.merge``). Query layout is grouped by KV head:
``qg: [B, T, Hkv, G, D]`` with query head ``h * G + g`` reading KV head ``h``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvq_jax import quant
from kvq_jax.cache import KVCache, segment_lengths

HIGHEST = jax.lax.Precision.HIGHEST
BODY = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")  # the body's leaves (token axis 2)


def merge(parts):
    """Merge segment partials ``[(o, lse), ...]`` by log-sum-exp.

    ``o: f32[..., D]`` normalized per segment, ``lse: f32[...]`` (-inf for an empty
    segment). Returns ``(o, lse)`` of the union; rows empty everywhere get o = 0.
    """
    lses = jnp.stack([lse for _, lse in parts])
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m_safe)  # exp(-inf) = 0 for empty segments
    tot = jnp.sum(w, axis=0)
    o = sum(wi[..., None] * oi for wi, (oi, _) in zip(w, parts))
    o = o / jnp.where(tot > 0, tot, 1.0)[..., None]
    lse = jnp.where(tot > 0, m_safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
    return o, lse


def masked_attention(qg, k, v, mask, scale):
    """Attention of grouped queries over one segment, f32.

    Args:
      qg: ``Float[Array, "B T Hkv G D"]`` queries.
      k, v: ``Float[Array, "B Hkv S D"]`` keys and values.
      mask: ``Bool[Array, "B T S"]``: key s is visible to query row t.
      scale: softmax scale (usually 1/sqrt(D)).

    Returns:
      ``o: f32[B, T, Hkv, G, D]`` (0 where a row sees nothing) and
      ``lse: f32[B, T, Hkv, G]`` (-inf where a row sees nothing).
    """
    s = jnp.einsum("bthgd,bhsd->bthgs", qg.astype(jnp.float32), k.astype(jnp.float32),
                   precision=HIGHEST) * scale
    m4 = mask[:, :, None, None, :]
    s = jnp.where(m4, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(m4, jnp.exp(s - mx_safe), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bthgs,bhsd->bthgd", p, v.astype(jnp.float32), precision=HIGHEST)
    o = o / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + mx_safe[..., 0], -jnp.inf)
    return o, lse


def dequantize_body(cache: KVCache, dtype=jnp.float32):
    """The whole quantized body as ``(k, v): [B, Hkv, S, D]`` in ``dtype`` (still rotated if the spec rotates)."""
    spec = cache.spec

    def deq(data, scale, zero, t):
        return quant.dequantize(quant.Quantized(data, scale, zero), t,
                                token_group=spec.token_group, dtype=dtype)

    k = deq(cache.k, cache.k_scale, cache.k_zero, spec.k)
    v = deq(cache.v, cache.v_scale, cache.v_zero, spec.v)
    return k, v


def body_block_size(cache: KVCache, block: int | None) -> int:
    """Body tokens per block of `body_attention`: the largest divisor of the body capacity
    S that is at most ``block`` and a multiple of every leaf's tokens per row (the token
    group of per-channel key scales); S itself when ``block`` is None or none exists."""
    S = int(cache.k.shape[2])
    if block is None or block >= S:
        return S
    rows = [S // int(x.shape[2]) for x in (getattr(cache, n) for n in BODY) if x is not None and x.shape[2]]
    g = math.lcm(*rows) if rows else 1
    for b in range(int(block) // g * g, 0, -g):
        if S % b == 0:
            return b
    return S


def body_attention(qg, cache: KVCache, qpos, scale, block: int | None = None):
    """Attention over the quantized body (reference: dequantize in f32, then attend).

    Args:
      qg: ``[B, T, Hkv, G, D]`` queries, already rotated when ``cache.spec.rotate``.
      cache: the KVCache.
      qpos: ``int32[B, T]`` absolute position of each query token (causal limit).
      scale: softmax scale.
      block: None dequantizes the whole body at once (memory ``T x S`` scores). An int
        runs over the filled blocks of about that many body tokens (`body_block_size`) with
        an online log-sum-exp merge in a loop: memory ``T x block``, for many
        query rows over a long cache (chunked prefill). Same result up to f32 rounding.

    Returns:
      ``(o, lse)`` as ``masked_attention``; o is in the rotated basis when the spec rotates.
    """
    _, q_len, _ = segment_lengths(cache.spec, cache.lengths)
    S = int(cache.k.shape[2])
    blk = body_block_size(cache, block)

    def piece(c, start):
        k, v = dequantize_body(c)
        j = start + jnp.arange(k.shape[2], dtype=jnp.int32)[None, None, :]
        mask = (j < q_len[:, None, None]) & (cache.spec.sinks + j <= qpos[:, :, None])
        return masked_attention(qg, k, v, mask, scale)

    if blk == S:
        return piece(cache, 0)

    def step(i, acc):
        start = i * blk
        leaves = {}
        for n in BODY:
            x = getattr(cache, n)
            if x is not None:
                r = S // x.shape[2]  # tokens per row of this leaf
                leaves[n] = jax.lax.dynamic_slice_in_dim(x, start // r, blk // r, axis=2)
        return merge([acc, piece(dataclasses.replace(cache, **leaves), start)])

    B, T, H, G, D = qg.shape
    init = (jnp.zeros((B, T, H, G, D), jnp.float32), jnp.full((B, T, H, G), -jnp.inf, jnp.float32))
    filled = (jnp.max(q_len) + blk - 1) // blk  # blocks past every sequence's body are skipped
    return jax.lax.fori_loop(0, jnp.minimum(filled, S // blk), step, init)
