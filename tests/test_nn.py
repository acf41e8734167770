"""kvq_jax.nn: QuantizedAttention against an independent float64 numpy attention, the
nnx.MultiHeadAttention adapter, RoPE conventions, per-layer policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvq_jax as kvq
from kvq_jax.models.rope_layout import half_to_interleaved
from kvq_jax.nn import QuantizedAttention, causal_attention, init_caches, resolve_policy

B, T, D_IN, HQ, HKV, D = 2, 11, 48, 4, 2, 32


# ----------------------------------------------------------------------------- an independent oracle


def _rope_np(x, pos, theta, style):
    """RoPE with complex numbers: pair (a, b) -> (a + ib) * exp(i * pos * theta^(-2j/D))."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    rot = np.exp(1j * pos[..., None, None] * freq)  # [B, T, 1, D/2]
    if style == "interleaved":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def _rms_np(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def attention_np(layer: QuantizedAttention, x, pos):
    """float64 causal self-attention with the layer's weights, written from the definitions."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x, pos = f(x), np.asarray(pos)
    b, t, _ = x.shape
    H, Hkv, Dh = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def proj(lin, heads):
        y = x @ f(lin.kernel[...])
        if lin.bias is not None:
            y = y + f(lin.bias[...])
        return y.reshape(b, t, heads, Dh)

    q, k, v = proj(layer.q_proj, H), proj(layer.k_proj, Hkv), proj(layer.v_proj, Hkv)
    if layer.qk_norm == "rms":
        q = _rms_np(q, f(layer.q_norm.scale[...]), layer.q_norm.eps)
        k = _rms_np(k, f(layer.k_norm.scale[...]), layer.k_norm.eps)
    if layer.rope is not None:
        q, k = _rope_np(q, pos, layer.rope_theta, layer.rope), _rope_np(k, pos, layer.rope_theta, layer.rope)
    out = np.zeros((b, t, H, Dh))
    for h in range(H):
        kh = h // (H // Hkv)  # GQA: consecutive query heads share a KV head
        s = np.einsum("bid,bjd->bij", q[:, :, h], k[:, :, kh]) / np.sqrt(Dh)
        s = np.where(pos[:, None, :] <= pos[:, :, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bij,bjd->bid", p, v[:, :, kh])
    y = out.reshape(b, t, H * Dh) @ f(layer.o_proj.kernel[...])
    if layer.o_proj.bias is not None:
        y = y + f(layer.o_proj.bias[...])
    return y


def _layer(rope="half", qkv_bias=True, qk_norm=None, spec="bf16", seed=0, **kw):
    layer = QuantizedAttention(HQ, D_IN, num_kv_heads=HKV, head_dim=D, qkv_bias=qkv_bias, out_bias=qkv_bias,
                               rope=rope, rope_theta=500.0, qk_norm=qk_norm, spec=spec, rngs=nnx.Rngs(seed), **kw)
    rng = np.random.default_rng(seed + 100)
    for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        if lin.bias is not None:
            lin.bias[...] = jnp.asarray(0.3 * rng.standard_normal(lin.bias.shape), jnp.float32)
    if qk_norm == "rms":
        layer.q_norm.scale[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(D), jnp.float32)
        layer.k_norm.scale[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(D), jnp.float32)
    return layer


def _jit(layer, prefill=False):
    """layer(x, positions, cache, prefill=prefill, lengths=lengths), jit-compiled (eager dispatch is slow)."""
    return jax.jit(lambda x, pos, cache, lengths=None: layer(x, pos, cache, prefill=prefill, lengths=lengths))


def _x(seed=1, t=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, t, D_IN)), jnp.float32)


def _pos(t=T, offset=(0, 5)):
    return jnp.asarray(np.arange(t)[None, :] + np.asarray(offset)[:, None], jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# ----------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("rope,qkv_bias,qk_norm", [
    ("half", True, None), ("interleaved", False, None), ("interleaved", True, "rms"), (None, False, None)])
def test_no_cache_matches_independent_attention(rope, qkv_bias, qk_norm):
    layer = _layer(rope=rope, qkv_bias=qkv_bias, qk_norm=qk_norm)
    x, pos = _x(), _pos()
    y, cache = layer(x, pos)
    assert cache is None and y.shape == (B, T, D_IN)
    assert _rel(y, attention_np(layer, x, pos)) < 1e-5


@pytest.mark.parametrize("spec,tol", [("bf16", 1e-2), ("int8", 3e-2)])
def test_decode_through_cache_matches_independent_attention(spec, tol):
    """Prefill 6 tokens, then decode one at a time through the cache: the outputs are the
    causal attention of the whole sequence, up to the cache's rounding."""
    layer = _layer(rope="interleaved", qk_norm="rms")
    x, pos = _x(), _pos(offset=(0, 0))
    want = attention_np(layer, x, pos)
    cache = layer.init_cache(B, 64, spec=spec)
    y0, cache = _jit(layer, prefill=True)(x[:, :6], pos[:, :6], cache)
    assert _rel(y0, want[:, :6]) < 1e-5  # prefill attends on full-precision K/V
    ys = [y0]
    step = _jit(layer)
    for t in range(6, T):
        y, cache = step(x[:, t:t + 1], pos[:, t:t + 1], cache)
        ys.append(y)
    assert np.asarray(cache.lengths).tolist() == [T, T]
    err = _rel(jnp.concatenate(ys, 1)[:, 6:], want[:, 6:])
    assert 0 < err < tol


def test_ragged_chunk_through_a_cache_equals_each_sequence_alone():
    """T > 1 new tokens with per-sequence lengths on top of a non-empty cache (chunked
    prefill of a later turn): each sequence's real rows equal running it alone."""
    layer = _layer(rope="half")
    x = _x(t=12)
    prefill, decode = _jit(layer, prefill=True), _jit(layer)
    cache = layer.init_cache(B, 64, spec="int8")
    _, cache = prefill(x[:, :5], None, cache, jnp.asarray([5, 3]))
    lens = jnp.asarray([4, 7])
    y, cache = decode(x[:, 5:12], None, cache, lens)
    assert np.asarray(cache.lengths).tolist() == [9, 10]
    for b, (n0, n1) in enumerate(((5, 4), (3, 7))):
        xb = jnp.concatenate([x[b:b + 1, :n0], x[b:b + 1, 5:5 + n1]], 1)
        c1 = layer.init_cache(1, 64, spec="int8")
        _, c1 = prefill(xb[:, :n0], None, c1)
        y1, _ = decode(xb[:, n0:], None, c1)
        np.testing.assert_allclose(np.asarray(y[b, :n1]), np.asarray(y1[0]), rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(np.asarray(y[b])))


# ----------------------------------------------------------------------------- RoPE conventions


@pytest.mark.parametrize("spec", [None, "int8", "int4-kivi"])
def test_rope_conventions_agree_after_permuting_qk_weights(spec):
    """A "half" layer and an "interleaved" layer whose q/k columns are permuted as
    llama.cpp does compute the same function, with or without a cache."""
    a = _layer(rope="half", qkv_bias=True)
    b = _layer(rope="interleaved", qkv_bias=True, seed=7)
    for name, heads in (("q_proj", HQ), ("k_proj", HKV)):
        src, dst = getattr(a, name), getattr(b, name)
        dst.kernel[...] = jnp.asarray(half_to_interleaved(np.asarray(src.kernel[...]), heads))
        dst.bias[...] = jnp.asarray(half_to_interleaved(np.asarray(src.bias[...]), heads))
    for name in ("v_proj", "o_proj"):
        getattr(b, name).kernel[...] = getattr(a, name).kernel[...]
        getattr(b, name).bias[...] = getattr(a, name).bias[...]
    x = _x(t=40)
    if spec is None:
        ya, _ = a(x)
        yb, _ = b(x)
    else:
        ca, cb = a.init_cache(B, 64, spec=spec), b.init_cache(B, 64, spec=spec)
        _, ca = _jit(a, prefill=True)(x[:, :30], None, ca)
        _, cb = _jit(b, prefill=True)(x[:, :30], None, cb)
        ya, _ = _jit(a)(x[:, 30:], None, ca)
        yb, _ = _jit(b)(x[:, 30:], None, cb)
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=2e-5, atol=2e-5)
    # and the conventions are not interchangeable
    b.rope = "half"
    yc, _ = b(x) if spec is None else _jit(b)(x[:, 30:], None, cb)
    assert _rel(yc, ya) > 1e-2


