"""The stores of an append: every leaf of a cache body written by one kernel.

A decode step appends one token per sequence to every leaf of a layer's cache: the quantized
keys and values and their scales (and zero points). As XLA scatters that is one kernel per
leaf, each a few microseconds for a few hundred bytes; `write_rows` stores all of them in one
program per (sequence and unit, KV head), finding each unit's page through the page table
itself. The quantization stays in XLA (`kvq_jax.quant.quantize`): this kernel only moves bytes,
so it stores exactly what its plain-jnp twin `write_rows_xla` (one scatter per leaf) stores.

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
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kvq_jax.kernels import _compat
from kvq_jax.kernels._compat import pl
from kvq_jax.quant import pair_slot


def pow2_pieces(n: int) -> tuple[tuple[int, int], ...]:
    """``(offset, size)`` pieces of ``range(n)``, sizes powers of two, largest first."""
    out, off = [], 0
    for bit in reversed(range(n.bit_length())):
        size = 1 << bit
        if n & size:
            out.append((off, size))
            off += size
    return tuple(out)


def _write_kernel(*refs, n_pools: int, width: int, paged: bool, token_minor: tuple[bool, ...],
                  pairs: tuple[bool, ...]):
    # refs: the page table int32 [B, MP] (paged), then per pool its units int32 [B, W_i] and its
    # values [B, H, W_i, X_i], then the pools (outputs aliasing the inputs: only new rows are stored)
    it = iter(refs)
    table_ref = next(it) if paged else None
    units_refs = [next(it) for _ in range(n_pools)]
    vals_refs = [next(it) for _ in range(n_pools)]
    pool_refs = list(it)[n_pools:]  # the aliased inputs, then the outputs
    n, h = pl.program_id(0), pl.program_id(1)
    b, w = n // width, n % width
    for units_ref, vals_ref, pool_ref, tmin, pair in zip(units_refs, vals_refs, pool_refs, token_minor, pairs):
        W, X = vals_ref.shape[2], vals_ref.shape[3]
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
        if pair:
            row = pair_slot(row)

        @pl.when(ok)
        def _store(vals_ref=vals_ref, pool_ref=pool_ref, page=page, row=row, w=w, X=X, tmin=tmin):
            for off, size in pow2_pieces(X):
                x = vals_ref[b, h, w, pl.ds(off, size)]
                if tmin:
                    pool_ref[page, h, pl.ds(off, size), row] = x
                else:
                    pool_ref[page, h, row, pl.ds(off, size)] = x


def _u8_view(x: jax.Array) -> jax.Array:
    """fp8 arrays as uint8 (a bitcast): the kernel stores bytes."""
    fp8 = jnp.dtype(x.dtype).itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating)
    return lax.bitcast_convert_type(x, jnp.uint8) if fp8 else x


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
        if x.shape != (u.shape[0], H, u.shape[1], X) or x.dtype != pool.dtype:
            raise ValueError(f"vals[{i}]: expected {pool.dtype}[{u.shape[0]}, {H}, {u.shape[1]}, {X}], got "
                             f"{x.dtype}{list(x.shape)}")
        if B is not None and u.shape[0] != B:
            raise ValueError(f"units[{i}]: expected the same batch {B} for every pool, got {u.shape[0]}")
        B = u.shape[0]
        if table is None and pool.shape[0] < B:
            raise ValueError(f"pools[{i}]: without a table page b is sequence b: needs >= {B} pages, got {pool.shape[0]}")
    if table is not None and (table.ndim != 2 or table.shape[0] != B or not jnp.issubdtype(table.dtype, jnp.integer)):
        raise ValueError(f"table: expected int[{B}, max_pages], got {table.dtype}{list(table.shape)}")


def write_rows(pools: Sequence[jax.Array], vals: Sequence[jax.Array], units: Sequence[jax.Array],
               token_minor: Sequence[bool], pairs: Sequence[bool], *, table: jax.Array | None = None,
               interpret: bool = False) -> list[jax.Array]:
    """Store ``vals[i][b, :, w]`` at unit ``units[i][b, w]`` of sequence ``b`` in ``pools[i]``, for
    every pool ``i`` in one kernel (addressing: the module docstring).

    Args:
      pools: ``[P, H, R, X]`` arrays (``[P, H, X, R]`` where ``token_minor``), each with its own
        ``R``, ``X`` and dtype, the same ``H``. Updated in place when donated (the kernel's
        outputs alias them).
      vals: per pool, ``[B, H, W, X]`` in the pool's dtype.
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
    pools, vals = [_u8_view(p) for p in pools], [_u8_view(x) for x in vals]
    units = [u.astype(jnp.int32) for u in units]
    lead = [] if table is None else [table.astype(jnp.int32)]
    m = len(pools)

    def whole(x):
        zeros = (0,) * x.ndim
        return pl.BlockSpec(x.shape, lambda i, h: zeros)

    kernel = functools.partial(_write_kernel, n_pools=m, width=width, paged=table is not None,
                               token_minor=tuple(map(bool, token_minor)), pairs=tuple(map(bool, pairs)))
    args = [*lead, *units, *vals, *pools]
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


def write_rows_xla(pools, vals, units, token_minor, pairs, *, table=None) -> list[jax.Array]:
    """Plain-jnp twin of `write_rows`: one XLA scatter per pool."""
    _check(pools, vals, units, token_minor, pairs, table)
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
