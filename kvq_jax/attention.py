"""attend(q, cache): attention of new query tokens over a (quantized) KVCache.

The cache is split into segments — bf16 sinks, the quantized body, the bf16
residual window — each attended separately to a normalized output and a
log-sum-exp, then merged exactly by log-sum-exp in f32. Only the body needs a
kernel; the small bf16 segments run in XLA.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import quant, reference
from kvq_jax.cache import KVCache, is_traced, segment_lengths
from kvq_jax.reference import merge  # noqa: F401  (kvq_jax.attention.merge)

IMPLS = ("auto", "xla", "pallas")


def _check_q(q, cache: KVCache, *, appended: bool = True):
    """Argument errors of q against the cache; ``appended``: q's tokens are the cache's last T."""
    if not hasattr(q, "shape") or q.ndim != 4:
        raise ValueError(f"q: expected shape [B, T, Hq, D], got {getattr(q, 'shape', type(q))}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q: expected a floating dtype, got {q.dtype}")
    B, T, Hq, D = q.shape
    if B != cache.batch:
        raise ValueError(f"q: batch {B} does not match the cache's {cache.batch}")
    if D != cache.head_dim:
        raise ValueError(f"q: head_dim {D}, the cache has {cache.head_dim}")
    if Hq % cache.num_kv_heads:
        raise ValueError(f"q: {Hq} query heads is not a multiple of the cache's {cache.num_kv_heads} KV heads")
    if T > cache.max_len:
        raise ValueError(f"q: {T} query tokens exceed the cache's max_len {cache.max_len}")
    if appended and not is_traced(cache.lengths):
        short = np.nonzero(np.asarray(cache.lengths) < T)[0]
        if short.size:
            raise ValueError(
                f"q: {T} query tokens but sequences {short.tolist()} hold only "
                f"{np.asarray(cache.lengths)[short].tolist()} tokens; append k/v for the queries first")


def check_chunk(q, k, v, cache) -> None:
    """Argument errors of `attend_chunk`: q as `attend`'s (its tokens follow the cache),
    k and v ``[B, T, Hkv, D]`` matching q and the cache."""
    _check_q(q, cache, appended=False)
    B, T, _, D = q.shape
    want = (B, T, cache.num_kv_heads, D)
    if k.shape != want or v.shape != want:
        raise ValueError(f"k, v: expected shape {want}, got {k.shape} and {v.shape}")


def default_impl() -> str:
    """"pallas" on a GPU backend, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def resolve_interpret(interpret: bool | None) -> bool:
    """A kernel's ``interpret``: None is interpret mode off a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def resolve_impl(impl: str, page_table=None) -> str:
    """``impl`` checked against `IMPLS`, "auto" resolved by `default_impl`; reading through
    a ``page_table`` needs "pallas"."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = default_impl()
    if page_table is not None and impl != "pallas":
        raise ValueError(f"page_table: only impl='pallas' reads through a page table, got impl={impl!r}")
    return impl


def attend(
    q: jax.Array,
    cache: KVCache,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    scale: float | None = None,
    precise: bool = False,
    config=None,
    page_table=None,
) -> jax.Array:
    """Attention of ``q`` over everything in ``cache``.

    Args:
      q: ``Float[Array, "B T Hq D"]``: the queries of the last T tokens appended to
        each sequence (query t of sequence b sits at position lengths[b] - T + t and
        sees keys at positions <= its own: causal among themselves). Hq must be a
        multiple of Hkv (GQA; query head i reads KV head i // (Hq / Hkv)).
      cache: the layer's KVCache.
      impl: "xla" (plain jnp reference), "pallas" (fused-dequant kernel for the
        quantized body), "auto" (pallas on GPU, xla elsewhere).
      interpret: for impl="pallas": run the kernel in interpret mode. Default: True
        unless the backend is a GPU. False forces the compiled (Triton) path, so its
        lowering can be checked from a CPU machine.
      scale: softmax scale; default 1/sqrt(D).
      precise: for impl="pallas": split q and p into two 16-bit parts each (twice the
        dots) so the kernel matches the f32 reference to f32 rounding; by default they
        are rounded to 16 bits once, as flash-attention kernels do.
      config: for impl="pallas": a `kvq_jax.kernels.decode.Config` (block size, splits,
        warps, stages); default chosen per shape by `decode.choose_config`.
      page_table: for impl="pallas" over a paged cache (`kvq_jax.serve.PagedKVCache`,
        whose body is a pool of pages): its ``int32[B, max_pages]`` table, passed to the
        kernel. The xla path reads a contiguous body (`kvq_jax.serve.attend_paged`).

    Returns:
      ``[B, T, Hq, D]`` in q's dtype. Rows of sequences whose ``overflow`` flag is
      set are NaN.
    """
    impl = resolve_impl(impl, page_table)
    _check_q(q, cache)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attend(q, cache, page_table, impl=impl, interpret=interpret, scale=scale, precise=precise, config=config)