# ----------------------------------------------------------------------------- from_nnx


def _mha(normalize_qk=False, use_bias=True, seed=3):
    mha = nnx.MultiHeadAttention(HQ, D_IN, qkv_features=HQ * D, out_features=40, num_kv_heads=HKV,
                                 use_bias=use_bias, normalize_qk=normalize_qk, decode=False,
                                 rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    if use_bias:
        for lin in (mha.query, mha.key, mha.value, mha.out):
            lin.bias[...] = jnp.asarray(0.3 * rng.standard_normal(lin.bias.shape), jnp.float32)
    if normalize_qk:
        mha.query_ln.scale[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(D), jnp.float32)
        mha.key_ln.scale[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(D), jnp.float32)
    return mha


@pytest.mark.parametrize("normalize_qk,use_bias", [(False, True), (True, False)])
def test_from_nnx_equals_the_mha(normalize_qk, use_bias):
    mha = _mha(normalize_qk, use_bias)
    x = _x(t=40)
    want = mha(x, mask=nnx.make_causal_mask(x[..., 0]))
    layer = QuantizedAttention.from_nnx(mha, "bf16")
    assert layer.rope is None and layer.out_features == 40
    y, _ = layer(x)  # no cache: same function
    assert _rel(y, want) < 1e-5

    # through caches: prefill 24 tokens (full precision), decode the rest token by token
    step, prefill = _jit(layer), _jit(layer, prefill=True)
    errs = {}
    for spec in ("bf16", "int8"):
        cache = layer.init_cache(B, 64, spec=spec)
        y0, cache = prefill(x[:, :24], None, cache)
        assert _rel(y0, want[:, :24]) < 1e-5
        ys = []
        for t in range(24, 40):
            yt, cache = step(x[:, t:t + 1], None, cache)
            ys.append(yt)
        errs[spec] = _rel(jnp.concatenate(ys, 1), want[:, 24:])
    assert errs["bf16"] < 5e-3  # bf16 rounding of the stored K/V only
    assert errs["bf16"] < errs["int8"] < 3e-2  # bounded; int8 costs more than bf16


def test_from_nnx_rejects_cross_attention():
    mha = nnx.MultiHeadAttention(2, 16, in_kv_features=8, decode=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cross-attention"):
        QuantizedAttention.from_nnx(mha)


# ----------------------------------------------------------------------------- policies


def test_resolve_policy_forms():
    i8, kivi = kvq.KVSpec.parse("int8"), kvq.KVSpec.parse("int4-kivi")
    assert resolve_policy("int8", 3) == (i8, i8, i8)
    assert resolve_policy(kivi, 2) == (kivi, kivi)
    assert resolve_policy(["bf16", "int8", kivi], 3) == (kvq.PRESETS["bf16"], i8, kivi)
    assert resolve_policy({0: "bf16", "default": "int8"}, 3) == (kvq.PRESETS["bf16"], i8, i8)
    with pytest.raises(ValueError, match="expected 3 specs"):
        resolve_policy(["int8", "int8"], 3)
    with pytest.raises(ValueError, match="no spec"):
        resolve_policy({0: "int8"}, 2)
    with pytest.raises(ValueError, match="not layer indices"):
        resolve_policy({5: "int8", "default": "bf16"}, 2)
    with pytest.raises(ValueError, match="unknown KV preset"):
        resolve_policy("int7", 2)


def test_init_caches_per_layer_and_policy_model():
    caches = init_caches(("bf16", "int8", "int4-kivi"), batch=2, max_len=100, num_kv_heads=2, head_dim=32)
    assert [str(c.spec) for c in caches] == ["bf16", "int8", "int4-kivi"]
    assert all(c.batch == 2 and c.max_len == 100 for c in caches)
    for c, name in zip(caches, ("bf16", "int8", "int4-kivi")):
        assert c.nbytes == kvq.init_cache(name, 2, 100, 2, 32).nbytes
    assert len(init_caches("int8", 2, 100, 2, 32, num_layers=4)) == 4
    with pytest.raises(ValueError, match="num_layers"):
        init_caches("int8", 2, 100, 2, 32)


def test_mixed_policy_layers_read_their_own_caches():
    """A model with a bf16 first layer and int2 elsewhere: the first layer's output equals
    the all-bf16 model's, the last layer's differs."""
    from kvq_jax.models import LlamaConfig, LlamaModel, init_random_params

    config = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                         ffn_dim=64)
    model = LlamaModel.from_params(config, init_random_params(config, 0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 24)), jnp.int32)

    @jax.jit
    def run_jit(caches):
        _, caches = model(tokens[:, :20], caches=caches, prefill=True)
        return model(tokens[:, 20:], caches=caches)

    def run(policy):
        return run_jit(model.init_caches(policy, 1, 32))

    mixed, caches = run(["bf16", "int2"])
    assert [str(c.spec) for c in caches] == ["bf16", "int2"]
    ref, _ = run("bf16")
    low, _ = run("int2")
    assert 0 < _rel(mixed, ref) < _rel(low, ref)


