"""kvq_jax.calibrate and static (calibrated) scales on the cache path, on a tiny random model.

The calibration text is the committed Austen excerpt (tests/data), its UTF-8 bytes the
tokens. Shapes are shared between tests so that compiled functions are reused.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax import calibrate as cal
from kvq_jax import quant
from kvq_jax.eval import perplexity as pp
from kvq_jax.models import LlamaConfig, LlamaModel, init_random_params
from kvq_jax.spec import KVSpec, StaticScales, TensorSpec

DATA = pathlib.Path(__file__).parent / "data" / "austen_excerpt.txt"
CONFIG = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
                     rope_theta=10000.0, max_position=4096)
CONTEXT, WINDOWS = 128, 2
INT2 = KVSpec(k=TensorSpec("int2", "token", 32, False), v=TensorSpec("int2", "token", 32, False))


@pytest.fixture(scope="module")
def tiny():
    return LlamaModel.from_params(CONFIG, init_random_params(CONFIG, seed=0))


@pytest.fixture(scope="module")
def tokens():
    return pp.byte_tokens(DATA.read_text(encoding="utf-8"), CONFIG.vocab_size)


@pytest.fixture(scope="module")
def calib(tiny, tokens):
    return cal.collect_stats(tiny, tokens, context=CONTEXT, windows=WINDOWS, percentile=99.0, model_id="tiny")


# ----------------------------------------------------------------------------- statistics


def test_stats_match_a_direct_computation(tiny, tokens, calib):
    L, H, D = CONFIG.n_layers, CONFIG.n_kv_heads, CONFIG.head_dim
    assert calib.shape == (L, H, D) and calib.tokens == CONTEXT * WINDOWS
    for name in cal.STAT_NAMES:
        assert calib.stats[f"k_{name}"].shape == (L, H, D) and calib.stats[f"v_{name}"].shape == (L, H, D)
    # direct: the model's forward with bf16 caches stores K (after RoPE) and V of every token
    wins = pp.make_windows(tokens, CONTEXT, WINDOWS)
    caches = tiny.init_caches("bf16", WINDOWS, CONTEXT)
    _, caches = tiny(jnp.asarray(wins), None, caches, prefill=True)
    for i, c in enumerate(caches):
        for t, data in (("k", c.k), ("v", c.v)):
            x = np.asarray(jnp.asarray(data[:, :, :CONTEXT], jnp.float32), np.float64)  # [B, H, C, D]
            x = np.moveaxis(x, 1, 2).reshape(-1, H, D)
            np.testing.assert_allclose(calib.stats[f"{t}_min"][i], x.min(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(calib.stats[f"{t}_max"][i], x.max(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(calib.stats[f"{t}_absmax"][i], np.abs(x).max(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(calib.stats[f"{t}_mean"][i], x.mean(0), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(calib.stats[f"{t}_rms"][i], np.sqrt((x * x).mean(0)), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(calib.stats[f"{t}_hi"][i], np.percentile(x, 99.0, axis=0), rtol=1e-4,
                                       atol=1e-5)
            np.testing.assert_allclose(calib.stats[f"{t}_lo"][i], np.percentile(x, 1.0, axis=0), rtol=1e-4,
                                       atol=1e-5)


def test_channel_params_equalize_ranges(calib):
    scale, shift = calib.channel_params("k", alpha=1.0, shift=True)
    lo, hi = calib.stats["k_lo"], calib.stats["k_hi"]
    np.testing.assert_allclose(shift, 0.5 * (lo + hi), rtol=1e-5, atol=1e-6)
    # geometric mean 1 per head, and every channel's range / scale is the same within a head
    np.testing.assert_allclose(np.exp(np.log(scale).mean(-1)), 1.0, rtol=1e-5)
    ratio = (hi - lo) / scale
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-4)
    s0, z0 = calib.channel_params("v", alpha=0.0, shift=False)
    assert z0 is None and np.allclose(s0, 1.0)


def test_save_load_round_trip(calib, tiny, tokens, tmp_path):
    c = dataclasses.replace(calib, learned={})
    cal.learn_clipping(tiny, tokens, INT2, c, smooth="k", context=CONTEXT, windows=1, queries=32, steps=2,
                       grid=(1.0, 0.8), name="int2-test")
    path = c.save(tmp_path / "tiny.kvcal.npz")
    back = cal.load(path)
    assert back.model_id == "tiny" and back.percentile == 99.0 and back.tokens == calib.tokens
    assert set(back.stats) == set(c.stats)
    for k in c.stats:
        np.testing.assert_array_equal(back.stats[k], c.stats[k])
    e0, e1 = c.learned["int2-test"], back.learned["int2-test"]
    assert e1["smooth"] == "k" and e1["base"] == str(INT2)
    np.testing.assert_array_equal(e0["k_clip"], e1["k_clip"])
    np.testing.assert_array_equal(e0["objective_after"], e1["objective_after"])
    assert back.digest == c.digest
    assert back.spec(INT2, learned="int2-test") == c.spec(INT2, learned="int2-test")
    assert back.spec("int4") == c.spec("int4")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="path"):
        cal.load(bad)


# ----------------------------------------------------------------------------- static scales on the cache path


def _static(rng, H, D, clips=(1.0, 1.0)):
    return StaticScales(k_scale=rng.uniform(0.3, 3.0, (H, D)), k_shift=rng.normal(0, 2.0, (H, D)),
                        v_scale=rng.uniform(0.5, 2.0, (H, D)), v_shift=rng.normal(0, 0.5, (H, D)),
                        k_clip=clips[0], v_clip=clips[1], tag="t")


def _cache_kv_static_f64(cache, kvh):
    """Per sequence (K, V) float64 ``[Hkv, n, D]`` read from the storage, the static scales undone here."""
    spec = cache.spec
    st = spec.static
    tg = spec.token_group
    kb = kvh.dequant_np(cache.k, cache.k_scale, cache.k_zero, spec.k, tg)
    vb = kvh.dequant_np(cache.v, cache.v_scale, cache.v_zero, spec.v, tg)
    if spec.rotate:
        h = kvh.hadamard_np(cache.head_dim)
        kb, vb = kb @ h.T, vb @ h.T
    kb = kb * np.asarray(st.k_scale)[None, :, None, :] + np.asarray(st.k_shift)[None, :, None, :]
    vb = vb * np.asarray(st.v_scale)[None, :, None, :] + np.asarray(st.v_shift)[None, :, None, :]
    f = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    rk, rv = f(cache.res_k), f(cache.res_v)
    out = []
    for b, n in enumerate(np.asarray(cache.lengths).tolist()):
        _, nq, nr = kvh.expected_split(spec, n)
        out.append((np.concatenate([kb[b, :, :nq], rk[b, :, :nr]], 1),
                    np.concatenate([vb[b, :, :nq], rv[b, :, :nr]], 1)))
    return out


@pytest.mark.parametrize("base,rotate,clips", [
    (KVSpec(k=TensorSpec("int4", "token", 32, False), v=TensorSpec("int4", "token", 32, False)), False, (1.0, 1.0)),
    (KVSpec(k=TensorSpec("int2", "channel", None, False), v=TensorSpec("int2", "token", 32, False),
            token_group=16, residual=8), False, (0.7, 0.8)),
    (KVSpec(k=TensorSpec("int8"), v=TensorSpec("int4", "token", 32, True)), True, (0.9, 1.0)),
])
def test_static_cache_path_matches_the_f64_reference(kv, base, rotate, clips):
    rng = np.random.default_rng(3)
    B, T, H, G, D = 2, 40, 2, 3, 64
    spec = dataclasses.replace(base, rotate=rotate, static=_static(rng, H, D, clips))
    k = kv.bf16_normal(rng, (B, T, H, D), outlier_channels=(3, 17), outlier_gain=8.0)
    v = kv.bf16_normal(rng, (B, T, H, D))
    cache = kv.append(kvq.init_cache(spec, B, 64, H, D), k, v, lengths=jnp.array([40, 33]))
    # the write path: stored body == quantize((x - shift) / scale [rotated]) of the plain quantizer
    st = spec.static
    x = (np.asarray(jnp.asarray(k[0, :16], jnp.float32)) - np.asarray(st.k_shift)[None]) / np.asarray(st.k_scale)[None]
    x = np.swapaxes(x, 0, 1)
    if rotate:
        x = x @ kv.hadamard_np(D)
    if spec.k.axis == "token":
        qt = quant.quantize(jnp.asarray(x, jnp.float32), spec.k, scale_dtype=spec.scale_dtype,
                            clip=None if clips[0] == 1.0 else clips[0])
        np.testing.assert_array_equal(np.asarray(cache.k[0, :, :16]), np.asarray(qt.data))
    q = kv.bf16_normal(rng, (B, 2, H * G, D)).astype(jnp.float32)
    ref = kv.attention_f64(q, _cache_kv_static_f64(cache, kv))
    got = np.asarray(kv.attend(q, cache, impl="xla"), np.float64)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
    got_p = np.asarray(kvq.attend(q, cache, impl="pallas", interpret=True, precise=True), np.float64)
    np.testing.assert_allclose(got_p, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt,group,sym", [("int2", 32, False), ("int8", None, True)])
def test_rotation_at_2_and_8_bits_matches_the_f64_reference(kv, fmt, group, sym):
    rng = np.random.default_rng(8)
    t = TensorSpec(fmt, "token", group, sym)
    spec = KVSpec(k=t, v=t, rotate=True, scale_dtype="bf16")
    k = kv.bf16_normal(rng, (2, 50, 2, 64), outlier_channels=(9,), outlier_gain=10.0)
    v = kv.bf16_normal(rng, (2, 50, 2, 64))
    cache = kv.append(kvq.init_cache(spec, 2, 64, 2, 64), k, v, lengths=jnp.array([50, 41]))
    q = kv.bf16_normal(rng, (2, 3, 4, 64)).astype(jnp.float32)
    ref = kv.attention_f64(q, kv.cache_kv_f64(cache))
    np.testing.assert_allclose(np.asarray(kv.attend(q, cache, impl="xla"), np.float64), ref, atol=2e-5, rtol=2e-5)


def test_identity_static_scales_change_nothing(kv):
    rng = np.random.default_rng(4)
    base = kvq.PRESETS["int4-kivi"]
    ident = StaticScales(k_scale=np.ones((2, 64)), k_shift=np.zeros((2, 64)), v_scale=np.ones((2, 64)), tag="id")
    k, v = kv.bf16_normal(rng, (1, 200, 2, 64)), kv.bf16_normal(rng, (1, 200, 2, 64))
    q = kv.bf16_normal(rng, (1, 1, 4, 64)).astype(jnp.float32)
    outs = []
    for spec in (base, dataclasses.replace(base, static=ident)):
        c = kv.append(kvq.init_cache(spec, 1, 256, 2, 64), k, v)
        outs.append(np.asarray(kv.attend(q, c, impl="xla")))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_calibrated_scales_cut_the_error_of_outlier_channels(kv):
    """Keys with a few large, offset channels: per-token int4 scales are set by the outliers;
    dividing them out first (static scales from the data's own ranges) shrinks the error."""
    rng = np.random.default_rng(5)
    H, D = 2, 64
    k = np.asarray(kv.bf16_normal(rng, (1, 256, H, D), outlier_channels=(5, 40), outlier_gain=30.0), np.float32)
    k[..., 5] += 40.0
    k = jnp.asarray(k, jnp.bfloat16)
    v = kv.bf16_normal(rng, (1, 256, H, D))
    q = 0.2 * kv.bf16_normal(rng, (1, 4, 2 * H, D)).astype(jnp.float32)
    kf = np.asarray(jnp.asarray(k, jnp.float32)).reshape(-1, H, D)
    lo, hi = kf.min(0), kf.max(0)
    st = StaticScales(k_scale=(hi - lo) / 2, k_shift=(hi + lo) / 2, tag="data")
    base = KVSpec(k=kvq.PRESETS["int4"].k)  # int4 keys (per token, g32), bf16 values
    exact = kv.attention_f64(q, [(np.moveaxis(np.asarray(jnp.asarray(k, jnp.float32), np.float64)[0], 1, 0),
                                  np.moveaxis(np.asarray(jnp.asarray(v, jnp.float32), np.float64)[0], 1, 0))])
    errs = []
    for spec in (base, dataclasses.replace(base, static=st)):
        c = kv.append(kvq.init_cache(spec, 1, 256, H, D), k, v)
        errs.append(np.abs(np.asarray(kv.attend(q, c, impl="xla"), np.float64) - exact).mean())
    assert errs[1] < 0.7 * errs[0], errs  # measured 0.59


@jax.jit
def _round_trips(x, clip):
    out = []
    for t, tg in [(TensorSpec("int4", "token", 32, False), None), (TensorSpec("int2", "channel", None, False), 16),
                  (TensorSpec("int8"), None), (TensorSpec("fp8"), None)]:
        for c in (None, clip):
            qt = quant.quantize(x, t, scale_dtype="bf16", token_group=tg, clip=c)
            out.append((quant.dequantize(qt, t, token_group=tg),
                        quant.fake_quantize(x, t, scale_dtype="bf16", token_group=tg, clip=c)))
    return out


def test_fake_quantize_equals_the_stored_round_trip_and_has_gradients():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 64, 64)) * rng.uniform(0.1, 5, 64), jnp.float32)
    for want, got in _round_trips(x, 0.8):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    t = TensorSpec("int2", "token", 32, False)
    g = jax.grad(lambda c: jnp.sum((quant.fake_quantize(x, t, clip=c) - x) ** 2))(0.8)
    assert np.isfinite(float(g)) and float(g) != 0.0


