"""The write kernel (`kvq_jax.kernels.write`, interpret mode here) stores the same bytes as its
plain-jnp twin (one XLA scatter per pool), and appends through it (``impl="pallas"``) equal
appends through the scatters (``impl="xla"``) byte for byte: every format, contiguous and paged,
decode steps and ragged chunks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax.kernels.write import pow2_pieces, write_rows, write_rows_xla
from kvq_jax.serve import paged

# no scales, fp8 (stored as bytes), sub-byte values in pairs, mixed widths; per-channel asymmetric keys
# (scales per token group: fewer units than the tokens) with a residual window and sinks
FORMATS = ["bf16", "fp8", "int4", "k8v4", "k=int4:c:asym,v=int8,tg=32,res=48,sinks=4,scale=bf16"]
BODY = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


def _bytes(x):
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _random(rng, shape, dtype):
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.asarray(rng.integers(info.min, int(info.max) + 1, shape), dtype)
    return jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32).astype(dtype)


def test_pow2_pieces_cover_the_range():
    for n in (1, 2, 3, 7, 64, 96, 100, 128):
        pieces = pow2_pieces(n)
        assert [o for o, _ in pieces] == list(np.cumsum([0] + [s for _, s in pieces])[:-1])
        assert sum(s for _, s in pieces) == n and all(s & (s - 1) == 0 for _, s in pieces)


@pytest.mark.parametrize("heads,n", [(1, 5), (3, 9), (8, 16)])
def test_kernel_writes_what_the_scatters_write(heads, n):
    """Random pools of every stored dtype, row-major and token-minor, widths that are not powers of
    two (stored in pieces), entries dropped (pages -1 and P) and entries of other pools' pages."""
    rng = np.random.default_rng(heads * 100 + n)
    P = 7
    layouts = [(16, 96, jnp.uint8, False), (16, 48, jnp.int8, True), (16, 3, jnp.bfloat16, False),
               (4, 128, jnp.float8_e4m3fn, False), (16, 1, jnp.float32, False), (32, 20, jnp.bfloat16, True)]
    pools, slots, vals, tmin = [], [], [], []
    for rows, X, dt, t in layouts:
        pools.append(_random(rng, (P, heads, X, rows) if t else (P, heads, rows, X), dt))
        # distinct (page, row) per pool: a repeated unit would make the order of stores matter
        units = rng.choice(P * rows, n, replace=False)
        page = (units // rows).astype(np.int32)
        page[rng.random(n) < 0.25] = rng.choice([-1, P])  # dropped
        slots.append((jnp.asarray(page), jnp.asarray((units % rows).astype(np.int32))))
        vals.append(_random(rng, (n, heads, X), dt))
        tmin.append(t)
    got = write_rows(pools, slots, vals, tmin, interpret=True)
    want = write_rows_xla(pools, slots, vals, tmin)
    for i, (g, w, p) in enumerate(zip(got, want, pools)):
        assert g.dtype == p.dtype and g.shape == p.shape
        np.testing.assert_array_equal(_bytes(g), _bytes(w), err_msg=f"pool {i}")
        page = np.asarray(slots[i][0])
        changed = int(np.sum(_bytes(w) != _bytes(p)))
        assert changed > 0 or not np.any((page >= 0) & (page < P)), f"pool {i}: nothing written"


def test_kernel_arguments_name_themselves():
    pool = jnp.zeros((4, 2, 8, 16), jnp.int8)
    slot = (jnp.zeros((3,), jnp.int32), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"vals\[0\]: expected int8\[3, 2, 16\]"):
        write_rows([pool], [slot], [jnp.zeros((3, 2, 8), jnp.int8)], [False], interpret=True)
    with pytest.raises(ValueError, match=r"vals\[0\]: expected int8"):
        write_rows([pool], [slot], [jnp.zeros((3, 2, 16), jnp.uint8)], [False], interpret=True)
    with pytest.raises(ValueError, match=r"slots\[1\]: every pool's update needs the same number"):
        write_rows([pool, pool], [slot, (slot[0][:2], slot[1][:2])],
                   [jnp.zeros((3, 2, 16), jnp.int8), jnp.zeros((2, 2, 16), jnp.int8)], [False, False])
    with pytest.raises(ValueError, match=r"pools\[0\]: expected \[P, H, rows, X\]"):
        write_rows([pool[0]], [slot], [jnp.zeros((3, 2, 16), jnp.int8)], [False])
    with pytest.raises(ValueError, match="impl: expected one of"):
        kvq.append(kvq.init_cache("int8", 1, 16, 2, 64), jnp.ones((1, 1, 2, 64)), jnp.ones((1, 1, 2, 64)), impl="cuda")


def _same_cache(a, b, what):
    for name in BODY + ("res_k", "res_v", "sink_k", "sink_v", "lengths", "overflow"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), f"{what}: {name}"
        if x is not None:
            np.testing.assert_array_equal(_bytes(x), _bytes(y), err_msg=f"{what}: {name}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_appends_through_the_kernel_equal_the_scatters(fmt):
    """A ragged chunk, then decode steps: contiguous and paged (scrambled
    pages, tokens-minor values in pairs), ``impl="pallas"`` against ``impl="xla"``."""
    spec = kvq.KVSpec.parse(fmt)
    B, H, D, ps, mp = 3, 2, 64, 32, 5
    rng = np.random.default_rng(7)
    table = rng.permutation(B * mp + 2)[:B * mp].reshape(B, mp).astype(np.int32)
    caches = {impl: (kvq.init_cache(spec, B, mp * ps, H, D),
                     paged.init_paged_cache(spec, B, B * mp + 2, ps, mp, H, D, page_table=table))
              for impl in ("xla", "pallas")}
    steps = [(100, [100, 70, 0])] + [(1, None)] * 2
    for T, lens in steps:
        k = jnp.asarray(rng.standard_normal((B, T, H, D)) * 2, jnp.float32)
        v = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
        n = None if lens is None else jnp.asarray(lens, jnp.int32)
        for impl, (cc, pc) in caches.items():
            caches[impl] = (kvq.append(cc, k, v, n, impl=impl, interpret=True),
                            paged.append_paged(pc, k, v, n, impl=impl, interpret=True))
    (cx, px), (cp, pp) = caches["xla"], caches["pallas"]
    assert np.asarray(cx.lengths).tolist() == [102, 72, 2]
    _, q_len, _ = kvq.segment_lengths(spec, cx.lengths)
    assert int(q_len[0]) > 0  # the body was written (past the residual window)
    _same_cache(cp, cx, "contiguous")
    _same_cache(pp, px, "paged")

