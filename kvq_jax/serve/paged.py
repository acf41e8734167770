"""PagedKVCache: the quantized body of many sequences in one pool of fixed-size pages.

Storage of one layer (compare `kvq_jax.cache.KVCache`, whose semantics it keeps):

* pool ``k: [num_pages, Hkv, page_size, Dp]`` and ``v: [num_pages, Hkv, Dp, page_size]``
  (values tokens-minor: each channel's tokens of a page contiguous, the order in which
  ``p @ v`` contracts, so the decode kernel loads value tiles without gathering bytes;
  BENCHMARKS.md, run I; sub-byte values with each 16 tokens of a page in pairs,
  `kvq_jax.quant.pair_slot`: ``v_pairs``, BENCHMARKS.md run R) with scales and zero points
  ``k_scale, k_zero, v_scale, v_zero`` (None where the spec has none): per-token scales
  ``[num_pages, Hkv, page_size, D / group]``, per-channel key scales
  ``[num_pages, Hkv, page_size / token_group, D]``. Dtypes as KVCache's body.
* ``page_table: int32[B, max_pages]``: body stream slot ``s`` of sequence ``b``
  (the token at absolute position ``sinks + s``) lives at page
  ``page_table[b, s // page_size]``, row ``s % page_size``. ``-1`` marks a table
  entry with no page.
* per sequence, as in KVCache: the bf16 residual window ``res_k, res_v: [B, Hkv, R, D]``,
  the bf16 sinks ``sink_k, sink_v: [B, Hkv, sinks, D]``, ``lengths: int32[B]``
  (tokens appended) and ``overflow: bool[B]``.

Which token lives in the sinks, the body or the residual window is exactly as in
`kvq_jax.cache` (`segment_lengths`): a paged cache and a contiguous cache fed the same
tokens hold the same bytes, only at different addresses (`contiguous_view` gathers them).

Capacity: a sequence can hold as many body tokens as the pages its table row names,
from entry 0 on. `append_paged` past that raises ValueError on concrete arrays; under
``jit`` the sequence's ``overflow`` flag is set, none of that call's tokens of that
sequence are written (no page is ever written outside the sequence's own pages) and
`attend_paged` returns NaN rows for it.

Pages are handed out by `kvq_jax.serve.allocator.PageAllocator` on the host.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import attention, quant
from kvq_jax import sharding as _sharding
from kvq_jax.cache import (
    KVCache,
    _check_kv,
    _is_concrete,
    append_window,
    check_finite,
    residual_capacity,
    segment_lengths,
    tokens_to_append,
    write_impl,
    write_units,
)
from kvq_jax.spec import KVSpec

_BODY = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")
TOKEN_MINOR = ("v",)  # pool leaves stored [P, Hkv, X, page]: tokens minor


def value_pairs(spec: KVSpec) -> bool:
    """Whether a paged pool of ``spec`` stores its values' tokens in pairs (`PagedKVCache.v_pairs`):
    sub-byte integer values. Measured (paged B=16 S=32K, pages of 64, tokens-minor without and with
    pairs, BENCHMARKS.md run R): int4 263.3 -> 246.0 us, int4-rot 435.8 -> 387.9, k8v4 407.1 ->
    366.4, int2 496.0 -> 402.4."""
    return spec.v.quantized and spec.v.format in ("int4", "int2")


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "k", "k_scale", "k_zero", "v", "v_scale", "v_zero",
        "res_k", "res_v", "sink_k", "sink_v", "page_table", "lengths", "overflow",
    ],
    meta_fields=["spec", "page_size", "head_dim"],
)
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """One layer's paged KV cache (see the module docstring for the layout).

    Leaves: pool ``k, k_scale, k_zero, v, v_scale, v_zero`` (``[num_pages, Hkv, ...]``; ``v``
    tokens-minor, ``[num_pages, Hkv, Dp, page_size]``),
    ``res_k, res_v, sink_k, sink_v`` (``[B, Hkv, ., D]`` bf16), ``page_table: int32[B,
    max_pages]``, ``lengths: int32[B]``, ``overflow: bool[B]``. Static: ``spec``,
    ``page_size``, ``head_dim``.
    """

    k: jax.Array
    k_scale: jax.Array | None
    k_zero: jax.Array | None
    v: jax.Array
    v_scale: jax.Array | None
    v_zero: jax.Array | None
    res_k: jax.Array
    res_v: jax.Array
    sink_k: jax.Array
    sink_v: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    overflow: jax.Array
    spec: KVSpec
    page_size: int
    head_dim: int

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def v_token_minor(self) -> bool:
        """The value pool is stored tokens-minor, ``[num_pages, Hkv, Dp, page_size]``
        (`kvq_jax.kernels.decode.body_attention`'s ``v_token_minor``)."""
        return "v" in TOKEN_MINOR

    @property
    def v_pairs(self) -> bool:
        """The value pool's token axis holds its tokens in pairs (`kvq_jax.quant.pair_slot`: in each
        16 tokens of a page, tokens ``j`` and ``j + 8`` side by side): sub-byte values
        (`kvq_jax.kernels.decode.body_attention`'s ``v_pairs``)."""
        return value_pairs(self.spec)

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @property
    def body_capacity(self) -> int:
        """Body slots one sequence can address: ``max_pages * page_size``."""
        return self.max_pages * self.page_size

    @property
    def residual_capacity(self) -> int:
        return self.res_k.shape[2]

    @property
    def max_len(self) -> int:
        """Most tokens a sequence can hold with every table entry assigned."""
        return self.spec.sinks + self.body_capacity + self.residual_capacity

    @property
    def nbytes(self) -> int:
        """Bytes held by all leaves (the whole pool, tables and per-sequence windows)."""
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))