@partial(jax.jit, static_argnames=("impl", "interpret", "scale", "precise", "config"))
def _attend(q, cache, page_table, *, impl, interpret, scale, precise, config):
    """`attend` after its checks, compiled once per cache structure, shapes and options (run op
    by op, outside any jit, the xla path took several times longer)."""
    B, T, Hq, D = q.shape
    qg = q.astype(jnp.float32).reshape(B, T, cache.num_kv_heads, Hq // cache.num_kv_heads, D)
    qpos = cache.lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    parts = _cache_parts(qg, cache, qpos, scale, impl=impl, interpret=interpret, precise=precise, config=config,
                         page_table=page_table)
    o, _ = merge(parts) if len(parts) > 1 else parts[0]
    o = jnp.where(cache.overflow[:, None, None, None, None], jnp.nan, o)
    return o.reshape(B, T, Hq, D).astype(q.dtype)


def _cache_parts(qg, cache: KVCache, qpos, scale, *, impl, interpret=None, precise=False, config=None,
                 page_table=None, block=None):
    """``[(o, lse), ...]`` of grouped queries ``qg`` at absolute positions ``qpos`` over
    the cache's segments (sinks, quantized body, residual window), causal by ``qpos``."""
    spec = cache.spec
    n_sink, q_len, r_len = segment_lengths(spec, cache.lengths)
    parts = []

    # sinks: absolute positions [0, n_sink)
    if spec.sinks:
        j = jnp.arange(spec.sinks, dtype=jnp.int32)[None, None, :]
        mask = (j < n_sink[:, None, None]) & (j <= qpos[:, :, None])
        parts.append(reference.masked_attention(qg, cache.sink_k, cache.sink_v, mask, scale))

    # quantized body: absolute positions sinks + [0, q_len)
    st = spec.static  # calibrated per-channel scales (spec.StaticScales), folded in around the body
    q_body = qg
    if st is not None and st.k_scale is not None:
        q_body = q_body * jnp.asarray(st.array("k_scale"))[None, None, :, None, :]
    q_body = quant.rotate(q_body) if spec.rotate else q_body
    if impl == "xla":
        o_body, lse_body = reference.body_attention(q_body, cache, qpos, scale, block=block)
    else:
        from kvq_jax.kernels import decode  # the Pallas kernel

        interpret = resolve_interpret(interpret)
        paged = {} if page_table is None else {"page_table": page_table,
                                               "v_token_minor": getattr(cache, "v_token_minor", False),
                                               "v_pairs": getattr(cache, "v_pairs", False)}
        o_body, lse_body = decode.body_attention(q_body, cache, qpos, scale, interpret=interpret,
                                                precise=precise, config=config, **paged)
    if spec.rotate:
        o_body = quant.rotate(o_body, inverse=True)
    if st is not None:
        o_body, lse_body = unscale_body(qg, o_body, lse_body, st, scale)
    parts.append((o_body, lse_body))

    # residual: absolute positions sinks + q_len + [0, r_len)
    if cache.residual_capacity:
        j = jnp.arange(cache.residual_capacity, dtype=jnp.int32)[None, None, :]
        kpos = spec.sinks + q_len[:, None, None] + j
        mask = (j < r_len[:, None, None]) & (kpos <= qpos[:, :, None])
        parts.append(reference.masked_attention(qg, cache.res_k, cache.res_v, mask, scale))
    return parts


def attend_chunk(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, *, lengths=None,
                 scale: float | None = None, block: int | None = 2048, impl: str = "auto",
                 interpret: bool | None = None, precise: bool = False, config=None,
                 page_table=None) -> jax.Array:
    """Attention of a chunk of new tokens over the cache that precedes them and over themselves
    (chunked prefill): bounded memory for long contexts.

    The T tokens follow the ``cache.lengths[b]`` tokens the cache holds: every query sees
    the whole cache (the quantized past, sinks and bf16 window included) and, causally,
    the chunk's own full-precision ``k``, ``v`` — what a one-shot prefill sees, except
    that the past is quantized. Call it *before* appending the chunk. The quantized body
    is read by the fused-dequant kernel (``impl="pallas"``: rows in tiles of
    ``Config.row_tile``, each program streaming the body once up to its causal limit) or
    by plain XLA in blocks of about ``block`` tokens (``impl="xla"``: dequantized per
    block, merged by log-sum-exp in a loop over the filled blocks), so memory is
    ``T x block`` scores rather than ``T x context`` either way.

    Args:
      q: ``Float[Array, "B T Hq D"]`` queries of the chunk (positions ``lengths[b] + t``).
      k, v: ``Float[Array, "B T Hkv D"]`` the chunk's keys and values.
      cache: the layer's KVCache *before* this chunk; with ``page_table``, a paged cache
        (`kvq_jax.serve.attend_chunk_paged`).
      lengths: optional ``int[B]``: real tokens of each row of the chunk (right padding);
        keys past it are not seen. Default T.
      scale: softmax scale; default 1/sqrt(D).
      block: for impl="xla": body tokens per block (`reference.body_block_size`); None:
        the whole body at once.
      impl: "xla", "pallas" or "auto" (pallas on GPU, xla elsewhere), as in `attend`.
      interpret, precise, config: for impl="pallas", as in `attend`.
      page_table: for impl="pallas": the paged cache's ``int32[B, max_pages]`` table.

    Returns:
      ``[B, T, Hq, D]`` in q's dtype; NaN rows for sequences whose ``overflow`` is set.
    """
    impl = resolve_impl(impl, page_table)
    check_chunk(q, k, v, cache)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attend_chunk(q, k, v, cache, lengths, page_table, scale=scale, block=block, impl=impl,
                         interpret=interpret, precise=precise, config=config)


@partial(jax.jit, static_argnames=("scale", "block", "impl", "interpret", "precise", "config"))
def _attend_chunk(q, k, v, cache, lengths, page_table, *, scale, block, impl, interpret, precise, config):
    """`attend_chunk` after its checks, compiled once per structure, shapes and options."""
    B, T, Hq, D = q.shape
    H = cache.num_kv_heads
    qg = q.astype(jnp.float32).reshape(B, T, H, Hq // H, D)
    t = jnp.arange(T, dtype=jnp.int32)
    qpos = cache.lengths[:, None] + t[None, :]  # after everything in the cache: all of it visible
    parts = _cache_parts(qg, cache, qpos, scale, impl=impl, interpret=interpret, precise=precise, config=config,
                         page_table=page_table, block=block)
    n = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    mask = (t[None, None, :] <= t[None, :, None]) & (t[None, None, :] < n[:, None, None])  # [B, T, T]
    parts.append(reference.masked_attention(qg, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, scale))
    o, _ = merge(parts)
    o = jnp.where(cache.overflow[:, None, None, None, None], jnp.nan, o)
    return o.reshape(B, T, Hq, D).astype(q.dtype)


def unscale_body(qg, o, lse, static, scale):
    """Undo a spec's static per-channel shift and scale on the body's partial result.

    Keys were stored as ``(k - k_shift) / k_scale`` and the queries multiplied by
    ``k_scale``, so every body logit lacks ``scale * q . k_shift`` (the same for all
    keys of a query row: it moves the log-sum-exp only); values were stored as
    ``(v - v_shift) / v_scale``, so ``o = o' * v_scale + v_shift`` (rows sum to one).

    Args:
      qg: ``f32[B, T, Hkv, G, D]`` unscaled, unrotated queries.
      o, lse: the body's ``f32[B, T, Hkv, G, D]`` and ``f32[B, T, Hkv, G]``.
      static: the spec's `StaticScales`.
      scale: softmax scale.

    Returns:
      ``(o, lse)``; rows that see no body token keep ``lse = -inf`` and get ``o = 0``.
    """
    seen = jnp.isfinite(lse)
    if static.k_shift is not None:
        ks = jnp.asarray(static.array("k_shift"))[None, None, :, None, :]
        lse = lse + scale * jnp.sum(qg * ks, axis=-1)
    if static.v_scale is not None:
        o = o * jnp.asarray(static.array("v_scale"))[None, None, :, None, :]
    if static.v_shift is not None:
        o = o + jnp.asarray(static.array("v_shift"))[None, None, :, None, :]
    return jnp.where(seen[..., None], o, 0.0), jnp.where(seen, lse, -jnp.inf)