# ----------------------------------------------------------------------------- learned clipping


def test_learned_clipping_reduces_the_objective(tiny, tokens, calib):
    c = dataclasses.replace(calib, learned={})
    cal.learn_clipping(tiny, tokens, INT2, c, smooth="", context=CONTEXT, windows=WINDOWS, queries=64, steps=8)
    e = c.learned[str(INT2)]
    assert np.all(e["objective_after"] < e["objective_before"])
    assert np.all((e["k_clip"] >= 0.3) & (e["k_clip"] <= 1.0)) and np.any(e["k_clip"] < 1.0)
    # the same objective through the real cache path (append + attend) drops too
    plain = cal.attention_error(tiny, tokens, INT2, context=CONTEXT, windows=WINDOWS, queries=64)
    learned = cal.attention_error(tiny, tokens, c.spec(INT2, learned=True), context=CONTEXT, windows=WINDOWS,
                                  queries=64)
    np.testing.assert_allclose(plain, e["objective_before"], rtol=0.02)
    assert np.all(learned < plain)


# ----------------------------------------------------------------------------- sensitivity and policy


def _constructed(kl_k, kl_v):
    kl_k, kl_v = np.asarray(kl_k, float), np.asarray(kl_v, float)
    return cal.Sensitivity(formats=dict(cal.DEFAULT_FORMATS), kl_k=kl_k, kl_v=kl_v, head_dim=64)