def pool_shapes(spec: KVSpec | str, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> dict:
    """``{name: (shape, dtype)}`` of the pool leaves (None where the spec has no such leaf)."""
    spec = KVSpec.parse(spec)
    P, H, D = int(num_pages), int(num_kv_heads), int(head_dim)
    sdt = quant.scale_dtype_of(spec.scale_dtype)
    out = {}
    for name, t in (("k", spec.k), ("v", spec.v)):
        rows = (page_size, quant.packed_dim(t, D))
        out[name] = ((P, H, *(rows[::-1] if name in TOKEN_MINOR else rows)), quant.storage_dtype(t))
        if not t.quantized:
            out[name + "_scale"] = out[name + "_zero"] = None
            continue
        if t.axis == "token":
            sshape = (P, H, page_size, D // t.group_size(D))
        else:
            sshape = (P, H, page_size // spec.token_group, D)
        out[name + "_scale"] = (sshape, sdt)
        out[name + "_zero"] = None if t.symmetric else (sshape, sdt)
    return out


def page_bytes(spec: KVSpec | str, page_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one page of one layer (data, scales and zero points)."""
    tot = 0
    for v in pool_shapes(spec, 1, page_size, num_kv_heads, head_dim).values():
        if v is not None:
            tot += int(np.prod(v[0])) * jnp.dtype(v[1]).itemsize
    return tot


def check_page_size(spec: KVSpec, page_size) -> int:
    """``page_size`` as an int, or ValueError: it must be a positive multiple of 16 and of the spec's token group."""
    g = int(np.lcm(16, spec.token_group)) if spec.channel_keys else 16
    if not isinstance(page_size, (int, np.integer)) or page_size <= 0 or page_size % g:
        raise ValueError(f"page_size: expected a positive multiple of {g}, got {page_size!r}")
    return int(page_size)


def init_paged_cache(
    spec: KVSpec | str,
    batch: int,
    num_pages: int,
    page_size: int,
    max_pages: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.bfloat16,
    page_table=None,
) -> PagedKVCache:
    """An empty paged cache: a pool of ``num_pages`` pages and ``batch`` table rows.

    Args:
      spec: a KVSpec or preset name.
      batch: table rows (sequences).
      num_pages: pages in the pool.
      page_size: tokens per page; a multiple of 16 and of the spec's token group. The
        Pallas kernel reads blocks within one page (at most the largest power of two that
        divides page_size), so pages under its default block of 32-128 tokens cost kernel time.
      max_pages: table entries per sequence (a sequence holds at most
        ``max_pages * page_size`` body tokens).
      num_kv_heads, head_dim: Hkv and D.
      dtype: dtype of the residual window and sinks (bf16 by default).
      page_table: optional ``int[batch, max_pages]`` initial table (-1: no page);
        default all -1.

    Returns:
      a PagedKVCache with lengths 0.
    """
    spec = KVSpec.parse(spec)
    for name, val in (("batch", batch), ("num_pages", num_pages), ("max_pages", max_pages),
                      ("num_kv_heads", num_kv_heads)):
        if not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    page_size = check_page_size(spec, page_size)
    spec.validate_head_dim(head_dim)
    if spec.static is not None:
        spec.static.check(num_kv_heads, head_dim)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    B, H, D = int(batch), int(num_kv_heads), int(head_dim)
    if page_table is None:
        table = jnp.full((B, int(max_pages)), -1, jnp.int32)
    else:
        table = check_page_table(page_table, B, int(max_pages), int(num_pages))
    leaves = {n: None if s is None else jnp.zeros(*s)
              for n, s in pool_shapes(spec, num_pages, page_size, H, D).items()}
    R = residual_capacity(spec)
    return PagedKVCache(
        **leaves,
        res_k=jnp.zeros((B, H, R, D), dtype), res_v=jnp.zeros((B, H, R, D), dtype),
        sink_k=jnp.zeros((B, H, spec.sinks, D), dtype), sink_v=jnp.zeros((B, H, spec.sinks, D), dtype),
        page_table=table, lengths=jnp.zeros((B,), jnp.int32), overflow=jnp.zeros((B,), bool),
        spec=spec, page_size=page_size, head_dim=D,
    )


def check_page_table(page_table, batch: int, max_pages: int, num_pages: int) -> jax.Array:
    """Validate a concrete page table (``int[batch, max_pages]``, entries in [-1, num_pages)) -> int32 array."""
    t = np.asarray(page_table)
    if t.shape != (batch, max_pages) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"page_table: expected int[{batch}, {max_pages}], got {t.dtype}{list(t.shape)}")
    if t.size and (t.min() < -1 or t.max() >= num_pages):
        raise ValueError(f"page_table: entries must lie in [-1, {num_pages}), got [{t.min()}, {t.max()}]")
    used = t[t >= 0]
    if len(np.unique(used)) != len(used):
        raise ValueError("page_table: a page is named twice (in one row or by two sequences)")
    return jnp.asarray(t, jnp.int32)


def set_page_table(cache: PagedKVCache, page_table) -> PagedKVCache:
    """The cache with a new page table (validated when concrete)."""
    if _is_concrete(page_table):
        page_table = check_page_table(page_table, cache.batch, cache.max_pages, cache.num_pages)
    return dataclasses.replace(cache, page_table=jnp.asarray(page_table, jnp.int32))


# ----------------------------------------------------------------------------- addressing


def _gather_pages(pool, table, token_minor: bool = False, pairs: bool = False):
    """The pages of each sequence in table order: pool ``[P, H, rows, X]`` (``[P, H, X, rows]``
    when ``token_minor``; rows in pairs with ``pairs``) -> ``[B, H, max_pages * rows, X]``.

    Entries without a page (-1) read page 0 (unreachable: past the sequence's body length).
    """
    g = pool[jnp.clip(table, 0, pool.shape[0] - 1)]  # [B, MP, H, rows, X] ([B, MP, H, X, rows])
    if pairs:  # row t of each page from its slot
        axis = -1 if token_minor else -2
        g = jnp.take(g, quant.pair_slot(np.arange(g.shape[axis])), axis=axis)
    if token_minor:
        g = jnp.swapaxes(g, -1, -2)
    B, MP, H, rows, X = g.shape
    return jnp.transpose(g, (0, 2, 1, 3, 4)).reshape(B, H, MP * rows, X)


def _pool_layout(cache: PagedKVCache, name: str) -> tuple[bool, bool]:
    """``(token_minor, pairs)`` of pool leaf ``name``: how `append_paged` writes it and
    `_gather_pages` reads it."""
    return name in TOKEN_MINOR, name == "v" and cache.v_pairs


def contiguous_view(cache: PagedKVCache) -> KVCache:
    """The same tokens as a contiguous `KVCache` (body gathered through the page table).

    Its body has ``max_pages * page_size`` slots; slots of table entries without a page
    hold unreachable bytes. ``kvq.attend`` over it is the reference of `attend_paged`.
    """
    body = {}
    for name in _BODY:
        x = getattr(cache, name)
        body[name] = None if x is None else _gather_pages(x, cache.page_table, *_pool_layout(cache, name))
    return KVCache(
        **body, res_k=cache.res_k, res_v=cache.res_v, sink_k=cache.sink_k, sink_v=cache.sink_v,
        lengths=cache.lengths, overflow=cache.overflow, spec=cache.spec, max_len=cache.max_len,
        head_dim=cache.head_dim)


def pages_needed(spec: KVSpec, n_tokens: int, page_size: int) -> int:
    """Pages the quantized body of a sequence of ``n_tokens`` tokens occupies (host int)."""
    _, q, _ = segment_lengths(spec, np.asarray([int(n_tokens)], np.int32))
    return int(-(-int(q[0]) // int(page_size)))


# ----------------------------------------------------------------------------- write


def append_paged(cache: PagedKVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *,
                 impl: str = "auto", interpret: bool | None = None) -> PagedKVCache:
    """Append ``k, v: [B, T, Hkv, D]`` at each sequence's own length, through its page table.

    Same semantics as `kvq.append` (sinks, residual window, KIVI groups, rounding to
    the cache dtype first, per-channel static scales, rotation); the quantized tokens
    go to the pages the table names.

    Args:
      cache: the layer's PagedKVCache.
      k, v: new keys and values (any float dtype; quantized in f32).
      lengths: optional ``int[B]``: append only the first ``lengths[b]`` of the T
        tokens of sequence b (ragged); the rest are ignored.
      impl, interpret: how the quantized tokens are stored, as `kvq.append`'s: "pallas" writes
        every pool's new rows in one kernel (`kvq_jax.kernels.write`), "xla" scatters each pool.

    Returns:
      The new PagedKVCache. A sequence whose body would need a page its table row does
      not name: ValueError outside jit; under jit its ``overflow`` flag is set and none
      of its tokens are written.
    """
    _check_kv(cache, k, v)
    spec = cache.spec
    ps = cache.page_size
    t_valid = tokens_to_append(lengths, *k.shape[:2])
    n_old = cache.lengths
    n_want = n_old + t_valid
    _, q_want, _ = segment_lengths(spec, n_want)
    need = -(-q_want // ps)  # pages the body needs afterwards
    j = jnp.arange(cache.max_pages, dtype=jnp.int32)[None, :]
    have = jnp.all((j >= need[:, None]) | (cache.page_table >= 0), axis=1)
    over = (need > cache.max_pages) | ~have
    if _is_concrete(k, v, n_old, t_valid, cache.page_table):
        if bool(jnp.any(over)):
            bad = np.nonzero(np.asarray(over))[0].tolist()
            raise ValueError(
                f"k: appending {np.asarray(t_valid)[bad].tolist()} tokens to sequences {bad} holding "
                f"{np.asarray(n_old)[bad].tolist()} needs {np.asarray(need)[bad].tolist()} pages; their "
                f"page_table rows name {np.asarray(jnp.sum(cache.page_table[np.asarray(bad)] >= 0, 1)).tolist()}")
        check_finite(k, v)
    impl, interpret = write_impl(impl, interpret)
    return _append_paged_update(cache, k, v, t_valid, over, impl=impl, interpret=interpret)


@partial(jax.jit, static_argnames=("impl", "interpret"))
def _append_paged_update(cache: PagedKVCache, k, v, t_valid, over, *, impl: str, interpret: bool) -> PagedKVCache:
    """`append_paged` after its checks, compiled once per cache structure and shapes: the update of
    `kvq.append` (`kvq_jax.cache.append_window`), the body written through the page table."""

    return append_window(cache, k, v, t_valid, over,
                         partial(write_units, layout=partial(_pool_layout, cache), table=cache.page_table, impl=impl,
                                 interpret=interpret))


# ----------------------------------------------------------------------------- read

def _paged_impl(impl: str, cache: PagedKVCache) -> str:
    """``impl`` resolved (`kvq.attention.resolve_impl`)."""
    return attention.resolve_impl(impl)


def attend_paged(
    q: jax.Array,
    cache: PagedKVCache,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    scale: float | None = None,
    precise: bool = False,
    config=None,
) -> jax.Array:
    """Attention of ``q`` over everything in a paged cache (`kvq.attend` semantics).

    Args:
      q: ``Float[Array, "B T Hq D"]``: queries of the last T tokens appended to each
        sequence (causal among themselves).
      cache: the layer's PagedKVCache.
      impl: "xla" (gather each sequence's pages into a contiguous view, then the plain
        jnp reference), "pallas" (the fused-dequant kernel reading through the page
        table), "auto" (pallas on GPU, xla elsewhere).
      interpret, precise, config: for impl="pallas", as in `kvq.attend`.
      scale: softmax scale; default 1/sqrt(D).

    Returns:
      ``[B, T, Hq, D]`` in q's dtype; NaN rows for overflowed sequences.
    """
    if _paged_impl(impl, cache) == "xla":
        return attention.attend(q, contiguous_view(cache), impl="xla", scale=scale)
    return attention.attend(q, cache, impl="pallas", interpret=interpret, scale=scale, precise=precise,
                            config=config, page_table=cache.page_table)


def attend_chunk_paged(q: jax.Array, k: jax.Array, v: jax.Array, cache: PagedKVCache, *, lengths=None,
                       scale: float | None = None, block: int | None = 2048, impl: str = "auto",
                       interpret: bool | None = None, precise: bool = False, config=None) -> jax.Array:
    """`kvq.attention.attend_chunk` over a paged cache: a prefill chunk's queries over the
    cache before it and causally over the chunk's own ``k``, ``v``. Call it before
    `append_paged` of the chunk.

    ``impl``: "pallas" reads the body through the page table with the fused-dequant
    kernel (``interpret``, ``precise``, ``config`` as in
    `kvq.attend`); "xla" reads a gathered contiguous view in body
    blocks of ``block`` tokens; "auto": pallas on GPU, xla elsewhere. Returns
    ``[B, T, Hq, D]`` in q's dtype."""
    if _paged_impl(impl, cache) == "xla":
        return attention.attend_chunk(q, k, v, contiguous_view(cache), lengths=lengths, scale=scale, block=block,
                                      impl="xla")
    return attention.attend_chunk(q, k, v, cache, lengths=lengths, scale=scale, impl="pallas", interpret=interpret,
                                  precise=precise, config=config, page_table=cache.page_table)


def reset_paged(cache: PagedKVCache, mask=None) -> PagedKVCache:
    """Empty the sequences where ``mask[b]`` (all when None): lengths 0, overflow cleared, table rows -1."""
    m = jnp.ones_like(cache.overflow) if mask is None else jnp.asarray(mask, bool)
    return dataclasses.replace(
        cache, lengths=jnp.where(m, 0, cache.lengths), overflow=jnp.where(m, False, cache.overflow),
        page_table=jnp.where(m[:, None], -1, cache.page_table))


# ----------------------------------------------------------------------------- sharding


def _check_pages_split(cache: PagedKVCache, mesh, name: str) -> None:
    d = mesh.shape["data"]
    if cache.num_pages % d:
        raise ValueError(f"{name}: {cache.num_pages} pages are not divisible by the mesh's 'data' axis of size {d}")


# On a mesh (`kvq_jax.sharding`): pool leaves [num_pages, Hkv, page, X] split over "data"
# (each data shard owns num_pages / data contiguous pages, and the page tables of its
# sequences hold indices local to that range) and KV heads over "model"; the windows
# [B, Hkv, R, D], page tables and lengths by sequence over "data".
_sharding.register_layout(PagedKVCache, _sharding.CacheLayout(
    specs=_sharding.leaf_specs,
    batch=lambda c: int(c.lengths.shape[-1]),
    num_kv_heads=lambda c: int(c.k.shape[1]),
    lead=lambda c: 0,
    attend=attend_paged,
    append=append_paged,
    attend_chunk=attend_chunk_paged,
    check=_check_pages_split,
))
