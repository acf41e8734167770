"""Rows written into several page pools by one kernel: the stores of an append.

A decode step appends one token per sequence to every leaf of a layer's paged cache: the
quantized keys and values and their scales (and zero points). As XLA scatters that is one
kernel per leaf, each a few microseconds for a few hundred bytes; `write_rows` stores all of
them in one program per (entry, KV head). The quantization itself stays in XLA
(`kvq_jax.quant.quantize`, one fusion for all leaves): this kernel only moves bytes, so its
result is bit-identical to the scatters it replaces (`write_rows_xla`, its plain-jnp twin).

Pools are ``[P, H, rows, X]`` (row-major: a unit's ``X`` values contiguous) or ``[P, H, X,
rows]`` (``token_minor``: each of the ``X`` channels' rows contiguous, as the serving value
pool stores them). Entry ``n`` of a pool's update goes to page ``pages[n]``, row ``rows[n]``
of every head; pages outside ``[0, P)`` are dropped (nothing written). Any ``X`` and ``H``:
each head's row is stored in power-of-two pieces (Triton tensors), ``X = 96`` as 64 + 32.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kvq_jax.kernels import _compat
from kvq_jax.kernels._compat import pl


def pow2_pieces(n: int) -> tuple[tuple[int, int], ...]:
    """``(offset, size)`` pieces of ``range(n)``, sizes powers of two, largest first."""
    out, off = [], 0
    for bit in reversed(range(n.bit_length())):
        size = 1 << bit
        if n & size:
            out.append((off, size))
            off += size
    return tuple(out)


def _write_kernel(*refs, n_pools: int, token_minor: tuple[bool, ...]):
    # refs: slots int32[pools, 2, N] (page, row of each pool's entries), then per pool its values
    # [N, H, X], then the pools (outputs aliasing the inputs: only the new rows are stored)
    slots_ref, vals_refs, pool_refs = refs[0], refs[1:1 + n_pools], refs[1 + 2 * n_pools:]
    n, h = pl.program_id(0), pl.program_id(1)
    for k, (vals_ref, pool_ref, tmin) in enumerate(zip(vals_refs, pool_refs, token_minor)):
        page, row = slots_ref[k, 0, n], slots_ref[k, 1, n]
        width = vals_ref.shape[2]

        @pl.when((page >= 0) & (page < pool_ref.shape[0]))
        def _store(vals_ref=vals_ref, pool_ref=pool_ref, page=page, row=row, width=width, tmin=tmin):
            for off, size in pow2_pieces(width):
                x = vals_ref[n, h, pl.ds(off, size)]
                if tmin:
                    pool_ref[page, h, pl.ds(off, size), row] = x
                else:
                    pool_ref[page, h, row, pl.ds(off, size)] = x


def _u8_view(x: jax.Array) -> jax.Array:
    """fp8 arrays as uint8 (a bitcast): the kernel stores bytes."""
    return lax.bitcast_convert_type(x, jnp.uint8) if jnp.dtype(x.dtype).itemsize == 1 and \
        jnp.issubdtype(x.dtype, jnp.floating) else x


def _check(pools, slots, vals, token_minor):
    if not (len(pools) == len(slots) == len(vals) == len(token_minor)):
        raise ValueError(f"pools, slots, vals, token_minor: expected one entry each per pool, got "
                         f"{len(pools)}, {len(slots)}, {len(vals)}, {len(token_minor)}")
    n = None
    for i, (pool, (page, row), x, tmin) in enumerate(zip(pools, slots, vals, token_minor)):
        if pool.ndim != 4:
            raise ValueError(f"pools[{i}]: expected [P, H, rows, X] (token_minor: [P, H, X, rows]), got {list(pool.shape)}")
        H, X = pool.shape[1], pool.shape[2 if tmin else 3]
        if page.shape != row.shape or page.ndim != 1 or not jnp.issubdtype(page.dtype, jnp.integer):
            raise ValueError(f"slots[{i}]: expected two int[N] arrays (pages, rows), got {page.dtype}"
                             f"{list(page.shape)} and {row.dtype}{list(row.shape)}")
        if x.shape != (page.shape[0], H, X) or x.dtype != pool.dtype:
            raise ValueError(f"vals[{i}]: expected {pool.dtype}[{page.shape[0]}, {H}, {X}], got {x.dtype}{list(x.shape)}")
        if n is not None and page.shape[0] != n:
            raise ValueError(f"slots[{i}]: every pool's update needs the same number of entries ({n}), got {page.shape[0]}")
        n = page.shape[0]


def write_rows(pools: Sequence[jax.Array], slots: Sequence[tuple[jax.Array, jax.Array]],
               vals: Sequence[jax.Array], token_minor: Sequence[bool], *, interpret: bool = False) -> list[jax.Array]:
    """``pools[i][pages[n], h, rows[n]] = vals[i][n, h]`` for every pool ``i``, entry ``n`` and head
    ``h``, in one kernel; entries whose page is outside ``[0, P)`` are dropped.

    Args:
      pools: ``[P, H, rows, X]`` arrays (``[P, H, X, rows]`` where ``token_minor``); each may
        have its own ``H``, ``rows``, ``X`` and dtype. Updated in place when donated (the
        kernel's outputs alias them).
      slots: per pool, ``(pages, rows)``: ``int[N]`` each, the same ``N`` for every pool.
      vals: per pool, ``[N, H, X]`` in the pool's dtype.
      token_minor: per pool, whether its rows are its last axis.
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      The updated pools, in order.
    """
    _check(pools, slots, vals, token_minor)
    if not pools or slots[0][0].shape[0] == 0:
        return list(pools)
    table = jnp.stack([jnp.stack([p.astype(jnp.int32), r.astype(jnp.int32)]) for p, r in slots])  # [pools, 2, N]
    n = int(table.shape[2])
    heads = {p.shape[1] for p in pools}
    if len(heads) != 1:  # one grid over heads; pools with fewer heads would need guards (none do)
        raise ValueError(f"pools: expected the same number of heads in every pool, got {sorted(heads)}")
    H = heads.pop()
    dtypes = [p.dtype for p in pools]
    pools = [_u8_view(p) for p in pools]
    vals = [_u8_view(x) for x in vals]
    m = len(pools)

    def whole(x):
        zeros = (0,) * x.ndim
        return pl.BlockSpec(x.shape, lambda i, h: zeros)

    kernel = functools.partial(_write_kernel, n_pools=m, token_minor=tuple(map(bool, token_minor)))
    out = pl.pallas_call(
        kernel,
        grid=(n, H),
        in_specs=[whole(table), *map(whole, vals), *map(whole, pools)],
        out_specs=[whole(p) for p in pools],
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={1 + m + i: i for i in range(m)},
        compiler_params=_compat.triton_params(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kvq_write_rows",
    )(table, *vals, *pools)
    return [o if o.dtype == dt else lax.bitcast_convert_type(o, dt) for o, dt in zip(out, dtypes)]


def write_rows_xla(pools, slots, vals, token_minor) -> list[jax.Array]:
    """Plain-jnp twin of `write_rows` (one XLA scatter per pool)."""
    _check(pools, slots, vals, token_minor)
    out = []
    for pool, (page, row), x, tmin in zip(pools, slots, vals, token_minor):
        page = jnp.where((page >= 0) & (page < pool.shape[0]), page, pool.shape[0])  # dropped by mode="drop"
        at = pool.at[page, :, :, row] if tmin else pool.at[page, :, row]  # both index as [N, H, X]
        out.append(at.set(x, mode="drop"))
    return out