@pytest.mark.parametrize("window,ragged", [(None, False), (None, True), (24, True)])
def test_causal_attention_in_query_chunks_equals_all_at_once(window, ragged):
    """`causal_attention` past ``chunk_bytes`` of scores runs its queries in chunks (the last one
    padded): the same outputs as all rows at once, with key lengths, a sliding window and
    positions that do not start at 0."""
    rng = np.random.default_rng(7)
    B, T, Hq, Hkv, D = 2, 75, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    pos = jnp.asarray(np.arange(T)[None, :] + np.array([[0], [9]]), jnp.int32)
    lens = jnp.asarray([T, 50] if ragged else [T, T], jnp.int32)
    kw = dict(key_lengths=lens, sliding_window=window, precision=jax.lax.Precision.HIGHEST)
    whole = causal_attention(q, k, v, pos, pos, **kw)
    row_bytes = 4 * B * Hq * T  # one query row's scores
    for rows in (16, 32, 74):  # chunks of 16 (the least), 32, 74 rows: 5, 3 and 2 chunks
        got = causal_attention(q, k, v, pos, pos, chunk_bytes=rows * row_bytes, **kw)
        assert got.shape == whole.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=0, atol=2e-6)
    assert float(jnp.max(jnp.abs(whole))) > 0.1
    with pytest.raises(ValueError, match="chunk_bytes: expected a positive"):
        causal_attention(q, k, v, pos, pos, chunk_bytes=0)


