"""Multi-device checks of kvq_jax.sharding, run by tests/test_sharding.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax starts, so
these checks cannot share the test process. Every ``check_*`` function runs; the
results go to the JSON file named by the first argument (``{name: "ok" | traceback}``)
and the exit status is 1 when any check failed.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py out.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import resource
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvq_jax as kvq
from kvq_jax import sharding as ks
from kvq_jax.models import LlamaConfig, LlamaModel, init_random_params

gen_mod = sys.modules["kvq_jax.generate"]  # the module (kvq_jax.generate is the function)

DEVICES = 8
B, D = 4, 32
SINKS_SPEC = "k=int4:c:asym,v=int4:t:g32:asym,tg=32,res=16,sinks=4"  # every leaf kind: sinks, zeros, residual


def _fail(msg):
    raise AssertionError(msg)


def _expect_value_error(fn, prefix: str):
    """``fn()`` raises ValueError whose message starts with ``prefix`` (the argument's name)."""
    try:
        fn()
    except ValueError as e:
        if not str(e).startswith(prefix):
            _fail(f"error {e!r} does not start with {prefix!r}")
    else:
        _fail(f"no ValueError (expected {prefix!r})")


def _rand(rng, shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def _tiny_model(n_kv_heads, vocab=320):
    config = LlamaConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, head_dim=32,
                         ffn_dim=128, rope_theta=10000.0, rope_style="interleaved", tie_embeddings=False,
                         eos_token_ids=())
    return LlamaModel.from_params(config, init_random_params(config, seed=0))


def _spec_of(x):
    return x.sharding.spec if isinstance(x.sharding, NamedSharding) else None


def _norm(spec, ndim):
    """A PartitionSpec padded with None to ``ndim`` entries (P('data',) == P('data', None, ...))."""
    t = tuple(spec)
    return t + (None,) * (ndim - len(t))


def _assert_sharded_as(x, expected: P, what: str):
    got = _spec_of(x)
    if got is None or _norm(got, x.ndim) != _norm(expected, x.ndim):
        _fail(f"{what}: sharding {x.sharding} != {expected}")


def _assert_cache_placed(cache, mesh, heads_split: bool, what: str):
    """Every leaf of a KVCache: spec, and the shape of each device's shard."""
    d, m = mesh.shape["data"], mesh.shape["model"]
    for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero", "res_k", "res_v", "sink_k", "sink_v",
                 "lengths", "overflow"):
        x = getattr(cache, name)
        if x is None or x.size == 0:  # absent, or empty (no sinks / no residual): nothing is stored
            continue
        if x.ndim == 4:
            exp = P("data", "model" if heads_split else None, None, None)
            local = (x.shape[0] // d, x.shape[1] // (m if heads_split else 1)) + x.shape[2:]
        else:
            exp = P("data")
            local = (x.shape[0] // d,)
        _assert_sharded_as(x, exp, f"{what}.{name}")
        shapes = {s.data.shape for s in x.addressable_shards}
        if shapes != {local}:
            _fail(f"{what}.{name}: shard shapes {shapes}, expected {local}")


def _f32(x):
    x = np.asarray(x)
    return x if x.dtype == bool else x.astype(np.float32)


def _assert_trees_equal(a, b, what, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        _fail(f"{what}: {len(la)} leaves vs {len(lb)}")
    for i, (x, y) in enumerate(zip(la, lb)):
        x, y = _f32(x), _f32(y)
        if x.shape != y.shape or not np.allclose(x, y, rtol=0, atol=atol, equal_nan=True):
            _fail(f"{what}: leaf {i} differs (max |diff| "
                  f"{np.max(np.abs(x - y)) if x.shape == y.shape else 'shape'})")


# ----------------------------------------------------------------------------- meshes


def check_make_mesh():
    if len(jax.devices()) != DEVICES:
        _fail(f"expected {DEVICES} devices, got {len(jax.devices())}")
    m = ks.make_mesh()
    if tuple(m.axis_names) != ("data", "model") or dict(m.shape) != {"data": 1, "model": 8}:
        _fail(f"default mesh {m}")
    if dict(ks.make_mesh(data=2).shape) != {"data": 2, "model": 4}:
        _fail("make_mesh(data=2)")
    if dict(ks.make_mesh(model=2).shape) != {"data": 4, "model": 2}:
        _fail("make_mesh(model=2)")
    if ks.make_mesh(2, 2).devices.size != 4:
        _fail("make_mesh(2, 2) uses 4 devices")
    for kwargs, arg in (({"data": 3}, "data"), ({"model": 3}, "model"), ({"data": 4, "model": 4}, "data, model"),
                        ({"data": 0}, "data")):
        try:
            ks.make_mesh(**kwargs)
        except ValueError as e:
            if not str(e).startswith(arg + ":"):
                _fail(f"make_mesh({kwargs}) error does not name {arg!r}: {e}")
        else:
            _fail(f"make_mesh({kwargs}) did not raise")


def check_bad_mesh_and_batch_errors():
    cache = kvq.init_cache("int8", 4, 64, 4, D)
    wrong_axes = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    cases = [
        (lambda: ks.shard_cache(cache, wrong_axes), "mesh:"),
        (lambda: ks.shard_cache(cache, explicit), "mesh:"),
        (lambda: ks.shard_cache(cache, "not a mesh"), "mesh:"),
        (lambda: ks.shard_cache(kvq.init_cache("int8", 3, 64, 4, D), ks.make_mesh(2, 4)), "cache: batch 3"),
        (lambda: ks.shard_cache((cache, kvq.init_cache("int8", 3, 64, 4, D)), ks.make_mesh(2, 4)),
         "cache[1]: batch 3"),
        (lambda: ks.shard_attend(jnp.zeros((4, 1, 8, D)), cache, mesh=wrong_axes), "mesh:"),
        (lambda: ks.init_caches("int8", 3, 64, 4, D, mesh=ks.make_mesh(2, 4), num_layers=1), "batch:"),
    ]
    model = _tiny_model(2)
    cases += [
        (lambda: kvq.generate(model, np.zeros((3, 5), np.int32), 2, mesh=ks.make_mesh(2, 4)), "tokens: batch 3"),
        (lambda: kvq.generate(model, np.zeros((2, 5), np.int32), 2, mesh=wrong_axes), "mesh:"),
        (lambda: kvq.teacher_force(model, np.zeros((3, 5), np.int32), np.zeros((3, 2), np.int32),
                                   mesh=ks.make_mesh(2, 4)), "tokens: batch 3"),
    ]
    for fn, prefix in cases:
        _expect_value_error(fn, prefix)
    try:
        ks.shard_cache({"k": cache}, ks.make_mesh(2, 4))
    except TypeError as e:
        if not str(e).startswith("cache:"):
            _fail(f"TypeError does not name cache: {e}")
    else:
        _fail("a dict of caches was accepted")


# ----------------------------------------------------------------------------- shard_cache


def check_shard_cache_places_every_leaf():
    rng = np.random.default_rng(0)
    mesh = ks.make_mesh(2, 4)

    def filled(c):  # every leaf random (numpy), so a misplaced or mixed-up shard shows in the values
        return jax.tree.map(lambda x: rng.integers(0, 7, x.shape).astype(np.dtype(x.dtype)), c)

    for spec in ("int8", "int4-kivi", "bf16", SINKS_SPEC):
        for hkv, split in ((4, True), (8, True), (2, False), (1, False), (6, False)):
            c = filled(kvq.init_cache(spec, B, 64, hkv, D))
            s = ks.shard_cache(c, mesh)
            _assert_cache_placed(s, mesh, split, f"{spec} Hkv={hkv}")
            _assert_trees_equal(c, s, f"{spec} Hkv={hkv} values")
            if ks.kv_heads_sharded(hkv, mesh) != split:
                _fail(f"kv_heads_sharded({hkv})")
    # tuples and lists keep their type; an already placed cache is not copied
    cs = [kvq.init_cache("int8", B, 64, 4, D), kvq.init_cache("int4-kivi", B, 64, 4, D)]
    for container in (tuple, list):
        placed = ks.shard_cache(container(cs), mesh)
        if type(placed) is not container:
            _fail(f"shard_cache({container.__name__}) returned {type(placed).__name__}")
        for i, c in enumerate(placed):
            _assert_cache_placed(c, mesh, True, f"{container.__name__}[{i}]")
    again = ks.shard_cache(placed, mesh)
    if again[0].k is not placed[0].k:
        _fail("shard_cache copied an already placed leaf")
    # created sharded
    made = ks.init_caches("int4-kivi", B, 64, 2, D, mesh=mesh, num_layers=2)
    for i, c in enumerate(made):
        _assert_cache_placed(c, mesh, False, f"init_caches[{i}]")
    specs = ks.cache_partition_specs(kvq.init_cache("int8", B, 64, 4, D), mesh)
    if _norm(specs.k, 4) != ("data", "model", None, None) or _norm(specs.lengths, 1) != ("data",):
        _fail(f"cache_partition_specs: {specs}")


# ----------------------------------------------------------------------------- append + attend

def _append_twice_and_attend(c, k1, v1, n1, k2, v2, q, *, impls, mesh):
    """Ragged prefill, a 2-token append, then attention of 2 queries with each impl;
    per shard when a mesh is given, else `kvq.append` / `kvq.attend` on one device."""
    if mesh is None:
        c = kvq.append(kvq.append(c, k1, v1, n1), k2, v2)
        return c, [kvq.attend(q, c, impl=i) for i in impls]
    c = ks.shard_append(ks.shard_append(c, k1, v1, n1, mesh=mesh), k2, v2, mesh=mesh)
    return c, [ks.shard_attend(q, c, mesh=mesh, impl=i) for i in impls]


_run_case = jax.jit(_append_twice_and_attend, static_argnames=("impls", "mesh"))


def _append_attend_case(spec, hkv, hq, mesh, impls, heads_split, q_spec, seed, eager=False):
    rng = np.random.default_rng(seed)
    T = 24
    k1, v1 = _rand(rng, (B, T, hkv, D)), _rand(rng, (B, T, hkv, D))
    n1 = jnp.asarray([24, 5, 17, 1], jnp.int32)
    k2, v2 = _rand(rng, (B, 2, hkv, D)), _rand(rng, (B, 2, hkv, D))
    q = _rand(rng, (B, 2, hq, D))
    args = (k1, v1, n1, k2, v2, q)
    ref, want = _run_case(kvq.init_cache(spec, B, 64, hkv, D), *args, impls=impls, mesh=None)
    c, got = _run_case(ks.shard_cache(kvq.init_cache(spec, B, 64, hkv, D), mesh), *args, impls=impls, mesh=mesh)
    what = f"{spec} Hkv={hkv} Hq={hq} mesh={dict(mesh.shape)}"
    _assert_cache_placed(c, mesh, heads_split, what + " appended cache")
    _assert_trees_equal(ref, c, what + " append")  # bit-identical storage
    for impl, g, w in zip(impls, got, want):
        _assert_sharded_as(g, q_spec, f"{what} {impl} output")
        w = np.asarray(w)
        err = float(np.max(np.abs(np.asarray(g) - w)))
        if not err <= 2e-6 * max(1.0, float(np.max(np.abs(w)))):
            _fail(f"{what} {impl}: sharded attend differs from one device by {err}")
    if eager:  # outside jit: same values and shardings
        c1 = ks.shard_append(ks.shard_cache(kvq.init_cache(spec, B, 64, hkv, D), mesh), k1, v1, n1, mesh=mesh)
        c1 = ks.shard_append(c1, k2, v2, mesh=mesh)
        _assert_cache_placed(c1, mesh, heads_split, what + " eager append")
        _assert_trees_equal(ref, c1, what + " eager append")
        g = ks.shard_attend(q, c1, mesh=mesh, impl=impls[0])
        _assert_sharded_as(g, q_spec, what + " eager output")
        np.testing.assert_allclose(np.asarray(g), np.asarray(want[0]), rtol=0, atol=2e-6)


def check_append_attend_int8_heads_sharded():
    _append_attend_case("int8", 4, 8, ks.make_mesh(2, 4), ("xla", "pallas"), True, P("data", None, "model"), 1,
                        eager=True)


def check_append_attend_int4_kivi_heads_sharded():
    _append_attend_case("int4-kivi", 4, 8, ks.make_mesh(2, 4), ("xla", "pallas"), True,
                        P("data", None, "model"), 2)


def check_append_attend_bf16_sinks_heads_sharded():
    _append_attend_case("bf16", 2, 4, ks.make_mesh(4, 2), ("xla",), True, P("data", None, "model"), 3)
    _append_attend_case(SINKS_SPEC, 2, 4, ks.make_mesh(4, 2), ("xla",), True, P("data", None, "model"), 4)


def check_append_attend_heads_replicated():
    # Hkv 2 < model 4: KV heads replicated, query heads split (each device reads one KV head)
    _append_attend_case("int8", 2, 8, ks.make_mesh(2, 4), ("xla", "pallas"), False, P("data", None, "model"), 5)
    # Hq 2 not a multiple of 4: every device computes every head
    _append_attend_case("int8", 1, 2, ks.make_mesh(2, 4), ("xla",), False, P("data"), 7)


def _paged_case(spec, hkv, hq, mesh, impls, seed, append_impl="auto"):
    """A paged cache on a mesh: pages split over "data" (local page indices), KV heads over
    "model"; append (per shard with ``append_impl``) + attend per shard equal `append_paged` /
    `attend_paged` on one device (scatters) with the same pages in global numbering, bit for bit
    in storage."""
    from kvq_jax.serve import append_paged, attend_paged, init_paged_cache

    rng = np.random.default_rng(seed)
    d = mesh.shape["data"]
    ps, npg, per = 64, 8, 2  # page size, pool pages, table entries per sequence
    per_shard = B // d  # sequences per data shard; each takes `per` distinct pages of its shard's range
    local = np.concatenate([rng.permutation(npg // d)[: per_shard * per].reshape(per_shard, per)
                            for _ in range(d)]).astype(np.int32)
    offset = (np.arange(B) // (B // d) * (npg // d))[:, None]
    T = 40
    k1, v1 = _rand(rng, (B, T, hkv, D)), _rand(rng, (B, T, hkv, D))
    n1 = jnp.asarray([40, 5, 33, 1], jnp.int32)
    k2, v2 = _rand(rng, (B, 2, hkv, D)), _rand(rng, (B, 2, hkv, D))
    q = _rand(rng, (B, 2, hq, D))

    @functools.partial(jax.jit, static_argnames=("sharded",))
    def run(c, sharded):
        if sharded:
            c = ks.shard_append(ks.shard_append(c, k1, v1, n1, mesh=mesh, impl=append_impl), k2, v2, mesh=mesh,
                                impl=append_impl)
            return c, [ks.shard_attend(q, c, mesh=mesh, impl=i) for i in impls]
        c = append_paged(append_paged(c, k1, v1, n1, impl="xla"), k2, v2, impl="xla")
        return c, [attend_paged(q, c, impl=i) for i in impls]

    ref, want = run(init_paged_cache(spec, B, npg, ps, per, hkv, D, page_table=local + offset), False)
    # local page numbers repeat across shards, which a one-device table forbids: set the table directly
    empty = init_paged_cache(spec, B, npg, ps, per, hkv, D)
    placed = ks.shard_cache(dataclasses.replace(empty, page_table=jnp.asarray(local)), mesh)
    c, got = run(placed, True)
    what = f"paged {spec} mesh={dict(mesh.shape)}"
    _assert_sharded_as(c.k, P("data", "model", None, None), what + " pool")
    _assert_sharded_as(c.page_table, P("data", None), what + " page table")
    if {s.data.shape for s in c.k.addressable_shards} != {(npg // d, hkv // mesh.shape["model"], ps, c.k.shape[3])}:
        _fail(f"{what}: pool shard shapes {[s.data.shape for s in c.k.addressable_shards]}")
    pools = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero", "res_k", "res_v", "lengths", "overflow")
    _assert_trees_equal([getattr(ref, n) for n in pools], [getattr(c, n) for n in pools], what + " append")
    for impl, g, w in zip(impls, got, want):
        err = float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
        if not err <= 2e-6 * max(1.0, float(np.max(np.abs(np.asarray(w))))):
            _fail(f"{what} {impl}: sharded attend differs from one device by {err}")
    try:
        ks.shard_cache(init_paged_cache(spec, B, 7, ps, per, hkv, D), mesh)
    except ValueError as e:
        if "7 pages" not in str(e):
            _fail(f"{what}: indivisible pool error {e}")
    else:
        _fail(f"{what}: a pool of 7 pages on data={d} did not raise")


def check_paged_cache_sharded():
    _paged_case("int8", 2, 4, ks.make_mesh(2, 2), ("xla", "pallas"), 11, append_impl="pallas")  # the write kernel per shard
    _paged_case("int4-kivi", 4, 8, ks.make_mesh(2, 4), ("xla",), 12)


def check_shard_append_errors_as_append():
    mesh = ks.make_mesh(2, 4)
    c = ks.shard_cache(kvq.init_cache("int8", B, 16, 4, D), mesh)
    k = jnp.ones((B, 20, 4, D))
    for fn, prefix in ((lambda: ks.shard_append(c, k[:, :8], k[:, :8], jnp.asarray([9, 0, 0, 0]), mesh=mesh),
                        "lengths:"),
                       (lambda: ks.shard_append(c, k[:, :10], k[:, :10], mesh=mesh) and
                        ks.shard_append(ks.shard_append(c, k[:, :10], k[:, :10], mesh=mesh), k[:, :10], k[:, :10],
                                        mesh=mesh), "k: appending"),
                       (lambda: ks.shard_append(c, k[:, :1, :2], k[:, :1, :2], mesh=mesh), "k: 2 KV heads"),
                       (lambda: ks.shard_attend(jnp.ones((B, 1, 8, D)), c, mesh=mesh, impl="nope"), "impl:")):
        _expect_value_error(fn, prefix)
    # under jit an overflow is flagged, not raised, and attend gives NaN rows for it
    f = jax.jit(lambda c, k: ks.shard_append(c, k, k, mesh=mesh))
    c2 = f(f(c, k[:, :10]), k[:, :10])
    if not bool(jnp.all(c2.overflow)) or np.asarray(c2.lengths).tolist() != [10] * B:
        _fail(f"overflow under jit: {c2.overflow}, {c2.lengths}")


def _shard_maps(jaxpr):
    """Every shard_map equation in a jaxpr, nested jaxprs (jit, scan, ...) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shard_maps(inner)


def check_no_empty_leaf_crosses_shard_map():
    # a zero-size operand of a shard_map crashed XLA's GPU compiler (jax 0.11.2, 2 GPUs):
    # shard_append / shard_attend keep a cache's empty leaves (no sinks, no bf16 window) outside
    from kvq_jax.serve import init_paged_cache

    mesh = ks.make_mesh(2, 4)
    k = jnp.ones((B, 3, 4, D))
    q = jnp.ones((B, 1, 8, D))
    for c in (kvq.init_cache("int8", B, 16, 4, D), kvq.init_cache("int4-kivi", B, 64, 4, D),
              init_paged_cache("int8", B, 8, 16, 2, 4, D)):
        what = f"{type(c).__name__} {c.spec}"
        if c.spec.residual == 0 and not any(x.size == 0 for x in jax.tree.leaves(c)):
            _fail(f"{what}: expected zero-size leaves (the case this check covers)")
        c = ks.shard_cache(c, mesh)
        for name, fn in (("append", lambda c: ks.shard_append(c, k, k, mesh=mesh)),
                         ("attend", lambda c: ks.shard_attend(q, c, mesh=mesh, impl="xla"))):
            maps = list(_shard_maps(jax.make_jaxpr(fn)(c).jaxpr))
            if not maps:
                _fail(f"{what} {name}: no shard_map found")
            for eqn in maps:
                sizes = [int(np.prod(v.aval.shape)) for v in (*eqn.invars, *eqn.outvars)]
                if 0 in sizes:
                    _fail(f"{what} {name}: a zero-size operand crosses shard_map: {sizes}")


def _engine_case(spec, n_kv_heads, model_axis, impl, page=16, prefix_cache=None):
    """Engine on a ("data" 1, "model" M) mesh against the engine on one device: the same
    greedy tokens; prompts longer than a prefill chunk (chunk attention per shard); then a
    prompt sharing the first one's first 4 pages (a prefix cache hit, when on)."""
    from kvq_jax.serve import Engine

    rng = np.random.default_rng(n_kv_heads)
    prompts = [rng.integers(1, 320, n).astype(np.int32) for n in (4 * page + 6, 23)]
    mesh = ks.make_mesh(1, model_axis)
    kw = dict(kv=spec, max_batch=2, page_size=page, max_len=6 * page, prefill_chunk=2 * page, impl=impl,
              prefix_cache=prefix_cache)
    one = Engine(_tiny_model(n_kv_heads), **kw)
    many = Engine(_tiny_model(n_kv_heads), mesh=mesh, **kw)
    heads = "model" if n_kv_heads % model_axis == 0 else None
    what = f"engine {spec} Hkv={n_kv_heads} model={model_axis} {impl}"
    for group in many._kv:
        _assert_sharded_as(group["k"], P("data", heads), what + " pool")  # "data" has size 1
        _assert_sharded_as(group["res_k"], P(None, "data", heads), what + " window")
    _assert_sharded_as(many._weights["layers"][0]["attn"]["q_proj"]["kernel"][...], P(None, "model"),
                       what + " q_proj")
    got = [[many.submit(p, 9) for p in prompts], many.run()]
    want = [[one.submit(p, 9) for p in prompts], one.run()]
    for a, b in zip(got[0], want[0]):
        if got[1][a] != want[1][b]:
            _fail(f"{what}: tokens {got[1][a]} != one device {want[1][b]}")
    again = np.concatenate([prompts[0][:4 * page + 2], rng.integers(1, 320, 5).astype(np.int32)])
    hits = many.stats["prefix_hit_tokens"]
    a, b = many.submit(again, 6), one.submit(again, 6)
    while many._pending is None:  # up to the first pipelined decode step
        many.step()
    # the decode step's small inputs and its ids live replicated on the mesh: nothing to reshard per step
    for name, x in (("page tables", many._table_dev), ("key", many._key), ("no-prev ids", many._no_prev),
                    ("ids", many._pending[0])):
        if not (x.sharding.is_fully_replicated and len(x.devices()) == model_axis):
            _fail(f"{what}: the step's {name} are not replicated over the mesh: {x.sharding}")
    if many.run()[a] != one.run()[b]:
        _fail(f"{what}: tokens after a prefix hit differ from one device")
    if many.prefix_cache and many.stats["prefix_hit_tokens"] - hits != 4 * page:
        _fail(f"{what}: expected a {4 * page}-token prefix hit, stats {many.stats}")
    pa, pb = many.prefill(prompts[0]), one.prefill(prompts[0])
    if not np.allclose(pa, pb, rtol=1e-4, atol=1e-4 * np.abs(pb).max()):
        _fail(f"{what}: prefill logits differ by {np.abs(pa - pb).max()}")
    many.clear_prefix_cache()
    if many.allocator.num_used:
        _fail(f"{what}: pages leaked")


def check_engine_tensor_parallel():
    _engine_case("int8", 4, 2, "xla")  # KV heads split
    _engine_case("int4-kivi", 2, 4, "xla", page=32, prefix_cache=True)  # KV heads (and bf16 windows) replicated


def check_engine_mesh_errors():
    from kvq_jax.serve import Engine

    _expect_value_error(lambda: Engine(_tiny_model(4), kv="int8", page_size=16, mesh=ks.make_mesh(2, 2)), "mesh:")


def check_replicated_engine():
    """Data parallel: one engine per device (weights copied there, pools there), requests
    spread by outstanding tokens, the same greedy tokens as one engine; clear errors."""
    from kvq_jax.serve import Engine, ReplicatedEngine

    page = 16
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 320, n).astype(np.int32) for n in (70, 23, 41, 5, 33)]
    news = (9, 4, 12, 6, 8)
    kw = dict(kv="int4", max_batch=2, page_size=page, max_len=6 * page, prefill_chunk=2 * page, impl="xla")
    model = _tiny_model(2)
    devices = jax.devices()[1:3]  # not the default device: nothing may land there
    reps = ReplicatedEngine(model, devices=devices, **kw)
    one = Engine(_tiny_model(2), **kw)
    for d, e in zip(devices, reps.engines):
        for name, leaves in (("pool", jax.tree.leaves(e._kv)), ("weights", jax.tree.leaves(e._weights))):
            if any(x.devices() != {d} for x in leaves):
                _fail(f"replicated engine: a {name} leaf of the replica on {d} is elsewhere")
    for d, e in zip(devices, reps.engines):  # and the steps' small inputs with them
        if e._put(np.zeros(3, np.int32)).devices() != {d} or e._key.devices() != {d}:
            _fail(f"replicated engine: the replica on {d} puts its step inputs elsewhere")
    ids = [reps.submit(p, n) for p, n in zip(prompts, news)]
    where = [reps.replica_of(r) for r in ids]
    if sorted(set(where)) != [0, 1]:
        _fail(f"replicated engine: requests not spread over the replicas: {where}")
    # the first request (69 + 9 tokens) outweighs the next two together: both go to the other replica
    if where[:3] != [0, 1, 1]:
        _fail(f"replicated engine: expected the least loaded replica per request, got {where}")
    dropped = reps.cancel(ids[4])
    got = reps.run()
    want_ids = [one.submit(p, n) for p, n in zip(prompts[:4], news[:4])]
    want = one.run()
    if dropped != [] or sorted(got) != ids[:4]:
        _fail(f"replicated engine: finished {sorted(got)}, cancelled request gave {dropped}")
    for a, b in zip(ids, want_ids):
        if got[a] != want[b]:
            _fail(f"replicated engine: request {a} gave {got[a]}, one engine {want[b]}")
    if reps.num_active or reps.num_queued or reps.pending_tokens or any(e.allocator.num_used for e in reps.engines):
        _fail("replicated engine: work or pages left after run")
    if reps.stats["prefill_tokens"] != sum(map(len, prompts[:4])):
        _fail(f"replicated engine: stats {reps.stats}")
    _expect_value_error(lambda: ReplicatedEngine(model, mesh=ks.make_mesh(1, 2), **kw), "mesh:")
    _expect_value_error(lambda: ReplicatedEngine(model, devices=[], **kw), "devices:")
    _expect_value_error(lambda: ReplicatedEngine(model, devices=[devices[0]] * 2, **kw), "devices:")
    _expect_value_error(lambda: reps.cancel(ids[0]), "rid:")


# ----------------------------------------------------------------------------- weights


def check_shard_params_megatron():
    mesh = ks.make_mesh(2, 4)
    model = _tiny_model(4)
    ks.shard_params(model, mesh)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    expect = {
        "q_proj": (attn.q_proj.kernel, P(None, "model")), "k_proj": (attn.k_proj.kernel, P(None, "model")),
        "v_proj": (attn.v_proj.kernel, P(None, "model")), "o_proj": (attn.o_proj.kernel, P("model", None)),
        "gate": (mlp.gate.kernel, P(None, "model")), "up": (mlp.up.kernel, P(None, "model")),
        "down": (mlp.down.kernel, P("model", None)), "embed": (model.embed.embedding, P("model", None)),
        "lm_head": (model.lm_head.kernel, P(None, "model")), "norm": (model.norm.scale, P()),
        "attn_norm": (model.layers[1].attn_norm.scale, P()),
    }
    for name, (var, spec) in expect.items():
        _assert_sharded_as(var[...], spec, name)
    # Hkv 2 on a model axis of 4: k/v projections replicated (the cache is), q/o still split
    specs = ks.param_partition_specs(_tiny_model(2), mesh)
    layer = specs["layers"][0]["attn"]
    got = {n: _norm(layer[n]["kernel"].get_value(), 2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    want = {"q_proj": (None, "model"), "k_proj": (None, None), "v_proj": (None, None), "o_proj": ("model", None)}
    if got != want:
        _fail(f"param specs with Hkv < model: {got}")


# ----------------------------------------------------------------------------- generate

_PROMPTS = np.random.default_rng(11).integers(0, 320, (B, 21)).astype(np.int32)
_LENS = np.asarray([21, 9, 14, 3], np.int32)


def _compare_generate(ref, out, mesh, heads_split, what):
    """``out`` (a run on ``mesh``) gives ``ref``'s tokens and keeps its shardings."""
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=what)
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths), err_msg=what)
    if out.steps != ref.steps:
        _fail(f"{what}: steps {out.steps} != {ref.steps}")
    _assert_sharded_as(out.tokens, P("data", None), what + " tokens")
    _assert_sharded_as(out.lengths, P("data"), what + " lengths")
    _assert_sharded_as(out.prompt_lengths, P("data"), what + " prompt_lengths")
    for i, (c, r) in enumerate(zip(out.caches, ref.caches, strict=True)):
        _assert_cache_placed(c, mesh, heads_split, f"{what} caches[{i}]")
        np.testing.assert_array_equal(np.asarray(c.lengths), np.asarray(r.lengths), err_msg=what)


def _generate_case(hkv, mesh, kv, impl, heads_split, n_new=6, placed_model=None):
    """generate on one device and on ``mesh`` (under a transfer guard): same tokens, kept shardings."""
    model = _tiny_model(hkv)
    ref = kvq.generate(model, _PROMPTS, n_new, kv=kv, prompt_lengths=_LENS, impl=impl)
    with jax.transfer_guard("disallow"):  # every host<->device transfer of the call is explicit
        out = kvq.generate(placed_model or model, _PROMPTS, n_new, kv=kv, prompt_lengths=_LENS, impl=impl,
                           mesh=mesh)
    _compare_generate(ref, out, mesh, heads_split, f"generate Hkv={hkv} {kv} {impl} mesh={dict(mesh.shape)}")
    return model, ref, out


@functools.lru_cache(maxsize=None)
def _first_turn():
    """One generate call on a (2, 2) mesh with weights placed by shard_params, and its one-device twin."""
    mesh = ks.make_mesh(2, 2)
    placed = ks.shard_params(_tiny_model(2), mesh)
    weight = placed.layers[0].attn.q_proj.kernel[...]
    model, ref, out = _generate_case(2, mesh, "int8", "xla", True, placed_model=placed)
    if placed.layers[0].attn.q_proj.kernel[...] is not weight:
        _fail("generate replaced weights already placed by shard_params")
    return mesh, model, placed, ref, out


def _hlo_text(model, mesh, kv, impl, n_new=6):
    """The compiled HLO of generate's jitted loop for the inputs `_generate_case` passes
    (same shapes, shardings and static arguments: jax's compilation cache serves it)."""
    hkv, Tb = model.num_kv_heads, gen_mod.bucket_length(_PROMPTS.shape[1])
    caches = ks.init_caches(kvq.resolve_policy(kv, model.num_layers), B, Tb + n_new, hkv, model.head_dim,
                            mesh=mesh)
    args = (ks.global_array(np.zeros((B, Tb), np.int32), mesh, P("data", None)),
            ks.global_array(np.full((B,), Tb, np.int32), mesh, P("data")),
            ks.global_array(jax.random.key(0), mesh, P()), ks.global_array(np.int32(0), mesh, P()))
    graphdef = nnx.split(model)[0]
    lowered = gen_mod._generate_jit.lower(
        graphdef, ks.shard_state(model, mesh), caches, *args, max_new_tokens=n_new, sampler=gen_mod.GREEDY,
        eos_ids=(), fresh=True, impl=impl, streaming=False, scan_layers=True, mesh=mesh)
    return lowered.as_text(), lowered.compile().as_text(), caches[0].body_capacity


_HOST_OPS = re.compile(r"\b(send|recv|send-done|recv-done|infeed|outfeed)\(|callback", re.I)
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?)\s+(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                         r"(-start)?\(")


def _check_hlo(lowered, text, S, what):
    """No host transfer in the compiled loop, no collective moving a cache-sized array, and
    attention through the caches in manual (shard_map) computations."""
    if not re.search(r"manual_computation|SPMDFullToShardShape", lowered):
        _fail(f"{what}: no shard_map in the lowered program")
    if _HOST_OPS.search(text):
        _fail(f"{what}: compiled loop has a host transfer: {_HOST_OPS.search(text).group(0)}")
    for m in _COLLECTIVE.finditer(text):
        dims = [int(x) for x in re.findall(r"\d+", re.sub(r"\{[^}]*\}", "", m.group(1)))]
        if S in dims:
            _fail(f"{what}: a collective moves a cache-sized array: {m.group(0)}")
    if "while" not in text:
        _fail(f"{what}: no while loop in the compiled text")


def check_generate_heads_sharded():
    mesh, model, _, _, _ = _first_turn()
    lowered, text, S = _hlo_text(model, mesh, "int8", "xla")
    _check_hlo(lowered, text, S, "generate int8 xla")


def check_generate_pallas():
    mesh = ks.make_mesh(2, 2)
    model, _, _ = _generate_case(2, mesh, "int8", "pallas", True)
    lowered, text, S = _hlo_text(model, mesh, "int8", "pallas")
    _check_hlo(lowered, text, S, "generate int8 pallas")


def check_generate_heads_replicated():
    mesh = ks.make_mesh(2, 4)  # Hkv 2 < model 4
    model, _, _ = _generate_case(2, mesh, "bf16", "xla", False)
    lowered, text, S = _hlo_text(model, mesh, "bf16", "xla")
    _check_hlo(lowered, text, S, "generate bf16 replicated heads")


def check_generate_continues_sharded_caches_and_teacher_force():
    mesh, model, placed, a, b = _first_turn()
    nxt = np.asarray(a.tokens)[:, -1:]
    a2 = kvq.generate(model, nxt, 4, kv="int8", impl="xla", caches=a.caches)
    seen = []  # streaming on a mesh: unordered callbacks, delivered in step order
    with jax.transfer_guard("disallow"):
        b2 = kvq.generate(placed, nxt, 4, kv="int8", impl="xla", caches=b.caches, mesh=mesh,
                          stream=lambda i, t, act: seen.append((i, t.tolist())))
    _compare_generate(a2, b2, mesh, True, "second turn")
    if [i for i, _ in seen] != list(range(4)) or np.asarray([t for _, t in seen]).T.tolist() != \
            np.asarray(b2.tokens).tolist():
        _fail(f"stream saw {seen}, generated {np.asarray(b2.tokens).tolist()}")
    # teacher forcing along the first turn's greedy tokens picks those very tokens again
    targets = np.asarray(a.tokens)
    lb, cb = kvq.teacher_force(placed, _PROMPTS, targets, kv="int8", prompt_lengths=_LENS, impl="xla", mesh=mesh)
    np.testing.assert_array_equal(np.argmax(np.asarray(lb), axis=-1), targets, err_msg="teacher_force argmax")
    _assert_sharded_as(lb, P("data"), "teacher_force logits")
    for i, c in enumerate(cb):
        _assert_cache_placed(c, mesh, True, f"teacher_force caches[{i}]")


# ----------------------------------------------------------------------------- runner


def main(argv):
    out_path = argv[1] if len(argv) > 1 else None
    only = set(argv[2:])
    checks = [(n, f) for n, f in globals().items() if n.startswith("check_") and callable(f)]
    results, t_all = {}, time.perf_counter()
    cpu0 = 0.0
    for name, fn in checks:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (reported, with its traceback)
            results[name] = traceback.format_exc()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        cpu = cpu.ru_utime + cpu.ru_stime
        print(f"{name}: {'ok' if results[name] == 'ok' else 'FAILED'} ({time.perf_counter() - t0:.1f} s, "
              f"cpu {cpu - cpu0:.1f} s)", flush=True)
        cpu0 = cpu
    print(f"total {time.perf_counter() - t_all:.1f} s", flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f)
    failed = [n for n, r in results.items() if r != "ok"]
    for n in failed:
        print(f"--- {n}\n{results[n]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
