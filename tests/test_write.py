"""The write kernel (`kvq_jax.kernels.write`, interpret mode here) stores the same bytes as its
plain-jnp twin (one XLA scatter per pool), and appends through it (``impl="pallas"``) equal
appends through the scatters (``impl="xla"``) byte for byte: every format, contiguous and paged,
decode steps and ragged chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax import TensorSpec, quant
from kvq_jax.kernels.write import Quantize, fusable, pow2_pieces, write_rows, write_rows_xla
from kvq_jax.serve import paged

# sub-byte values in pairs, mixed widths; per-channel asymmetric keys (scales per token group: fewer
# units than the tokens) with a residual window and sinks (bf16 and fp8 pools: the kernel test above)
FORMATS = ["int4", "k8v4", "k=int4:c:asym,v=int8,tg=32,res=48,sinks=4,scale=bf16"]
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


@pytest.mark.parametrize("heads,batch,width,paged_", [(1, 2, 3, True), (3, 3, 4, True), (8, 4, 4, True),
                                                      (2, 3, 5, False)])
def test_kernel_writes_what_the_scatters_write(heads, batch, width, paged_):
    """Random pools of every stored dtype, row-major and token-minor, rows in pairs, widths that
    are not powers of two (stored in pieces), pools with fewer units than others (per-channel
    scales); units dropped: negative, past the table, on a table entry without a page."""
    rng = np.random.default_rng(heads * 100 + batch * 10 + width)
    P, MP = 3 * batch * 4, 4
    table = None
    if paged_:
        table = rng.permutation(P)[:batch * MP].reshape(batch, MP).astype(np.int32)
        table[0, -1] = -1  # no page
        table = jnp.asarray(table)
    # rows per page, X, dtype, token_minor, pairs, units per sequence
    layouts = [(16, 96, jnp.uint8, False, False, width), (16, 48, jnp.int8, True, False, width),
               (16, 3, jnp.bfloat16, False, False, width), (16, 128, jnp.float8_e4m3fn, False, False, width),
               (4, 1, jnp.float32, False, False, max(1, width // 2)), (32, 20, jnp.uint8, True, True, width)]
    pools, vals, units, tmin, pairs = [], [], [], [], []
    for rows, X, dt, t, pr, W in layouts:
        pools.append(_random(rng, (P, heads, X, rows) if t else (P, heads, rows, X), dt))
        vals.append(_random(rng, (batch, heads, W, X), dt))
        cap = MP * rows if paged_ else rows  # units a sequence can address
        u = np.stack([rng.choice(cap + 8, W, replace=False) for _ in range(batch)]).astype(np.int32)
        u[rng.random(u.shape) < 0.2] = -1
        units.append(jnp.asarray(u))
        tmin.append(t)
        pairs.append(pr)
    got = write_rows(pools, vals, units, tmin, pairs, table=table, interpret=True)
    want = write_rows_xla(pools, vals, units, tmin, pairs, table=table)
    for i, (g, w, p) in enumerate(zip(got, want, pools)):
        assert g.dtype == p.dtype and g.shape == p.shape
        np.testing.assert_array_equal(_bytes(g), _bytes(w), err_msg=f"pool {i}")
        assert np.any(_bytes(w) != _bytes(p)), f"pool {i}: nothing written"
    # the twin itself, on one unit written by hand
    rows, X, dt, t, pr, W = layouts[0]
    u = np.asarray(units[0])
    b, w = [(b, w) for b in range(batch) for w in range(W) if 0 <= u[b, w] < (MP * rows if paged_ else rows)
            and (not paged_ or int(table[b, u[b, w] // rows]) >= 0)][0]
    page = int(table[b, u[b, w] // rows]) if paged_ else b
    np.testing.assert_array_equal(np.asarray(want[0][page, :, u[b, w] % rows]), np.asarray(vals[0][b, :, w]))


# specs the kernel quantizes (`fusable`), with the layouts their data pool takes
QUANT = [(TensorSpec("int8", "token", None, True), False, False), (TensorSpec("int8", "token", 32, False), True, False),
         (TensorSpec("int4", "token", 32, True), True, True), (TensorSpec("int4", "token", 16, False), False, False),
         (TensorSpec("int2", "token", 32, False), True, True), (TensorSpec("int4", "token", None, True), False, False)]


@pytest.mark.parametrize("paged_", [True, False])
def test_kernel_quantizes_what_quantize_gives(paged_):
    """`Quantize` leaves: rows of random magnitudes (and an all-zero row) quantized in the kernel and
    stored beside a stored-values pool, byte-identical to `quant.quantize` and the scatters; values
    that are exact ties of the grid round half to even."""
    rng = np.random.default_rng(11 + paged_)
    B, H, W, D, R, MP = 3, 2, 3, 64, 16, 3
    P = B * MP + 2
    table = jnp.asarray(rng.permutation(P)[:B * MP].reshape(B, MP).astype(np.int32)) if paged_ else None
    pools, vals, units, tmin, pairs = [], [], [], [], []
    for t, tm, pr in QUANT:
        x = rng.standard_normal((B, H, W, D)) * np.exp(rng.standard_normal((B, H, W, 1)) * 2)
        x[0, 0, 0] = 0.0
        x[1, 1, 0, :8] = [127.0, 0.5, -0.5, 1.5, 2.5, -2.5, 63.5, 3.5]  # ties at s = 1
        x = jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)
        u = np.stack([rng.choice((MP if paged_ else 1) * R, W, replace=False) for _ in range(B)]).astype(np.int32)
        u[2, 1] = -1
        assert fusable(t, D, "bf16")
        for part in ("data", "scale", "zero")[:2 if t.symmetric else 3]:
            q = Quantize(x, t, "bf16", part)
            dt = quant.storage_dtype(t) if part == "data" else jnp.bfloat16
            X = quant.packed_dim(t, D) if part == "data" else D // t.group_size(D)
            on = tm and part == "data"
            pools.append(_random(rng, (P, H, X, R) if on else (P, H, R, X), dt))
            vals.append(q)
            units.append(jnp.asarray(u))
            tmin.append(on)
            pairs.append(pr and part == "data")
    got = write_rows(pools, vals, units, tmin, pairs, table=table, interpret=True)
    want = write_rows_xla(pools, vals, units, tmin, pairs, table=table)
    for i, (g, w, p) in enumerate(zip(got, want, pools)):
        np.testing.assert_array_equal(_bytes(g), _bytes(w), err_msg=f"pool {i}")
        assert np.any(_bytes(w) != _bytes(p)), f"pool {i}: nothing written"
    # the twin stores `quantize`'s leaves: row (1, 1, 0) of the first tensor (int8, one scale of 127 / 127)
    qt = quant.quantize(vals[0].x, QUANT[0][0], scale_dtype="bf16")
    b, w = 1, 0
    page = int(table[b, int(units[0][b, w]) // R]) if paged_ else b
    np.testing.assert_array_equal(np.asarray(want[0][page, 1, int(units[0][b, w]) % R]), np.asarray(qt.data[b, 1, w]))
    assert float(qt.scale[1, 1, 0, 0]) == 1.0 and np.asarray(qt.data[1, 1, 0, :8]).tolist() == [127, 0, 0, 2, 2, -2, 64, 4]


def test_kernel_arguments_name_themselves():
    pool = jnp.zeros((4, 2, 8, 16), jnp.int8)
    units = jnp.zeros((3, 1), jnp.int32)

    def call(vals, units=units, pools=(pool,), table=None):
        n = len(pools)
        return write_rows(list(pools), list(vals), [units] * n, [False] * n, [False] * n, table=table, interpret=True)

    with pytest.raises(ValueError, match=r"vals\[0\]: expected int8\[3, 2, 1, 16\]"):
        call([jnp.zeros((3, 2, 1, 8), jnp.int8)])
    with pytest.raises(ValueError, match=r"vals\[0\]: expected int8"):
        call([jnp.zeros((3, 2, 1, 16), jnp.uint8)])
    with pytest.raises(ValueError, match=r"units\[0\]: expected int\[B, W\]"):
        call([jnp.zeros((3, 2, 1, 16), jnp.int8)], units=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"pools\[0\]: without a table page b is sequence b: needs >= 5"):
        call([jnp.zeros((5, 2, 1, 16), jnp.int8)], units=jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"table: expected int\[3, max_pages\]"):
        call([jnp.zeros((3, 2, 1, 16), jnp.int8)], table=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"pools\[0\]: expected \[P, H, R, X\]"):
        call([jnp.zeros((3, 2, 1, 16), jnp.int8)], pools=(pool[0],))
    x = jnp.ones((3, 2, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"vals\[0\]: the kernel does not quantize .*fp8"):
        call([Quantize(x, TensorSpec("fp8", "token", None, True), "bf16", "data")], pools=(pool[..., :64],))
    with pytest.raises(ValueError, match=r"vals\[0\]: the kernel does not quantize .* f32 scales"):
        call([Quantize(x, TensorSpec("int8", "token", None, True), "f32", "data")], pools=(pool[..., :64],))
    with pytest.raises(ValueError, match=r"pools\[0\]: leaf 'scale' of .* stores bfloat16\[..., 1\]"):
        call([Quantize(x, TensorSpec("int8", "token", None, True), "bf16", "scale")])
    with pytest.raises(ValueError, match=r"vals\[0\]: Quantize rows expected float\[3, 2, 1, D\]"):
        call([Quantize(x[:, :1], TensorSpec("int8", "token", None, True), "bf16", "data")], pools=(pool[..., :64],))
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



def test_pools_past_2_gib_of_bytes_are_addressed_with_64_bit_offsets():
    """A one-byte pool of more than 2**31 elements (2-4 GiB) needs 64-bit offsets: Triton takes
    32-bit ones as signed (`kvq_jax.kernels._compat._patch_offset_width`). Lowered for CUDA here
    (no GPU, no allocation): the write kernel's and the decode kernel's pool pointers."""
    from jax._src.pallas.triton import lowering  # private: where the kernels' Triton modules are built

    spec = kvq.KVSpec.parse("int8")
    P = 2**31 // (8 * 64 * 128) + 8  # pages of [8 heads, 64 tokens, 128 bytes]: just over 2**31 bytes
    pc = jax.eval_shape(lambda: paged.init_paged_cache(spec, 2, P, 64, 4, 8, 128,
                                                       page_table=np.arange(8, dtype=np.int32).reshape(2, 4)))
    assert pc.k.size > 2**31 and pc.k.dtype == jnp.int8
    q = jax.ShapeDtypeStruct((2, 1, 32, 128), jnp.float32)
    kv = jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.float32)
    calls = {"write": lambda pc, k: paged.append_paged(pc, k, k, impl="pallas", interpret=False),
             "decode": lambda pc, q: paged.attend_paged(q, pc, impl="pallas", interpret=False)}
    captured, build = [], lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        res = build(*args, **kwargs)
        captured.append(res.module.operation.get_asm())
        return res

    lowering.lower_jaxpr_to_triton_module = spy
    try:
        for name, fn in calls.items():
            captured.clear()
            jax.jit(fn).trace(pc, kv if name == "write" else q).lower(lowering_platforms=("cuda",))
            ir = "\n".join(captured)
            ptr_offsets = [ln.rsplit(",", 1)[-1] for ln in ir.splitlines() if "tt.addptr" in ln]
            assert any("i64" in t for t in ptr_offsets), f"{name}: no 64-bit pointer offsets in {ptr_offsets}"
    finally:
        lowering.lower_jaxpr_to_triton_module = build
