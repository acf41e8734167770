"""KVCache: the quantized key/value cache of one attention layer, as a pytree.

Storage (DESIGN.md, Data layout), per layer:

* sinks ``sink_k, sink_v: bf16[B, Hkv, sinks, D]``: the first ``spec.sinks``
  tokens of every sequence, unrotated.
* body ``k, v: [B, Hkv, S, Dp]`` with scales ``k_scale, v_scale`` and zero points
  ``k_zero, v_zero`` (None where the spec has none): the quantized tokens. Body
  slot ``j`` holds the token at absolute position ``sinks + j`` (the *stream*
  position ``j``). Per-token scales are ``[B, Hkv, S, D / group]``, per-channel
  key scales ``[B, Hkv, S / token_group, D]``. Rotated when ``spec.rotate``;
  shifted and divided per channel first when ``spec.static`` (`prescale`).
* residual ``res_k, res_v: bf16[B, Hkv, R, D]``: the most recent stream tokens
  that are not (yet) quantized, in order, slot 0 first; unrotated.
* ``lengths: int32[B]``: tokens appended to each sequence; ``overflow: bool[B]``.

Exact semantics of which token lives where, for a sequence holding ``n`` tokens:

* ``n_sink = min(n, sinks)`` tokens are sinks; ``m = max(n - sinks, 0)`` are stream tokens.
* per-token specs: the body holds stream tokens ``[0, q)`` with
  ``q = max(m - residual, 0)``: a token is quantized as soon as it leaves the
  window of the ``residual`` most recent tokens.
* per-channel keys (KIVI): ``q = floor(max(m - residual, 0) / token_group) * token_group``:
  a group of ``token_group`` stream tokens is quantized (keys per channel over the
  group, values per token) once it is complete *and* all of it has left the
  residual window. So the residual holds ``r = m - q`` tokens, between
  ``min(m, residual)`` and ``residual + token_group - 1``.

Capacity: ``max_len`` tokens per sequence. ``append`` past it raises ValueError
when called with concrete arrays; under ``jit`` it cannot raise, so the
sequence's ``overflow`` flag becomes True (and stays True), *none* of that call's
tokens of that sequence are written, and its length is unchanged. ``attend``
returns NaN for every query row of an overflowed sequence, so the loss is loud.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax import quant
from kvq_jax.spec import KVSpec, bytes_per_token  # noqa: F401  (re-exported)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "k", "k_scale", "k_zero", "v", "v_scale", "v_zero",
        "res_k", "res_v", "sink_k", "sink_v", "lengths", "overflow",
    ],
    meta_fields=["spec", "max_len", "head_dim"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's KV cache (see the module docstring for the layout).

    Leaves: ``k, k_scale, k_zero, v, v_scale, v_zero`` (quantized body),
    ``res_k, res_v`` (bf16 residual), ``sink_k, sink_v`` (bf16 sinks),
    ``lengths: int32[B]``, ``overflow: bool[B]``. Static: ``spec``, ``max_len``,
    ``head_dim``.
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
    lengths: jax.Array
    overflow: jax.Array
    spec: KVSpec
    max_len: int
    head_dim: int

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def body_capacity(self) -> int:
        """Slots S of the quantized body."""
        return self.k.shape[2]

    @property
    def residual_capacity(self) -> int:
        return self.res_k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by all leaves (body, scales, residual, sinks, lengths, flags)."""
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

    def segments(self, lengths=None):
        """``(n_sink, q, r)`` int32[B] each: tokens in sinks, quantized body, residual."""
        return segment_lengths(self.spec, self.lengths if lengths is None else lengths)


