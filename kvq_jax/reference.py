"""Plain-jnp twins of the kernels: the oracle of the tests and the ``impl="xla"`` path.

Every function returns the *partial* result of attending to one segment of the
cache: the normalized output ``o`` and the log-sum-exp ``lse`` of the scaled
logits of each query row, both f32, so that segments merge exactly
(``attention.merge``). Query layout is grouped by KV head:
``qg: [B, T, Hkv, G, D]`` with query head ``h * G + g`` reading KV head ``h``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvq_jax import quant
from kvq_jax.cache import KVCache, segment_lengths

HIGHEST = jax.lax.Precision.HIGHEST


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


def body_attention(qg, cache: KVCache, qpos, scale):
    """Attention over the quantized body (reference: dequantize in f32, then attend).

    Args:
      qg: ``[B, T, Hkv, G, D]`` queries, already rotated when ``cache.spec.rotate``.
      cache: the KVCache.
      qpos: ``int32[B, T]`` absolute position of each query token (causal limit).
      scale: softmax scale.

    Returns:
      ``(o, lse)`` as ``masked_attention``; o is in the rotated basis when the spec rotates.
    """
    k, v = dequantize_body(cache)
    _, q_len, _ = segment_lengths(cache.spec, cache.lengths)
    S = k.shape[2]
    j = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    mask = (j < q_len[:, None, None]) & (cache.spec.sinks + j <= qpos[:, :, None])
    return masked_attention(qg, k, v, mask, scale)