def test_causal_attention_impl_choices_and_errors(monkeypatch):
    """`causal_attention`'s ``impl``: "auto" is the f32 path off a GPU backend, and on one where
    cuDNN cannot serve (queries at other positions than the keys, or a ``precision`` asked);
    "cudnn" for queries that are not the keys' tokens, or an unknown impl, is an error naming
    ``impl``. The cache impl "xla" keeps prefill attention in XLA (`prefill_impl`)."""
    from kvq_jax import nn as knn

    rng = np.random.default_rng(3)
    B, T, Hq, Hkv, D = 1, 20, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    pos = jnp.arange(T, dtype=jnp.int32)[None, :]
    kpos = jnp.arange(T, dtype=jnp.int32)[None, :]  # equal values, another array: not a fresh prompt
    want = causal_attention(q, k, v, pos, pos)
    np.testing.assert_array_equal(np.asarray(causal_attention(q, k, v, pos, pos, impl="auto")), np.asarray(want))
    monkeypatch.setattr(knn.jax, "default_backend", lambda: "gpu")
    for kw in (dict(k_positions=kpos), dict(k_positions=pos, precision=jax.lax.Precision.HIGHEST)):
        got = causal_attention(q, k, v, pos, impl="auto", **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="impl: 'cudnn' needs the queries to be the keys' tokens"):
        causal_attention(q, k, v, pos, kpos, impl="cudnn")
    with pytest.raises(ValueError, match="impl: expected one of"):
        causal_attention(q, k, v, pos, pos, impl="flash")
    assert [knn.prefill_impl(i) for i in ("xla", "auto", "pallas")] == ["xla", "auto", "auto"]
