"""The stores of an append: every leaf of a cache body written by one kernel.

A decode step appends one token per sequence to every leaf of a layer's cache: the quantized
keys and values and their scales (and zero points). As XLA scatters that is one kernel per
leaf, each a few microseconds for a few hundred bytes; `write_rows` stores all of them in one
program per (sequence and unit, KV head), finding each unit's page through the page table
itself. A leaf's values are either given as stored (bytes to move) or as `Quantize`: the
unquantized rows of a tensor with per-token scales, which the kernel quantizes as it stores them,
by the same function as `kvq_jax.quant.quantize` (`kvq_jax.quant.quantize_groups`, with the GPU's
correctly rounded reciprocal and round-to-even instructions), so a decode step's new key and value
need no XLA kernels of their own between the projection and the store (`fusable` says which
tensors). Either way it stores exactly what its plain-jnp twin `write_rows_xla` (`quantize`, then
one scatter per leaf) stores.

Addressing: unit ``units[b, w]`` of sequence ``b`` (a token's stream slot, or a token group for
per-channel scales) lives in page ``table[b, units[b, w] // R]``, row ``units[b, w] % R`` of a pool
with ``R`` rows per page; without a table (a contiguous body, one "page" of ``R`` rows per
sequence) in page ``b``, row ``units[b, w]``. Negative units, units past the table and table
entries without a page (-1) are dropped: nothing is written. Rows of a pool in pairs are stored
at `kvq_jax.quant.pair_slot` of the row.

Pools are ``[P, H, R, X]`` (row-major: a unit's ``X`` values contiguous) or ``[P, H, X, R]``
(``token_minor``: each channel's rows contiguous, as the serving value pool stores them). Any
``X``: a row is stored in power-of-two pieces (Triton tensors), ``X = 96`` as 64 + 32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kvq_jax import quant
from kvq_jax.kernels import _compat
from kvq_jax.kernels._compat import pl
from kvq_jax.quant import pair_slot
from kvq_jax.spec import TensorSpec

PARTS = ("data", "scale", "zero")  # the leaves of one quantized tensor (`Quantize.part`)


class Quantize(NamedTuple):
    """A leaf's values as the kernel quantizes them: leaf ``part`` ("data", "scale" or "zero") of
    ``quant.quantize(x, spec, scale_dtype=scale_dtype)``. ``x``: ``[B, H, W, D]`` float rows, one per
    unit; the leaves of one tensor share ``x`` (the same array: quantized once per row)."""

    x: jax.Array
    spec: TensorSpec
    scale_dtype: str
    part: str


def _tensor(q: Quantize) -> tuple:
    """The tensor a `Quantize` leaf belongs to: its leaves are quantized together, once."""
    return id(q.x), q.spec, q.scale_dtype


def fusable(t: TensorSpec, head_dim: int, scale_dtype: str, clip=None) -> bool:
    """Whether the kernel quantizes tensors of spec ``t`` itself (`Quantize`): integer formats with
    per-token scales stored in bf16, without a clip ratio, at a power-of-two ``head_dim`` (a row is
    one Triton tensor). Other tensors are quantized by `kvq_jax.quant.quantize` and moved as bytes."""
    if not (t.quantized and t.format in ("int8", "int4", "int2") and t.axis == "token"):
        return False
    return scale_dtype == "bf16" and clip is None and head_dim >= 8 // t.bits and head_dim & (head_dim - 1) == 0


def pow2_pieces(n: int) -> tuple[tuple[int, int], ...]:
    """``(offset, size)`` pieces of ``range(n)``, sizes powers of two, largest first."""
    out, off = [], 0
    for bit in reversed(range(n.bit_length())):
        size = 1 << bit
        if n & size:
            out.append((off, size))
            off += size
    return tuple(out)


def _quantize_row(x_ref, b, h, w, t: TensorSpec, scale_dtype: str, interpret: bool) -> dict:
    """Row ``(b, h, w)`` of ``x_ref`` quantized as ``t``: ``{part: [(offset, values)]}`` of the stored
    data, scale and zero rows. The row ``[D]`` is taken as ``[D / group, group]`` (`quant.quantize_groups`)
    and its ``8 // bits`` byte fields (``Dp`` elements each, DESIGN.md's split packing) shifted into
    place and summed into bytes, all fields at once."""
    D = x_ref.shape[3]
    fields = 8 // t.bits
    g = t.group_size(D)
    sdt = quant.scale_dtype_of(scale_dtype)
    # the kernel's own instructions where a Triton op would round differently: `/` is approximate there
    rcp, rint = (None, jnp.round) if interpret else (_compat.f32_asm("rcp.rn.f32"), _compat.f32_asm("cvt.rni.f32.f32"))
    x = x_ref[b, h, w, pl.ds(0, D)].astype(jnp.float32).reshape(D // g, g)
    q, s, z = quant.quantize_groups(x, t, sdt, -1, rcp=rcp, rint=rint)
    if fields > 1:
        q = q.reshape(fields, D // fields) & (2 ** t.bits - 1)
        shift = lax.broadcasted_iota(jnp.int32, (fields, 1), 0) * t.bits
        q = jnp.sum(q << shift, axis=0)  # disjoint bit fields: the sum is their union
    out = {"data": [(0, q.reshape(D // fields).astype(quant.storage_dtype(t)))],
           "scale": [(0, s.reshape(D // g).astype(sdt))]}
    out["zero"] = [] if z is None else [(0, z.reshape(D // g).astype(sdt))]
    return out


def _write_kernel(*refs, n_pools: int, n_src: int, src: tuple, quants: dict, width: int, paged: bool,
                  token_minor: tuple[bool, ...], pairs: tuple[bool, ...], interpret: bool):
    # refs: the page table int32 [B, MP] (paged), then per pool its units int32 [B, W_i], then the
    # sources (values [B, H, W_i, X_i] as stored, or rows to quantize [B, H, W, D]), then the pools
    # (outputs aliasing the inputs: only new rows are stored). src[i]: pool i's (source, part), part
    # None for values as stored; quants: {source: (spec, scale_dtype)} of the sources it quantizes
    it = iter(refs)
    table_ref = next(it) if paged else None
    units_refs = [next(it) for _ in range(n_pools)]
    src_refs = [next(it) for _ in range(n_src)]
    pool_refs = list(it)[n_pools:]  # the aliased inputs, then the outputs
    n, h = pl.program_id(0), pl.program_id(1)
    b, w = n // width, n % width
    where = []  # per pool: (store?, page, row)
    for units_ref, pool_ref, tmin, pair in zip(units_refs, pool_refs, token_minor, pairs):
        W = units_ref.shape[1]
        R = pool_ref.shape[3 if tmin else 2]
        unit = units_ref[b, jnp.minimum(w, W - 1)]
        ok = (w < W) & (unit >= 0)
        if paged:
            slot = unit // R
            ok = ok & (slot < table_ref.shape[1])
            page = table_ref[b, jnp.clip(slot, 0, table_ref.shape[1] - 1)]
            ok = ok & (page >= 0) & (page < pool_ref.shape[0])
        else:
            page = b
            ok = ok & (unit < R)
        row = unit % R
        where.append((ok, page, pair_slot(row) if pair else row))

    def store(i, pieces):
        ok, page, row = where[i]
        pool_ref = pool_refs[i]

        @pl.when(ok)
        def _():
            for off, x in pieces():
                size = x.shape[0]
                if token_minor[i]:
                    pool_ref[page, h, pl.ds(off, size), row] = x
                else:
                    pool_ref[page, h, row, pl.ds(off, size)] = x

    for i, (j, part) in enumerate(src):
        if part is None:  # values as stored, in power-of-two pieces
            ref = src_refs[j]
            store(i, lambda ref=ref: [(off, ref[b, h, w, pl.ds(off, size)]) for off, size in pow2_pieces(ref.shape[3])])
    for j, (t, scale_dtype) in quants.items():  # each quantized row once, only where one of its leaves is stored
        leaves = [i for i, (jj, part) in enumerate(src) if jj == j]

        @pl.when(functools.reduce(jnp.logical_or, [where[i][0] for i in leaves]))
        def _(j=j, t=t, scale_dtype=scale_dtype, leaves=leaves):
            x_ref = src_refs[j]
            row = _quantize_row(x_ref, b, h, jnp.minimum(w, x_ref.shape[2] - 1), t, scale_dtype, interpret)
            for i in leaves:
                store(i, lambda part=src[i][1]: row[part])


def _u8_view(x: jax.Array) -> jax.Array:
    """fp8 arrays as uint8 (a bitcast): the kernel stores bytes."""
    fp8 = jnp.dtype(x.dtype).itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating)
    return lax.bitcast_convert_type(x, jnp.uint8) if fp8 else x


def _leaf_expected(q: Quantize) -> tuple:
    """``(dtype, X)`` of the leaf a `Quantize` stores."""
    t, D = q.spec, q.x.shape[-1]
    if q.part == "data":
        return jnp.dtype(quant.storage_dtype(t)), quant.packed_dim(t, D)
    return jnp.dtype(quant.scale_dtype_of(q.scale_dtype)), D // t.group_size(D)


def _check(pools, vals, units, token_minor, pairs, table):
    if not (len(pools) == len(vals) == len(units) == len(token_minor) == len(pairs)):
        raise ValueError(f"pools, vals, units, token_minor, pairs: expected one entry each per pool, got "
                         f"{len(pools)}, {len(vals)}, {len(units)}, {len(token_minor)}, {len(pairs)}")
    B = None
    for i, (pool, x, u, tmin) in enumerate(zip(pools, vals, units, token_minor)):
        if pool.ndim != 4:
            raise ValueError(f"pools[{i}]: expected [P, H, R, X] (token_minor: [P, H, X, R]), got {list(pool.shape)}")
        H, X = pool.shape[1], pool.shape[2 if tmin else 3]
        if u.ndim != 2 or not jnp.issubdtype(u.dtype, jnp.integer):
            raise ValueError(f"units[{i}]: expected int[B, W], got {u.dtype}{list(u.shape)}")
        if isinstance(x, Quantize):
            if x.part not in PARTS:
                raise ValueError(f"vals[{i}]: Quantize part must be one of {PARTS}, got {x.part!r}")
            D = x.x.shape[-1] if x.x.ndim == 4 else 0
            if x.x.ndim != 4 or x.x.shape[:3] != (u.shape[0], H, u.shape[1]) or not jnp.issubdtype(x.x.dtype, jnp.floating):
                raise ValueError(f"vals[{i}]: Quantize rows expected float[{u.shape[0]}, {H}, {u.shape[1]}, D], got "
                                 f"{x.x.dtype}{list(x.x.shape)}")
            if not fusable(x.spec, D, x.scale_dtype):
                raise ValueError(f"vals[{i}]: the kernel does not quantize {x.spec} with {x.scale_dtype} scales at "
                                 f"head_dim {D} (see fusable); quantize it with kvq_jax.quant.quantize")
            dt, want = _leaf_expected(x)
            if pool.dtype != dt or X != want or (x.part == "zero" and x.spec.symmetric):
                raise ValueError(f"pools[{i}]: leaf {x.part!r} of {x.spec} stores {dt}[..., {want}], got pool "
                                 f"{pool.dtype}{list(pool.shape)}")
        elif x.shape != (u.shape[0], H, u.shape[1], X) or x.dtype != pool.dtype:
            raise ValueError(f"vals[{i}]: expected {pool.dtype}[{u.shape[0]}, {H}, {u.shape[1]}, {X}], got "
                             f"{x.dtype}{list(x.shape)}")
        if B is not None and u.shape[0] != B:
            raise ValueError(f"units[{i}]: expected the same batch {B} for every pool, got {u.shape[0]}")
        B = u.shape[0]
        if table is None and pool.shape[0] < B:
            raise ValueError(f"pools[{i}]: without a table page b is sequence b: needs >= {B} pages, got {pool.shape[0]}")
    if table is not None and (table.ndim != 2 or table.shape[0] != B or not jnp.issubdtype(table.dtype, jnp.integer)):
        raise ValueError(f"table: expected int[{B}, max_pages], got {table.dtype}{list(table.shape)}")


def write_rows(pools: Sequence[jax.Array], vals: Sequence, units: Sequence[jax.Array],
               token_minor: Sequence[bool], pairs: Sequence[bool], *, table: jax.Array | None = None,
               interpret: bool = False) -> list[jax.Array]:
    """Store ``vals[i][b, :, w]`` at unit ``units[i][b, w]`` of sequence ``b`` in ``pools[i]``, for
    every pool ``i`` in one kernel (addressing: the module docstring).

    Args:
      pools: ``[P, H, R, X]`` arrays (``[P, H, X, R]`` where ``token_minor``), each with its own
        ``R``, ``X`` and dtype, the same ``H``. Updated in place when donated (the kernel's
        outputs alias them).
      vals: per pool, ``[B, H, W, X]`` in the pool's dtype, or a `Quantize`: the pool's leaf of
        rows ``[B, H, W, D]`` quantized in the kernel (`fusable` specs).
      units: per pool, ``int32[B, W]`` (its own ``W``): the stream unit of each value, -1 for none.
      token_minor: per pool, whether its rows are its last axis.
      pairs: per pool, whether its rows are stored in pairs (`kvq_jax.quant.pair_slot`).
      table: ``int32[B, max_pages]`` page table, or None (page ``b`` holds sequence ``b``).
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      The updated pools, in order.
    """
    _check(pools, vals, units, token_minor, pairs, table)
    if not pools:
        return []
    heads = {p.shape[1] for p in pools}
    if len(heads) != 1:
        raise ValueError(f"pools: expected the same number of heads in every pool, got {sorted(heads)}")
    B, width = units[0].shape[0], max(u.shape[1] for u in units)
    if B * width == 0:
        return list(pools)
    dtypes = [p.dtype for p in pools]
    pools = [_u8_view(p) for p in pools]
    units = [u.astype(jnp.int32) for u in units]
    # sources: each stored-values array, and each tensor the kernel quantizes, once
    srcs, src, quants, seen = [], [], {}, {}
    for x in vals:
        if isinstance(x, Quantize):
            key = _tensor(x)
            if key not in seen:
                seen[key] = len(srcs)
                quants[len(srcs)] = (x.spec, x.scale_dtype)
                srcs.append(x.x)
            src.append((seen[key], x.part))
        else:
            src.append((len(srcs), None))
            srcs.append(_u8_view(x))
    lead = [] if table is None else [table.astype(jnp.int32)]
    m = len(pools)

    def whole(x):
        zeros = (0,) * x.ndim
        return pl.BlockSpec(x.shape, lambda i, h: zeros)

    kernel = functools.partial(_write_kernel, n_pools=m, n_src=len(srcs), src=tuple(src), quants=quants,
                               width=width, paged=table is not None, token_minor=tuple(map(bool, token_minor)),
                               pairs=tuple(map(bool, pairs)), interpret=interpret)
    args = [*lead, *units, *srcs, *pools]
    out = pl.pallas_call(
        kernel,
        grid=(B * width, heads.pop()),
        in_specs=[whole(x) for x in args],
        out_specs=[whole(p) for p in pools],
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={len(args) - m + i: i for i in range(m)},
        compiler_params=_compat.triton_params(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kvq_write_rows",
    )(*args)
    return [o if o.dtype == dt else lax.bitcast_convert_type(o, dt) for o, dt in zip(out, dtypes)]


def stored_values(vals: Sequence) -> list:
    """``vals`` with every `Quantize` replaced by the leaf `kvq_jax.quant.quantize` gives (each
    tensor quantized once): what `write_rows` stores, as stored values."""
    done, out = {}, []
    for x in vals:
        if isinstance(x, Quantize):
            key = _tensor(x)
            if key not in done:
                done[key] = quant.quantize(x.x, x.spec, scale_dtype=x.scale_dtype)
            x = getattr(done[key], x.part)
        out.append(x)
    return out


def write_rows_xla(pools, vals, units, token_minor, pairs, *, table=None) -> list[jax.Array]:
    """Plain-jnp twin of `write_rows`: `kvq_jax.quant.quantize` for `Quantize` leaves, then one XLA
    scatter per pool."""
    _check(pools, vals, units, token_minor, pairs, table)
    vals = stored_values(vals)
    out = []
    for pool, x, u, tmin, pair in zip(pools, vals, units, token_minor, pairs):
        P, R = pool.shape[0], pool.shape[3 if tmin else 2]
        if table is None:
            page = jnp.broadcast_to(jnp.arange(u.shape[0], dtype=jnp.int32)[:, None], u.shape)
            ok = (u >= 0) & (u < R)
        else:
            slot = u // R
            page = jnp.take_along_axis(table, jnp.clip(slot, 0, table.shape[1] - 1), axis=1)
            ok = (u >= 0) & (slot < table.shape[1]) & (page >= 0) & (page < P)
        row = u % R
        if pair:
            row = pair_slot(row)
        page = jnp.where(ok, page, P)  # out of bounds: dropped by mode="drop"
        at = pool.at[page, :, :, row] if tmin else pool.at[page, :, row]  # both index as [B, W, H, X]
        out.append(at.set(jnp.swapaxes(x, 1, 2), mode="drop"))
    return out