def test_policy_meets_the_budget_with_the_least_loss():
    rng = np.random.default_rng(7)
    L = 3
    sens = _constructed(rng.uniform(0, 1, (L, 3)) * [0.01, 0.1, 1.0], rng.uniform(0, 1, (L, 3)) * [0.01, 0.1, 1.0])
    bk, bv = sens.bits("k"), sens.bits("v")
    np.testing.assert_allclose(bk, [8.25, 5.0, 3.0])
    np.testing.assert_allclose(bv, [8.25, 5.0, 3.0])
    for budget in (3.0, 4.0, 5.0, 6.3, 8.25):
        pol = cal.choose(sens, budget)
        names = list(sens.formats)
        bits = np.mean([bk[names.index(kf)] + bv[names.index(vf)] for kf, vf in pol.choices]) / 2
        assert bits <= budget + 1e-9
        np.testing.assert_allclose(pol.bits_per_element(64), bits)
        best = min(sum(sens.kl_k[i, c[2 * i]] + sens.kl_v[i, c[2 * i + 1]] for i in range(L))
                   for c in itertools.product(range(3), repeat=2 * L)
                   if sum(bk[c[2 * i]] + bv[c[2 * i + 1]] for i in range(L)) / (2 * L) <= budget + 1e-9)
        np.testing.assert_allclose(pol.predicted_kl, best, rtol=1e-9)
    # a constructed case: layer 0's keys are sensitive, the rest are not
    sens = _constructed([[0.0, 0.5, 2.0], [0.0, 0.01, 0.02], [0.0, 0.01, 0.02]],
                        [[0.0, 0.01, 0.02], [0.0, 0.01, 0.02], [0.0, 0.01, 0.02]])
    pol = cal.choose(sens, 5.0)
    assert pol.choices[0][0] == "int8" and str(pol) == "mixed<=5b"
    assert pol[0].k == cal.DEFAULT_FORMATS["int8"].k and pol[0].v.bits < 8
    assert isinstance(pol, tuple) and len(pol) == 3 and all(isinstance(s, KVSpec) for s in pol)


