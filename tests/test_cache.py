"""KVCache: sizes, pytree behaviour under jit / scan / vmap / donation, the sink / body /
residual split at group edges, incremental vs one-shot appends, overflow, bad input."""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax import KVSpec

PRESET_NAMES = ["bf16", "fp8", "int8", "int4", "int4-kivi", "int2-kivi", "int4-rot", "k8v4", "int2"]


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32) if x.dtype != bool else x),
                                      np.asarray(y.astype(jnp.float32) if y.dtype != bool else y))


def _seq(cache, b, flag=True):
    """The leaves of sequence b only (all leaves are batch-major); without the overflow flag
    when ``flag`` is False."""
    if not flag:
        cache = dataclasses.replace(cache, overflow=jnp.zeros_like(cache.overflow))
    return jax.tree_util.tree_map(lambda x: x[b], cache)


# -- sizes ---------------------------------------------------------------------------

# Bytes per token per (layer, KV head) at head_dim 128, bf16 scales (the presets'), by hand:
# data = 128 * bits / 8, plus 2 bytes per scale (and per zero point when asymmetric).
BPT_HEAD_D128 = {
    "bf16": 2 * (128 * 2),
    "fp8": 2 * (128 + 2),                               # one scale per token and head
    "int8": 2 * (128 + 2),
    "int4": 2 * (64 + 2 * 4),                           # g32: 4 scales
    "int4-kivi": (64 + 2 * 2 * 128 // 32) + (64 + 2 * 2 * 4),  # K: scale+zero per channel per 32 tokens
    "int2-kivi": (32 + 2 * 2 * 128 // 32) + (32 + 2 * 2 * 4),
    "int4-rot": 2 * (64 + 2 * 2 * 4),                   # g32 asym
    "k8v4": (128 + 2) + (64 + 2 * 2 * 4),
    "int2": 2 * (32 + 2 * 2 * 4),
}


def test_bytes_per_token_bf16_reference_value():
    assert kvq.bytes_per_token("bf16", 32, 8, 128) == 131072


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_bytes_per_token_presets(name):
    assert kvq.bytes_per_token(name, 32, 8, 128) == BPT_HEAD_D128[name] * 32 * 8
    assert kvq.bytes_per_token(KVSpec.parse(name), 1, 1, 128) == BPT_HEAD_D128[name]


def test_bytes_per_token_scale_dtype_and_rounding():
    # bf16 scales: 2 bytes each
    assert kvq.bytes_per_token("k=int8,v=int8,scale=bf16", 1, 1, 128) == 2 * (128 + 2)
    # per-channel keys over tg=3 tokens at D=64: K 32*3 + 2*64*4 = 608 per 3 tokens,
    # V (64 + 4) * 3 = 204: 812 / 3 = 270.67 -> rounded up to 271
    assert kvq.bytes_per_token("k=int4:c:asym,v=int8,tg=3", 1, 1, 64) == 271
    assert kvq.bytes_per_token("k=int4:c:asym,v=int8,tg=3", 2, 3, 64) == 271 * 6


@pytest.mark.parametrize("name", PRESET_NAMES + ["k=int4:c:asym,v=int4:g16:asym,tg=16,res=8,sinks=3",
                                                 "k=int8,v=int8,sinks=4,res=16,scale=bf16"])
def test_init_cache_layout_and_nbytes(name):
    spec = KVSpec.parse(name)
    B, L, H, D = 2, 100, 2, 64
    c = kvq.init_cache(name, B, L, H, D)
    assert c.spec == spec and c.max_len == L and c.head_dim == D and c.batch == B
    leaves = jax.tree_util.tree_leaves(c)
    assert c.nbytes == sum(x.nbytes for x in leaves)
    S = c.body_capacity
    assert S >= L - spec.sinks
    per_head = {"bf16": D, "fp8": D, "int8": D, "int4": D // 2, "int2": D // 4}
    assert c.k.shape == (B, H, S, per_head[spec.k.format])
    assert c.v.shape == (B, H, S, per_head[spec.v.format])
    gran = spec.token_group if spec.channel_keys else 1
    R = spec.residual + gran - 1 if spec.quantized else 0
    assert c.res_k.shape == c.res_v.shape == (B, H, R, D)
    assert c.sink_k.shape == c.sink_v.shape == (B, H, spec.sinks, D)
    assert c.res_k.dtype == c.sink_k.dtype == jnp.bfloat16
    assert c.lengths.dtype == jnp.int32 and c.lengths.shape == (B,)
    assert c.overflow.dtype == jnp.bool_ and not bool(c.overflow.any())
    if spec.channel_keys:
        assert c.k_scale.shape == (B, H, S // spec.token_group, D)
    # the body's storage is exactly bytes_per_token per slot
    body = [x for x in (c.k, c.k_scale, c.k_zero, c.v, c.v_scale, c.v_zero) if x is not None]
    assert sum(x.nbytes for x in body) == kvq.bytes_per_token(spec, 1, H, D) * B * S
    # nbytes counts everything: body + bf16 residual and sinks + lengths + flags
    assert c.nbytes == (sum(x.nbytes for x in body) + 2 * 2 * B * H * (R + spec.sinks) * D
                        + 4 * B + B)


def test_init_cache_accepts_numpy_ints_everywhere():
    # batch, max_len and num_kv_heads accept numpy integers (e.g. read from a config array);
    # head_dim should too, rather than "head_dim: expected a positive int, got 64".
    c = kvq.init_cache("int8", np.int64(2), np.int64(16), np.int64(1), 64)
    assert c.batch == 2 and c.max_len == 16
    c = kvq.init_cache("int8", 2, 16, 1, np.int64(64))
    assert c.head_dim == 64
    assert kvq.bytes_per_token("int8", 1, 1, np.int64(64)) == 2 * (64 + 2)


def test_init_cache_bad_input():
    with pytest.raises(ValueError, match="batch"):
        kvq.init_cache("int8", 0, 16, 1, 64)
    with pytest.raises(ValueError, match="max_len"):
        kvq.init_cache("int8", 1, -1, 1, 64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kvq.init_cache("int8", 1, 16, 0, 64)
    with pytest.raises(ValueError, match="name"):
        kvq.init_cache("int5", 1, 16, 1, 64)
    with pytest.raises(TypeError, match="dtype"):
        kvq.init_cache("int8", 1, 16, 1, 64, dtype=jnp.int8)


# -- pytree, jit, scan, vmap, donation ---------------------------------------------

SMALL_KIVI = "k=int4:c:asym,v=int4:g16:asym,tg=8,res=8"


def test_pytree_round_trip_and_jit_init_with_static_spec():
    spec = KVSpec.parse("int4-kivi")
    c = kvq.init_cache(spec, 2, 64, 2, 32)
    leaves, tree = jax.tree_util.tree_flatten(c)
    c2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(c2, kvq.KVCache) and c2.spec == spec and c2.max_len == 64
    c3 = jax.tree_util.tree_map(lambda x: x + 0, c)
    assert isinstance(c3, kvq.KVCache) and c3.spec is c.spec
    init = jax.jit(kvq.init_cache, static_argnums=(0, 1, 2, 3, 4))
    c4 = init(spec, 2, 64, 2, 32)
    _leaves_equal(c, c4)


def _prefill(kv, spec, B=2, H=2, D=16, L=64, T=20, seed=0):
    rng = np.random.default_rng(seed)
    c = kvq.init_cache(spec, B, L, H, D)
    k, v = kv.bf16_normal(rng, (B, T, H, D)), kv.bf16_normal(rng, (B, T, H, D))
    return kv.append(c, k, v, jnp.asarray([T, T - 7][:B], jnp.int32)), rng


def test_lax_scan_over_decode_steps_matches_a_python_loop(kv):
    B, H, G, D, N = 2, 2, 2, 16, 12
    c0, rng = _prefill(kv, SMALL_KIVI, B, H, D)
    ks, vs = kv.bf16_normal(rng, (N, B, 1, H, D)), kv.bf16_normal(rng, (N, B, 1, H, D))
    qs = jnp.asarray(rng.standard_normal((N, B, 1, G * H, D)), jnp.float32)

    @jax.jit
    def decode(cache, ks, vs, qs):
        def step(c, x):
            k, v, q = x
            c = kvq.append(c, k, v)
            return c, kvq.attend(q, c, impl="xla")
        return jax.lax.scan(step, cache, (ks, vs, qs))

    c_scan, outs = decode(c0, ks, vs, qs)
    c = c0
    for i in range(N):
        c = kv.append(c, ks[i], vs[i], jnp.ones((B,), jnp.int32))
        np.testing.assert_allclose(np.asarray(outs[i]), np.asarray(kv.attend(qs[i], c, impl="xla")),
                                   rtol=1e-6, atol=1e-6)
    _leaves_equal(c_scan, c)
    np.testing.assert_array_equal(np.asarray(c_scan.lengths), [20 + N, 13 + N])


def test_jit_with_donated_cache(kv):
    c0, rng = _prefill(kv, SMALL_KIVI)
    k, v = kv.bf16_normal(rng, (2, 3, 2, 16)), kv.bf16_normal(rng, (2, 3, 2, 16))
    expect = kv.append(c0, k, v, jnp.asarray([3, 3], jnp.int32))
    c_copy = jax.tree_util.tree_map(jnp.copy, c0)
    step = jax.jit(lambda c, k, v: kvq.append(c, k, v), donate_argnums=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backends that cannot donate say so
        got = step(c_copy, k, v)
    _leaves_equal(got, expect)


def test_vmap_over_stacked_layer_caches(kv):
    Lyr, B, H, D = 3, 2, 2, 16
    rng = np.random.default_rng(5)
    c = kvq.init_cache(SMALL_KIVI, B, 48, H, D)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x] * Lyr), c)
    k, v = kv.bf16_normal(rng, (Lyr, B, 21, H, D)), kv.bf16_normal(rng, (Lyr, B, 21, H, D))
    q = jnp.asarray(rng.standard_normal((Lyr, B, 2, 2 * H, D)), jnp.float32)
    lens = jnp.asarray([21, 17], jnp.int32)
    stacked = jax.jit(jax.vmap(kvq.append, in_axes=(0, 0, 0, None)))(stacked, k, v, lens)
    outs = jax.jit(jax.vmap(lambda q, c: kvq.attend(q, c, impl="xla")))(q, stacked)
    for i in range(Lyr):
        ci = kv.append(c, k[i], v[i], lens)
        _leaves_equal(jax.tree_util.tree_map(lambda x: x[i], stacked), ci)
        np.testing.assert_allclose(np.asarray(outs[i]), np.asarray(kv.attend(q[i], ci, impl="xla")),
                                   rtol=1e-6, atol=1e-6)


# -- the sink / body / residual split ------------------------------------------------

SPLIT_CASES = [
    # KIVI preset: residual 128, token groups of 32: just below, at and above group edges
    ("int4-kivi", 32, [159, 160, 161, 191, 192, 193, 1, 127, 128, 129]),
    # attention sinks with per-token int8 and a residual window
    ("k=int8,v=int8,sinks=4,res=16", 16, [1, 3, 4, 5, 19, 20, 21, 37]),
    # sinks + per-channel keys (KIVI with small groups) together
    ("k=int4:c:asym,v=int4:g16:asym,tg=8,res=16,sinks=3", 16, [2, 3, 4, 19, 26, 27, 28, 35]),
    ("int4-rot", 32, [1, 2, 33]),
    # rotation + per-channel keys + sinks; sinks with no residual window
    ("k=int4:c:asym,v=int4:g16:asym,tg=8,res=8,sinks=1,rot", 16, [1, 9, 16, 17, 18, 25]),
    ("k=fp8,v=int4:g16:asym,sinks=2", 16, [1, 2, 3, 9]),
    ("bf16", 16, [1, 5]),
]


@pytest.fixture(scope="module")
def split_runs(kv):
    """For each case: the cache filled all at once, and filled one token at a time."""
    runs = {}
    for name, D, lens in SPLIT_CASES:
        spec = KVSpec.parse(name)
        B, H, T = len(lens), 2, max(lens)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        k = kv.bf16_normal(rng, (B, T, H, D), outlier_channels=(1, 5))
        v = kv.bf16_normal(rng, (B, T, H, D))
        L = jnp.asarray(lens, jnp.int32)
        c0 = kvq.init_cache(spec, B, T + 3, H, D)
        whole = kv.append(c0, k, v, L)

        @jax.jit
        def one_by_one(c, k, v, L):
            def step(c, t):
                kt = jax.lax.dynamic_slice_in_dim(k, t, 1, axis=1)
                vt = jax.lax.dynamic_slice_in_dim(v, t, 1, axis=1)
                return kvq.append(c, kt, vt, (t < L).astype(jnp.int32)), None
            return jax.lax.scan(step, c, jnp.arange(k.shape[1]))[0]

        runs[name] = dict(spec=spec, k=k, v=v, lens=lens, whole=whole, single=one_by_one(c0, k, v, L))
    return runs


@pytest.mark.xdist_group("split-runs")  # one worker computes the module's `split_runs`
@pytest.mark.parametrize("name", [c[0] for c in SPLIT_CASES])
def test_split_matches_the_documented_semantics(kv, split_runs, name):
    r = split_runs[name]
    spec, c = r["spec"], r["whole"]
    np.testing.assert_array_equal(np.asarray(c.lengths), r["lens"])
    got = np.stack([np.asarray(a) for a in c.segments()], 1)
    want = np.array([kv.expected_split(spec, n) for n in r["lens"]])
    np.testing.assert_array_equal(got, want)
    if name == "int4-kivi":  # the docstring's semantics, written out
        assert want[:, 1].tolist() == [0, 32, 32, 32, 64, 64, 0, 0, 0, 0]
        assert want[:, 2].tolist() == [159, 128, 129, 159, 128, 129, 1, 127, 128, 129]
    # sinks and residual hold the exact bf16 tokens; the body holds them within scale / 2
    k = np.asarray(r["k"].astype(jnp.float32), np.float64)
    v = np.asarray(r["v"].astype(jnp.float32), np.float64)
    h = kv.hadamard_np(c.head_dim)
    for b, (K, V) in enumerate(kv.cache_kv_f64(c)):
        n = r["lens"][b]
        ns, nq, nr = want[b]
        orig_k, orig_v = k[b, :n].transpose(1, 0, 2), v[b, :n].transpose(1, 0, 2)
        quant = slice(ns, ns + nq)
        for X, O in ((K, orig_k), (V, orig_v)):
            assert X.shape == O.shape
            np.testing.assert_array_equal(X[:, :ns], O[:, :ns])
            np.testing.assert_array_equal(X[:, ns + nq:], O[:, ns + nq:])
        if spec.k.format in ("int8", "int4", "int2") and nq:
            # body error <= scale / 2 per element, in the stored (rotated) basis
            for X, O, t, s in ((K, orig_k, spec.k, c.k_scale), (V, orig_v, spec.v, c.v_scale)):
                s = np.asarray(s[b].astype(jnp.float32), np.float64)
                if t.axis == "token":
                    e = np.repeat(s, c.head_dim // s.shape[-1], axis=-1)[:, :nq] / 2
                else:
                    e = np.repeat(s, spec.token_group, axis=-2)[:, :nq] / 2
                Xq, Oq = X[:, quant], O[:, quant]
                if spec.rotate:
                    Xq, Oq = Xq @ h, Oq @ h
                assert np.all(np.abs(Xq - Oq) <= e + 1e-5 * (np.abs(Oq) + e)), name


@pytest.mark.xdist_group("split-runs")  # one worker computes the module's `split_runs`
@pytest.mark.parametrize("name", [c[0] for c in SPLIT_CASES])
def test_one_token_at_a_time_equals_all_at_once(kv, split_runs, name):
    r = split_runs[name]
    B, H, D = r["whole"].batch, r["whole"].num_kv_heads, r["whole"].head_dim
    q = jnp.asarray(np.random.default_rng(3).standard_normal((B, 1, 2 * H, D)), jnp.float32)
    o1 = kv.attend(q, r["single"], impl="xla")
    o2 = kv.attend(q, r["whole"], impl="xla")
    if not r["spec"].rotate:
        _leaves_equal(r["single"], r["whole"])
        np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    else:
        # The f32 Hadamard matmul rounds differently for a window of 1 token than for 33,
        # so scales may differ in the last ulp and a grid value by one step: same split,
        # equivalent (not bit-identical) storage.
        a, b = r["single"], r["whole"]
        np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
        for s1, s2 in ((a.k_scale, b.k_scale), (a.v_scale, b.v_scale), (a.k_zero, b.k_zero)):
            np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-6)
        for d1, d2, t in ((a.k, b.k, a.spec.k), (a.v, b.v, a.spec.v)):
            g1, g2 = kv.unpack_np(d1, t), kv.unpack_np(d2, t)
            assert np.abs(g1 - g2).max() <= 1 and np.mean(g1 != g2) < 0.01
        for K1, K2 in zip(kv.cache_kv_f64(a), kv.cache_kv_f64(b)):
            scale_max = float(np.asarray(b.k_scale).max()) + float(np.asarray(b.v_scale).max())
            np.testing.assert_allclose(K1[0], K2[0], atol=scale_max)
            np.testing.assert_allclose(K1[1], K2[1], atol=scale_max)
        np.testing.assert_allclose(np.asarray(o1), kv.attention_f64(q, kv.cache_kv_f64(a)),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o2), kv.attention_f64(q, kv.cache_kv_f64(r["whole"])),
                               rtol=1e-5, atol=1e-5)


def test_one_token_at_a_time_equals_all_at_once_for_f32_inputs(kv):
    """f32 k/v (not bf16-exact): the same tokens must be stored the same way whether they
    arrive in one call or one at a time. append quantizes a token from its f32 value when
    it goes straight into the body, but from its bf16 residual copy when it passed through
    the residual first, so the body (and attention) depend on how the tokens were chunked."""
    spec = "k=int4:c:asym,v=int4:g16:asym,tg=8,res=16,sinks=3"
    B, T, H, D = 2, 40, 2, 16
    rng = np.random.default_rng(4)
    k = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    c0 = kvq.init_cache(spec, B, T, H, D)
    whole = kv.append(c0, k, v, jnp.asarray([T, 35], jnp.int32))
    c = c0
    for t in range(T):
        c = kv.append(c, k[:, t:t + 1], v[:, t:t + 1], jnp.asarray([1, int(t < 35)], jnp.int32))
    np.testing.assert_array_equal(np.stack([np.asarray(a) for a in c.segments()]),
                                  np.stack([np.asarray(a) for a in whole.segments()]))
    q = jnp.asarray(rng.standard_normal((B, 1, 2 * H, D)), jnp.float32)
    np.testing.assert_allclose(np.asarray(kv.attend(q, c, impl="xla")),
                               np.asarray(kv.attend(q, whole, impl="xla")), rtol=1e-5, atol=1e-5)
    _leaves_equal(c, whole)


@pytest.mark.xdist_group("split-runs")  # one worker computes the module's `split_runs`
@pytest.mark.parametrize("name", ["int4-kivi", "k=int4:c:asym,v=int4:g16:asym,tg=8,res=16,sinks=3",
                                  "k=int8,v=int8,sinks=4,res=16"])
def test_ragged_chunks_equal_all_at_once(kv, split_runs, name):
    """Random ragged chunks of up to 24 tokens per call cross the group edges anywhere."""
    r = split_runs[name]
    k, v, lens = r["k"], r["v"], np.asarray(r["lens"])
    B, _, H, D = k.shape
    rng = np.random.default_rng(11)
    c = kvq.init_cache(r["spec"], B, k.shape[1] + 3, H, D)
    done = np.zeros(B, int)
    C = 24
    kp = jnp.pad(k, ((0, 0), (0, C), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, C), (0, 0), (0, 0)))
    while (done < lens).any():
        n = np.minimum(rng.integers(0, C + 1, size=B), lens - done)
        idx = done[:, None] + np.arange(C)[None, :]
        kc = jnp.take_along_axis(kp, jnp.asarray(idx)[:, :, None, None], axis=1)
        vc = jnp.take_along_axis(vp, jnp.asarray(idx)[:, :, None, None], axis=1)
        c = kv.append(c, kc, vc, jnp.asarray(n, jnp.int32))
        done += n
    _leaves_equal(c, r["whole"])


# -- overflow ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int8", "k=int4:c:asym,v=int4:g16:asym,tg=8,res=16,sinks=3"])
def test_overflow(kv, name):
    B, H, D, L = 3, 2, 16, 40
    rng = np.random.default_rng(7)
    # every append has T = 15 (one compiled append per spec); ragged lengths do the rest
    new = lambda: (kv.bf16_normal(rng, (B, 15, H, D)), kv.bf16_normal(rng, (B, 15, H, D)))  # noqa: E731
    full = jnp.full((B,), 15, jnp.int32)
    c0 = kvq.init_cache(name, B, L, H, D)
    c0 = kv.append(c0, *new(), full)
    c0 = kv.append(c0, *new(), full)
    k1, v1 = new()

    # outside jit: a clear error naming the limit
    with pytest.raises(ValueError, match="max_len"):
        kvq.append(c0, k1, v1, lengths=jnp.asarray([5, 15, 10]))
    with pytest.raises(ValueError, match="max_len"):
        kvq.append(c0, kv.bf16_normal(rng, (B, L + 1, H, D)), kv.bf16_normal(rng, (B, L + 1, H, D)))

    # under jit: sequence 1 (30 + 15 > 40) overflows; 0 and 2 (40 = max_len exactly) do not
    c1 = kv.append(c0, k1, v1, jnp.asarray([5, 15, 10], jnp.int32))
    ref = kv.append(c0, k1, v1, jnp.asarray([5, 0, 10], jnp.int32))
    np.testing.assert_array_equal(np.asarray(c1.overflow), [False, True, False])
    np.testing.assert_array_equal(np.asarray(c1.lengths), [35, 30, 40])
    _leaves_equal(_seq(c1, 1, False), _seq(c0, 1))  # nothing of it written anywhere
    for b in (0, 2):
        _leaves_equal(_seq(c1, b), _seq(ref, b))

    # the flag stays set, later appends to it are dropped, the others go on
    k2, v2 = new()
    c2 = kv.append(c1, k2, v2, jnp.asarray([1, 1, 0], jnp.int32))
    ref2 = kv.append(ref, k2, v2, jnp.asarray([1, 0, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(c2.overflow), [False, True, False])
    np.testing.assert_array_equal(np.asarray(c2.lengths), [36, 30, 40])
    _leaves_equal(_seq(c2, 1, False), _seq(c0, 1))
    c3 = kv.append(c2, k2, v2, jnp.asarray([0, 0, 0], jnp.int32))
    np.testing.assert_array_equal(np.asarray(c3.overflow), [False, True, False])

    # attend: NaN rows for the overflowed sequence only
    q = jnp.asarray(rng.standard_normal((B, 1, 2 * H, D)), jnp.float32)
    o = np.asarray(kv.attend(q, c2, impl="xla"))
    assert np.all(np.isnan(o[1]))
    assert np.all(np.isfinite(o[[0, 2]]))
    np.testing.assert_array_equal(o[[0, 2]], np.asarray(kv.attend(q, ref2, impl="xla"))[[0, 2]])

    # reset clears the flag and the length; the sequence then fills like a fresh one
    c4 = kvq.reset(c2, jnp.asarray([False, True, False]))
    np.testing.assert_array_equal(np.asarray(c4.overflow), [False, False, False])
    np.testing.assert_array_equal(np.asarray(c4.lengths), [36, 0, 40])
    c5 = kv.append(c4, k1, v1, jnp.asarray([0, 15, 0], jnp.int32))
    fresh = kv.append(kvq.init_cache(name, B, L, H, D), k1, v1, jnp.asarray([15, 15, 15], jnp.int32))
    np.testing.assert_array_equal(np.asarray(c5.lengths), [36, 15, 40])
    o5 = np.asarray(kv.attend(q, c5, impl="xla"))
    np.testing.assert_array_equal(o5[[0, 2]], o[[0, 2]])
    np.testing.assert_array_equal(o5[1], np.asarray(kv.attend(q, fresh, impl="xla"))[1])


# -- bad input -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache(kv):
    rng = np.random.default_rng(9)
    c = kvq.init_cache("int8", 2, 32, 2, 16)
    k, v = kv.bf16_normal(rng, (2, 3, 2, 16)), kv.bf16_normal(rng, (2, 3, 2, 16))
    return kv.append(c, k, v, jnp.asarray([3, 3], jnp.int32))


@pytest.mark.parametrize("kshape, vshape, kdt, vdt, exc, word", [
    ((2, 3, 4, 16), (2, 3, 4, 16), jnp.float32, jnp.float32, ValueError, "k.*heads"),
    ((2, 3, 2, 32), (2, 3, 2, 32), jnp.float32, jnp.float32, ValueError, "k.*head_dim"),
    ((3, 3, 2, 16), (3, 3, 2, 16), jnp.float32, jnp.float32, ValueError, "k.*batch"),
    ((2, 3, 2, 16), (2, 3, 2, 16), jnp.int32, jnp.float32, TypeError, "k"),
    ((2, 3, 2, 16), (2, 3, 2, 16), jnp.float32, jnp.int8, TypeError, "v"),
    ((2, 3, 2, 16), (2, 4, 2, 16), jnp.float32, jnp.float32, ValueError, "v"),
    ((2, 3, 32), (2, 3, 32), jnp.float32, jnp.float32, ValueError, "k"),
])
def test_append_bad_input(small_cache, kshape, vshape, kdt, vdt, exc, word):
    k, v = jnp.ones(kshape, kdt), jnp.ones(vshape, vdt)
    with pytest.raises(exc, match=word):
        kvq.append(small_cache, k, v)


def test_append_bad_lengths_and_nonfinite(small_cache):
    k = jnp.ones((2, 3, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="lengths"):
        kvq.append(small_cache, k, k, lengths=jnp.asarray([1, 2, 3]))
    with pytest.raises(ValueError, match="lengths"):
        kvq.append(small_cache, k, k, lengths=jnp.asarray([1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN|Inf"):
        kvq.append(small_cache, k.at[0, 0, 0, 0].set(jnp.nan), k)


@pytest.mark.parametrize("qshape, qdt, exc, word", [
    ((2, 1, 3, 16), jnp.float32, ValueError, "q.*multiple"),    # Hq not a multiple of Hkv
    ((2, 4, 4, 16), jnp.float32, ValueError, "q.*append"),      # longer than what was appended
    ((2, 1, 4, 32), jnp.float32, ValueError, "q.*head_dim"),
    ((3, 1, 4, 16), jnp.float32, ValueError, "q.*batch"),
    ((2, 1, 4, 16), jnp.int32, TypeError, "q"),
    ((2, 4, 16), jnp.float32, ValueError, "q"),
])
def test_attend_bad_input(small_cache, qshape, qdt, exc, word):
    with pytest.raises(exc, match=word):
        kvq.attend(jnp.ones(qshape, qdt), small_cache, impl="xla")


def test_attend_bad_impl(small_cache):
    with pytest.raises(ValueError, match="impl"):
        kvq.attend(jnp.ones((2, 1, 4, 16)), small_cache, impl="cuda")