def segment_lengths(spec: KVSpec, lengths: jax.Array):
    """Split total lengths ``[B]`` into (sink, body, residual) token counts, each ``int32[B]``."""
    n = lengths.astype(jnp.int32)
    n_sink = jnp.minimum(n, spec.sinks)
    m = jnp.maximum(n - spec.sinks, 0)
    if not spec.quantized:
        # bf16 everywhere: no residual window is needed; every stream token is "body".
        return n_sink, m, jnp.zeros_like(m)
    past = jnp.maximum(m - spec.residual, 0)
    q = (past // spec.body_granule) * spec.body_granule
    return n_sink, q, m - q


def residual_capacity(spec: KVSpec) -> int:
    """Residual slots a cache of this spec needs."""
    if not spec.quantized:
        return 0
    return spec.residual + spec.body_granule - 1


def init_cache(
    spec: KVSpec | str,
    batch: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.bfloat16,
) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens.

    Args:
      spec: a KVSpec or preset name.
      batch, max_len, num_kv_heads, head_dim: positive ints.
      dtype: dtype of the full-precision segments (residual and sinks), bf16 by default.
    """
    spec = KVSpec.parse(spec)
    for name, val in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads)):
        if not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    spec.validate_head_dim(head_dim)
    head_dim = int(head_dim)
    if spec.static is not None:
        spec.static.check(num_kv_heads, head_dim)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    B, H, D = int(batch), int(num_kv_heads), int(head_dim)
    body = max(int(max_len) - spec.sinks, 1)
    S = _round_up(body, int(np.lcm(256, spec.token_group)) if spec.channel_keys else 256)
    sdt = quant.scale_dtype_of(spec.scale_dtype)

    def tensor(t):
        data = jnp.zeros((B, H, S, quant.packed_dim(t, D)), quant.storage_dtype(t))
        if not t.quantized:
            return data, None, None
        if t.axis == "token":
            sshape = (B, H, S, D // t.group_size(D))
        else:
            sshape = (B, H, S // spec.token_group, D)
        scale = jnp.zeros(sshape, sdt)
        zero = None if t.symmetric else jnp.zeros(sshape, sdt)
        return data, scale, zero

    k, ks, kz = tensor(spec.k)
    v, vs, vz = tensor(spec.v)
    R = residual_capacity(spec)
    return KVCache(
        k=k, k_scale=ks, k_zero=kz, v=v, v_scale=vs, v_zero=vz,
        res_k=jnp.zeros((B, H, R, D), dtype), res_v=jnp.zeros((B, H, R, D), dtype),
        sink_k=jnp.zeros((B, H, spec.sinks, D), dtype), sink_v=jnp.zeros((B, H, spec.sinks, D), dtype),
        lengths=jnp.zeros((B,), jnp.int32), overflow=jnp.zeros((B,), bool),
        spec=spec, max_len=int(max_len), head_dim=D,
    )


try:  # jax.core.Tracer moved in newer jax
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


def is_traced(x) -> bool:
    """True when ``x`` is an abstract value under a jax transformation (jit, vmap, scan)."""
    return isinstance(x, _Tracer)


def _is_concrete(*xs) -> bool:
    return not any(is_traced(x) for x in xs)


def _check_kv(cache: KVCache, k, v):
    for name, x in (("k", k), ("v", v)):
        if not hasattr(x, "shape") or x.ndim != 4:
            raise ValueError(f"{name}: expected shape [B, T, Hkv, D], got {getattr(x, 'shape', type(x))}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v: shape {v.shape} must equal k's {k.shape}")
    B, T, H, D = k.shape
    if B != cache.batch:
        raise ValueError(f"k: batch {B} does not match the cache's {cache.batch}")
    if H != cache.num_kv_heads:
        raise ValueError(f"k: {H} KV heads, the cache has {cache.num_kv_heads}")
    if D != cache.head_dim:
        raise ValueError(f"k: head_dim {D}, the cache has {cache.head_dim}")
    if T > cache.max_len:
        raise ValueError(f"k: {T} tokens exceed the cache's max_len {cache.max_len}")


def _scatter_tokens(buf, idx, vals):
    """buf[b, :, idx[b, i]] = vals[b, :, i]; indices >= buf.shape[2] are dropped.

    buf: ``[B, H, S, X]``; idx: ``int32[B, W]``; vals: ``[B, H, W, X]``.
    """
    B = buf.shape[0]
    bidx = jnp.arange(B)[:, None]
    # advanced indices (b, idx) separated by a slice: update dims are [B, W, H, X].
    return buf.at[bidx, :, idx].set(jnp.swapaxes(vals, 1, 2).astype(buf.dtype), mode="drop")


def _gather_tokens(buf, idx):
    """out[b, :, i] = buf[b, :, idx[b, i]] (idx clipped into range). buf [B,H,S,X] -> [B,H,W,X]."""
    idx = jnp.clip(idx, 0, buf.shape[2] - 1)
    return jnp.take_along_axis(buf, idx[:, None, :, None], axis=2)


def append(cache: KVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *,
           impl: str = "auto", interpret: bool | None = None) -> KVCache:
    """Append ``k, v: [B, T, Hkv, D]`` at each sequence's own current length.

    Args:
      cache: the layer's KVCache.
      k, v: new keys and values (any float dtype; quantized in f32).
      lengths: optional ``int[B]``: append only the first ``lengths[b]`` of the T
        tokens of sequence b (ragged prefill); the rest are ignored.
      impl: how the quantized tokens are stored: "pallas" (one kernel for every leaf of the
        body, `kvq_jax.kernels.write`), "xla" (one scatter per leaf), "auto" ("pallas" on a
        GPU, "xla" elsewhere). The same bytes either way.
      interpret: for "pallas": interpret mode (default: off a GPU).

    Returns:
      The new KVCache. Past ``max_len``: ValueError outside jit, the ``overflow``
      flag under jit (see the module docstring).
    """
    _check_kv(cache, k, v)
    t_valid = tokens_to_append(lengths, *k.shape[:2])
    n_old = cache.lengths
    n_want = n_old + t_valid
    over = n_want > cache.max_len
    if _is_concrete(k, v, n_old, t_valid):
        if bool(jnp.any(over)):
            bad = np.nonzero(np.asarray(over))[0].tolist()
            raise ValueError(
                f"k: appending {np.asarray(t_valid)[bad].tolist()} tokens to sequences {bad} holding "
                f"{np.asarray(n_old)[bad].tolist()} exceeds max_len={cache.max_len}")
        check_finite(k, v)
    impl, interpret = write_impl(impl, interpret)
    return _append_update(cache, k, v, t_valid, over, impl=impl, interpret=interpret)


def tokens_to_append(lengths, B: int, T: int) -> jax.Array:
    """``int32[B]``: the tokens of each sequence that an append of ``T`` tokens per sequence takes
    (``lengths``, checked, or all ``T``); values outside ``[0, T]`` are a ValueError when concrete,
    clipped into it under jit."""
    if lengths is None:
        return jnp.full((B,), T, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: expected int[{B}], got {lengths.dtype}{list(lengths.shape)}")
    if _is_concrete(lengths):  # checked in numpy: a concrete array closed over by a jit stays concrete
        lv = np.asarray(lengths)
        if ((lv < 0) | (lv > T)).any():
            raise ValueError(f"lengths: expected values in [0, {T}], got {lv.tolist()}")
    return jnp.clip(lengths.astype(jnp.int32), 0, T)


def check_finite(k, v) -> None:
    """ValueError when concrete ``k`` or ``v`` hold NaN or Inf (nothing that cannot be quantized
    enters a cache)."""
    if not (bool(jnp.all(jnp.isfinite(k))) and bool(jnp.all(jnp.isfinite(v)))):
        raise ValueError("k, v: contain NaN or Inf")


@partial(jax.jit, static_argnames=("impl", "interpret"))
def _append_update(cache: KVCache, k, v, t_valid, over, *, impl: str, interpret: bool) -> KVCache:
    """`append` after its checks, compiled once per cache structure and shapes (run op by op,
    outside any jit, it took 7-9x longer on the test shapes)."""

    return append_window(cache, k, v, t_valid, over, partial(write_units, layout=lambda name: (False, False),
                                                             table=None, impl=impl, interpret=interpret))


def write_impl(impl: str, interpret: bool | None) -> tuple[str, bool]:
    """An append's ``impl`` ("auto", "pallas", "xla") and ``interpret`` resolved: "auto" is
    "pallas" on a GPU (`kvq.attention.default_impl`); interpret mode by default off a GPU."""
    from kvq_jax.attention import resolve_impl, resolve_interpret  # (attention imports this module)

    return resolve_impl(impl), resolve_interpret(interpret)


def write_units(updates: dict, *, layout, table, impl: str, interpret: bool) -> dict:
    """`append_window`'s ``write``: store every body leaf's new units, all leaves at once.

    ``updates``: ``{name: (buf, idx int32[B, W], vals)}`` (``vals``: ``[B, H, W, X]``, or a
    `kvq_jax.kernels.write.Quantize` leaf); ``layout(name)``:
    ``(token_minor, pairs)`` of leaf ``name``; ``table``: the page table, or None for a contiguous
    body (addressing as `kvq_jax.kernels.write`). impl "pallas": one kernel for all leaves
    (`kvq_jax.kernels.write.write_rows`); "xla": one scatter per leaf (its twin `write_rows_xla`).
    Returns ``{name: new buf}``."""
    from kvq_jax.kernels import write  # the Pallas kernel and its plain-jnp twin

    names = list(updates)
    pools = [updates[n][0] for n in names]
    units = [updates[n][1] for n in names]
    vals = [x if isinstance(x, write.Quantize) else x.astype(buf.dtype) for buf, _, x in (updates[n] for n in names)]
    token_minor, pairs = zip(*(layout(n) for n in names)) if names else ((), ())
    if impl == "pallas":
        out = write.write_rows(pools, vals, units, token_minor, pairs, table=table, interpret=interpret)
    else:
        out = write.write_rows_xla(pools, vals, units, token_minor, pairs, table=table)
    return dict(zip(names, out))


def append_window(cache, k, v, t_valid, over, write):
    """The update `append` and `kvq_jax.serve.append_paged` share, after their checks: ``t_valid``
    tokens of ``k, v: [B, T, Hkv, D]`` per sequence (none where ``over`` or already overflowed)
    go to the sinks, the residual window and, leaving the window, quantized into the body, which
    ``write(updates)`` stores, all leaves at once: ``updates`` maps each body leaf's name to
    ``(buf, idx, vals)``, ``vals [B, H, W, X]`` for stream slots (token groups for per-channel
    scales) ``idx int32[B, W]`` of ``buf``, -1 for none, or a `kvq_jax.kernels.write.Quantize` leaf
    (tensors the write quantizes itself: `kvq_jax.kernels.write.fusable`); it returns
    ``{name: new buf}``.
    Returns ``cache`` replaced with the new leaves, lengths and overflow flags."""
    from kvq_jax.kernels import write as write_kernel  # (the kernels import this module)

    spec = cache.spec
    B, T, H, D = k.shape
    n_old = cache.lengths
    # Sequences already overflowed, or overflowing now, take nothing.
    take = ~(over | cache.overflow)
    t_valid = jnp.where(take, t_valid, 0)
    n_new = n_old + t_valid

    # Every token is rounded to the cache dtype first, whether it is quantized now or
    # after a stay in the residual window: the stored result never depends on chunking.
    kt = jnp.swapaxes(k.astype(cache.res_k.dtype), 1, 2)  # [B, H, T, D]
    vt = jnp.swapaxes(v.astype(cache.res_v.dtype), 1, 2)
    tpos = jnp.arange(T, dtype=jnp.int32)[None, :]  # [1, T]
    valid = tpos < t_valid[:, None]  # [B, T]
    pos = n_old[:, None] + tpos  # absolute positions [B, T]

    # 1. sinks: absolute positions < sinks.
    sink_k, sink_v = cache.sink_k, cache.sink_v
    if spec.sinks:
        sidx = jnp.where(valid & (pos < spec.sinks), pos, spec.sinks)
        sink_k = _scatter_tokens(sink_k, sidx, kt)
        sink_v = _scatter_tokens(sink_v, sidx, vt)
    n_to_sink = jnp.clip(spec.sinks - n_old, 0, t_valid)  # [B]

    # 2. stream: old residual followed by the new non-sink tokens, as one window.
    _, q_old, r_old = segment_lengths(spec, n_old)
    _, q_new, r_new = segment_lengths(spec, n_new)
    R = cache.residual_capacity
    W = R + T
    widx = jnp.arange(W, dtype=jnp.int32)[None, :]
    from_res = widx < r_old[:, None]
    src_new = widx - r_old[:, None] + n_to_sink[:, None]  # index into the new T tokens
    n_stream_new = t_valid - n_to_sink
    in_window = from_res | (widx - r_old[:, None] < n_stream_new[:, None])

    def window(res, new):
        a = _gather_tokens(res, widx.repeat(B, 0)) if R else None
        b = _gather_tokens(new, src_new)
        w = b.astype(jnp.float32) if a is None else jnp.where(from_res[:, None, :, None], a.astype(jnp.float32), b.astype(jnp.float32))
        return jnp.where(in_window[:, None, :, None], w, 0.0)  # [B, H, W, D] f32

    wk, wv = window(cache.res_k, kt), window(cache.res_v, vt)

    # 2a. tokens leaving the window enter the quantized body at stream slots q_old + i.
    n_body = q_new - q_old
    bidx = jnp.where(widx < n_body[:, None], q_old[:, None] + widx, -1)
    bk, bv = wk, wv
    if spec.static is not None:  # calibrated per-channel shift and scale (spec.StaticScales)
        bk = prescale(bk, spec.static.array("k_scale"), spec.static.array("k_shift"))
        bv = prescale(bv, spec.static.array("v_scale"), spec.static.array("v_shift"))
    if spec.rotate:
        bk, bv = quant.rotate(bk), quant.rotate(bv)
    new = {name: getattr(cache, name) for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")}
    writes = {}
    for name, x, t in (("k", bk, spec.k), ("v", bv, spec.v)):
        clip = None if spec.static is None else getattr(spec.static, name + "_clip")
        clip = None if clip == 1.0 else clip
        if t.quantized and t.axis == "channel":
            tg = spec.token_group
            Wp = _round_up(W, tg)
            xp = jnp.pad(x, ((0, 0), (0, 0), (0, Wp - W), (0, 0)))
            qt = quant.quantize(xp, t, scale_dtype=spec.scale_dtype, token_group=tg, clip=clip)
            data = qt.data[:, :, :W]
            gi = jnp.arange(Wp // tg, dtype=jnp.int32)[None, :]
            sidx = jnp.where(gi * tg < n_body[:, None], q_old[:, None] // tg + gi, -1)  # token groups
        elif write_kernel.fusable(t, D, spec.scale_dtype, clip):  # quantized by the write as it stores it
            for part, leaf in zip(write_kernel.PARTS, (name, name + "_scale", name + "_zero")):
                if new[leaf] is not None:
                    writes[leaf] = (new[leaf], bidx, write_kernel.Quantize(x, t, spec.scale_dtype, part))
            continue
        else:
            qt = quant.quantize(x, t, scale_dtype=spec.scale_dtype, clip=clip)
            data, sidx = qt.data, bidx
        for leaf, vals in ((name + "_scale", qt.scale), (name + "_zero", qt.zero)):
            if vals is not None:
                writes[leaf] = (new[leaf], sidx, vals)
        writes[name] = (new[name], bidx, data)
    new.update(write(writes))

    # 2b. what stays in the window becomes the new residual.
    res_k, res_v = cache.res_k, cache.res_v
    if R:
        ridx = jnp.arange(R, dtype=jnp.int32)[None, :]
        src = n_body[:, None] + ridx
        keep = (ridx < r_new[:, None])[:, None, :, None]
        res_k = jnp.where(keep, _gather_tokens(wk, src), 0).astype(res_k.dtype)
        res_v = jnp.where(keep, _gather_tokens(wv, src), 0).astype(res_v.dtype)

    return dataclasses.replace(
        cache, **new, res_k=res_k, res_v=res_v, sink_k=sink_k, sink_v=sink_v,
        lengths=n_new, overflow=cache.overflow | over,
    )


def prescale(x: jax.Array, scale=None, shift=None) -> jax.Array:
    """``(x - shift) / scale`` per (KV head, channel), as the write path of a spec with static scales.

    Args:
      x: ``f32[B, Hkv, W, D]`` (head-major, as the cache stores tokens).
      scale, shift: None or ``[Hkv, D]`` (`StaticScales.array`).

    Returns:
      ``f32[B, Hkv, W, D]``.
    """
    if shift is not None:
        x = x - jnp.asarray(shift, jnp.float32)[None, :, None, :]
    if scale is not None:
        x = x / jnp.asarray(scale, jnp.float32)[None, :, None, :]
    return x


def reset(cache: KVCache, mask: jax.Array | None = None) -> KVCache:
    """Empty the sequences where ``mask[b]`` (all when None): lengths 0, overflow cleared.

    Stored bytes are left in place; they are unreachable once the length is 0.
    """
    m = jnp.ones_like(cache.overflow) if mask is None else jnp.asarray(mask, bool)
    return dataclasses.replace(
        cache, lengths=jnp.where(m, 0, cache.lengths), overflow=jnp.where(m, False, cache.overflow))