def test_sensitivity_and_policy_on_the_tiny_model(tiny, tokens):
    fmts = {"int8": cal.DEFAULT_FORMATS["int8"], "int2": cal.DEFAULT_FORMATS["int2"]}
    fmts = {n: dataclasses.replace(s, residual=8, token_group=16) for n, s in fmts.items()}
    sens = cal.sensitivity(tiny, tokens, fmts, context=64, windows=1)
    assert sens.kl_k.shape == (2, 2) and sens.kl_v.shape == (2, 2)
    assert np.all(sens.kl_k >= -1e-7) and np.all(sens.kl_v >= -1e-7)
    assert np.all(sens.kl_k[:, 1] > sens.kl_k[:, 0]) and np.all(sens.kl_v[:, 1] > sens.kl_v[:, 0])
    json.dumps(sens.to_json())
    pol = cal.policy(tiny, tokens, 5.0, sens=sens)
    assert pol.bits_per_element(CONFIG.head_dim) <= 5.0
    caches = tiny.init_caches(pol, 1, 64)  # usable as a per-layer policy
    assert [c.spec for c in caches] == list(pol)


def test_calibrated_policy_runs_through_evaluate(tiny, tokens, calib):
    pol = calib.spec("int4", smooth="kv")
    assert str(pol) == "int4+cal" and str(pol[0]).startswith("int4+cal-")
    assert len({hash(s) for s in pol}) == 2  # per-layer scales, hashable specs
    res = pp.evaluate(tiny, tokens, None, ["bf16", pol], context=64, windows=1, progress=False)
    assert res["int4+cal"]["kl_mean"] > 0


