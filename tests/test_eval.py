"""kvq_jax.eval on a tiny random model: perplexity / KL against the bf16 cache, needle grid, CLIs.

The text is a committed Austen excerpt (tests/data); tokens are its UTF-8 bytes, so no
tokenizer or checkpoint is needed. Shapes are shared between tests so that the
compiled functions are reused.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax.eval import needle
from kvq_jax.eval import perplexity as pp
from kvq_jax.models import LlamaConfig, LlamaModel, init_random_params

DATA = pathlib.Path(__file__).parent / "data" / "austen_excerpt.txt"
CONFIG = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
                     rope_theta=10000.0, max_position=4096)
CONTEXT, WINDOWS = 64, 3


@pytest.fixture(scope="module")
def tiny():
    return LlamaModel.from_params(CONFIG, init_random_params(CONFIG, seed=0))


@pytest.fixture(scope="module")
def text():
    return DATA.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def results(tiny, text):
    tokens = pp.byte_tokens(text, CONFIG.vocab_size)
    # int4-kivi keeps 128 recent tokens in bf16: a 64-token window never leaves the residual.
    mixed = kvq.calibrate.Policy(["int8", "int2"], name="mixed-8-2")  # one spec per layer
    return pp.evaluate(tiny, tokens, None, ["bf16", "int8", "int2", "int4-kivi", mixed], context=CONTEXT,
                       windows=WINDOWS, progress=False)


def test_excerpt_is_committed_and_long_enough(text):
    assert len(text.encode("utf-8")) >= 4 * 1024
    assert "truth universally acknowledged" in text


def test_make_windows_spread_and_errors():
    toks = np.arange(1000, dtype=np.int32)
    w = pp.make_windows(toks, 100, 4)
    assert w.shape == (4, 100)
    np.testing.assert_array_equal(w[:, 0], [0, 250, 500, 750])  # evenly spread, no overlap
    assert pp.make_windows(toks, 100).shape == (10, 100)
    with pytest.raises(ValueError, match="room for 10 windows"):
        pp.make_windows(toks, 100, 11)


@pytest.mark.xdist_group("eval-results")  # one worker computes the module's `results`
def test_evaluate_returns_every_metric(results):
    assert list(results) == ["bf16", "int8", "int2", "int4-kivi", "mixed-8-2"]
    for r in results.values():
        assert set(pp.METRIC_KEYS) <= set(r)
        assert r["windows"] == WINDOWS and r["tokens"] == WINDOWS * (CONTEXT - CONTEXT // 2)
        assert np.isfinite(r["ppl"]) and r["ppl"] > 1
        assert 0.0 <= r["top1"] <= 1.0
    assert results["bf16"]["bits_per_element"] == 16.0
    assert results["int8"]["bits_per_element"] == pytest.approx(8.5)  # 64 int8 + one bf16 scale per 32 x 2
    # a per-layer policy reports the mean over its layers
    assert results["mixed-8-2"]["bits_per_element"] == pytest.approx(
        (results["int8"]["bits_per_element"] + results["int2"]["bits_per_element"]) / 2)


@pytest.mark.xdist_group("eval-results")  # one worker computes the module's `results`
def test_bf16_against_itself_is_exact(results):
    r = results["bf16"]
    assert r["delta_ppl_pct"] == 0.0 and r["kl_mean"] == 0.0 and r["kl_p99"] == 0.0 and r["top1"] == 1.0


@pytest.mark.xdist_group("eval-results")  # one worker computes the module's `results`
def test_a_cache_that_stays_bf16_matches_bf16_to_rounding(results):
    # every token of these windows stays in int4-kivi's bf16 residual window
    r = results["int4-kivi"]
    assert abs(r["kl_mean"]) < 1e-6 and r["kl_p99"] < 1e-5
    assert r["top1"] == 1.0 and abs(r["delta_ppl_pct"]) < 1e-3


@pytest.mark.xdist_group("eval-results")  # one worker computes the module's `results`
def test_int8_is_close_and_int2_is_further(results):
    i8, i2 = results["int8"], results["int2"]
    assert 0.0 < i8["kl_mean"] < 1e-3 and i8["top1"] > 0.95 and abs(i8["delta_ppl_pct"]) < 1.0
    assert i2["kl_mean"] > 10 * i8["kl_mean"]
    assert i2["kl_p99"] > i8["kl_p99"]


def test_score_teacher_forces_the_true_tokens(tiny, text):
    # the bf16 cache's scores equal a plain causal forward over the window (no cache)
    import jax

    toks = pp.byte_tokens(text, CONFIG.vocab_size)
    w = pp.make_windows(toks, CONTEXT, WINDOWS)
    r = pp.score(tiny, w, "bf16", return_logp=True)  # the reference call of `results`: compiled already
    logits, _ = tiny(w)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    P = CONTEXT // 2
    want = -np.take_along_axis(logp[:, P - 1:-1], w[:, P:, None], axis=-1)[..., 0].T  # [N, B]
    # the first scored token comes from the prefill (full-precision K/V): exact; the
    # others attend over K/V rounded to bf16 in the cache
    np.testing.assert_allclose(r["nll"][0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["nll"], want, atol=2e-2)
    assert np.abs(np.diff(want, axis=0)).mean() > 0.3  # a shift by one token would not pass
    np.testing.assert_allclose(np.asarray(r["logp"])[:, :, 0], logp[:, P - 1:-1, 0].T, atol=2e-2)


def test_eval_main_writes_json_and_png(tiny, tmp_path, capsys):
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    pp.main(["--text", str(DATA), "--kv", "bf16,int8", "--context", str(CONTEXT), "--windows", str(WINDOWS),
             "--json", str(out), "--png", str(png), "--no-progress"], model=tiny)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    assert doc["context"] == CONTEXT and set(doc["results"]) == {"bf16", "int8"}
    assert doc["results"]["int8"]["tokens"] == WINDOWS * (CONTEXT - CONTEXT // 2)
    assert "int8" in capsys.readouterr().out


def test_split_presets():
    assert pp.split_presets("bf16, int8,int4-kivi") == ["bf16", "int8", "int4-kivi"]
    assert pp.split_presets("int8;k=int4:c:asym,v=int4:t:g32:asym,res=64") == [
        "int8", "k=int4:c:asym,v=int4:t:g32:asym,res=64"]


# ----------------------------------------------------------------------------- needle


def test_prompt_builder_exact_length_and_depth(text):
    tok = needle.ByteTokenizer()
    b = needle.PromptBuilder(tok, text, "plain", max_context=512)
    for ctx in (256, 512):
        built = [b.build(ctx, d, "12345") for d in (0.0, 0.5, 1.0)]
        assert all(ids.shape == (ctx,) for ids, _ in built)
        (_, at0), (_, at50), (ids1, at1) = built
        assert at0 == 0 < at50 < at1
        s = tok.decode(ids1)
        assert "The secret passcode is 12345." in s and s.endswith("The secret passcode is")
        assert s.index("12345") < s.index("Question:")
    assert needle.first_number(" 48213.\n") == "48213" and needle.first_number("no") is None


def test_needle_grid_main_and_png(tiny, tmp_path):
    js, png = tmp_path / "n.json", tmp_path / "n.png"
    res = needle.main(["--text", str(DATA), "--kv", "bf16,int4", "--contexts", "192,256", "--depths", "0,100",
                       "--max-new-tokens", "3", "--json", str(js), "--png", str(png), "--no-progress"], model=tiny)
    for n in ("bf16", "int4"):
        acc = np.asarray(res["accuracy"][n])
        assert acc.shape == (2, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert len(res["cells"]) == 4 and all(set(c["answers"]) == {"bf16", "int4"} for c in res["cells"])
    assert json.loads(js.read_text())["contexts"] == [192, 256]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_prefill_answers_equal_plain_generate(tiny, text):
    tok = needle.ByteTokenizer()
    kw = dict(contexts=(192,), depths=(50,), max_new_tokens=3, progress=False, max_len=259)
    a = needle.run(tiny, tok, text, ["int4"], shared_prefill=True, **kw)
    b = needle.run(tiny, tok, text, ["int4"], shared_prefill=False, **kw)
    assert a["cells"][0]["answers"] == b["cells"][0]["answers"]