def test_calibrate_main_writes_a_file(tiny, tmp_path, capsys):
    path = tmp_path / "c.npz"
    cal.main(["--text", str(DATA), "--out", str(path), "--context", "128", "--windows", "2", "--learn", "int4",
              "--steps", "2", "--smooth", "k"], model=tiny)
    back = cal.load(path)
    assert back.shape == (2, 2, 32) and "int4" in back.learned
    assert "wrote" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise_value_errors_naming_them(tiny, tokens, calib):
    with pytest.raises(ValueError, match="tokenizer"):
        cal.collect_stats(tiny, "some text")
    with pytest.raises(ValueError, match="percentile"):
        cal.collect_stats(tiny, tokens, percentile=40.0)
    with pytest.raises(ValueError, match="context"):
        cal.collect_stats(tiny, tokens, context=1)
    with pytest.raises(ValueError, match="budget_bits"):
        cal.choose(_constructed(np.zeros((2, 3)), np.zeros((2, 3))), 2.0)
    with pytest.raises(ValueError, match="formats"):
        cal.combine(cal.DEFAULT_FORMATS["int8"], kvq.PRESETS["int4"])
    with pytest.raises(ValueError, match="layer"):
        calib.static(99)
    with pytest.raises(ValueError, match="smooth"):
        calib.static(0, smooth="q")
    with pytest.raises(ValueError, match="alpha"):
        calib.channel_params("k", alpha=2.0)
    with pytest.raises(ValueError, match="calibration"):
        cal.learn_clipping(tiny, tokens, "int4", None, smooth="kv")
    with pytest.raises(ValueError, match="base"):
        cal.learn_clipping(tiny, tokens, "bf16", calib)
    with pytest.raises(ValueError, match="learned"):
        calib.spec("int4", learned="nothing-learned")
    with pytest.raises(ValueError, match="k_clip"):
        StaticScales(k_clip=0.0)
    with pytest.raises(ValueError, match="k_scale"):
        StaticScales(k_scale=-np.ones((2, 4)))
    with pytest.raises(ValueError, match="k_scale"):
        StaticScales(k_scale=np.ones((2, 4)), v_shift=np.ones((3, 4)))
    with pytest.raises(ValueError, match="static"):
        KVSpec(static=StaticScales())
    with pytest.raises(ValueError, match="spec.static"):
        kvq.init_cache(dataclasses.replace(kvq.PRESETS["int8"], static=StaticScales(k_scale=np.ones((3, 64)))),
                       1, 8, 2, 64)
    with pytest.raises(ValueError, match="name"):
        KVSpec.parse("int4+cal-1234abcd")
    with pytest.raises(ValueError, match="model"):
        calib.check(LlamaModel.from_params(dataclasses.replace(CONFIG, n_layers=1),
                                           init_random_params(dataclasses.replace(CONFIG, n_layers=1), seed=0)))
