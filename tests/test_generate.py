"""kvq.generate: greedy equals the no-cache oracle, ragged batches, EOS, samplers,
one compile per length bucket, donated caches, multi-turn caches, streaming."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax.generate import Sampler, bucket_length, trace_count
from kvq_jax.models import LlamaConfig, LlamaModel, forward_logits, greedy_generate, init_random_params
from kvq_jax.models import hub

V = 256
CONFIG = LlamaConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
                     rope_theta=10000.0, rope_style="interleaved", tie_embeddings=False, eos_token_ids=())


@pytest.fixture(scope="module")
def tiny():
    params = init_random_params(CONFIG, seed=0)
    return CONFIG, params, LlamaModel.from_params(CONFIG, params)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).tolist() for n in lengths]


def _batch(prompts):
    T = max(map(len, prompts))
    toks = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    return toks, np.asarray([len(p) for p in prompts], np.int32)


def test_model_logits_equal_the_reference_forward(tiny):
    config, params, model = tiny
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 17)), jnp.int32)
    want = forward_logits(config, params, tokens)
    got, caches = model(tokens)
    assert caches is None and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    h, _ = model.scanned().hidden(tokens)
    np.testing.assert_allclose(np.asarray(model.logits(h)), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_bf16_greedy_equals_no_cache_greedy(tiny):
    config, params, model = tiny
    for prompt in _prompts((9, 14), seed=2):  # one bucket: one compile per mode
        want = greedy_generate(config, params, prompt, 20)
        out = kvq.generate(model, np.asarray([prompt]), 20, kv="bf16")
        assert np.asarray(out.tokens[0]).tolist() == want
        assert int(out.lengths[0]) == 20 and out.steps == 19
        unrolled = kvq.generate(model, np.asarray([prompt]), 20, kv="bf16", scan_layers=False)
        assert np.asarray(unrolled.tokens[0]).tolist() == want


@pytest.mark.parametrize("kv", ["int8", "int4-kivi"])
def test_ragged_batch_equals_each_sequence_alone(tiny, kv):
    _, _, model = tiny
    # long enough that int4-kivi quantizes part of the prompt (residual 128 + group 32)
    prompts = _prompts((5, 170, 230), seed=3)
    toks, lens = _batch(prompts)
    out = kvq.generate(model, toks, 12, kv=kv, prompt_lengths=lens)
    assert out.tokens.shape == (3, 12) and out.tokens.dtype == jnp.int32
    assert np.asarray(out.caches[0].lengths).tolist() == (lens + 11).tolist()
    for i, p in enumerate(prompts):
        alone = kvq.generate(model, np.asarray([p]), 12, kv=kv, bucket=bucket_length(230))
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(out.tokens[i]))


def test_eos_stops_each_sequence_and_pads(tiny):
    _, _, model = tiny
    prompts = _prompts((7, 12), seed=4)
    toks, lens = _batch(prompts)
    free = np.asarray(kvq.generate(model, toks, 16, kv="int8", prompt_lengths=lens, eos_id=()).tokens)
    eos = int(free[0, 3])  # sequence 0 emits this at step 3 (maybe earlier too)
    stop0 = int(np.argmax(free[0] == eos))
    hits1 = np.nonzero(free[1] == eos)[0]
    stop1 = int(hits1[0]) if hits1.size else None
    out = kvq.generate(model, toks, 16, kv="int8", prompt_lengths=lens, eos_id=eos)
    tokens = np.asarray(out.tokens)
    assert int(out.lengths[0]) == stop0 + 1
    np.testing.assert_array_equal(tokens[0, :stop0 + 1], free[0, :stop0 + 1])
    assert (tokens[0, stop0:] == eos).all()  # padded with eos after stopping
    if stop1 is None:
        np.testing.assert_array_equal(tokens[1], free[1])
        assert int(out.lengths[1]) == 16
    # a finished sequence's cache stops at its last fed token
    assert int(out.caches[0].lengths[0]) == lens[0] + stop0
    # all sequences stopping early ends the loop early
    both = kvq.generate(model, toks[:1], 16, kv="int8", prompt_lengths=lens[:1], eos_id=eos)
    assert both.steps == stop0 and int(both.lengths[0]) == stop0 + 1


def test_samplers_give_valid_tokens_and_top_k_1_is_greedy(tiny):
    _, _, model = tiny
    toks, lens = _batch(_prompts((6, 10), seed=5))
    # (shapes as in the EOS test: the greedy program is compiled once for both)
    greedy = np.asarray(kvq.generate(model, toks, 16, prompt_lengths=lens, eos_id=()).tokens)
    top1 = kvq.generate(model, toks, 16, prompt_lengths=lens, sampler=Sampler(temperature=0.7, top_k=1), rng=3)
    np.testing.assert_array_equal(np.asarray(top1.tokens), greedy)
    runs = [np.asarray(kvq.generate(model, toks, 16, prompt_lengths=lens,
                                    sampler=Sampler(temperature=1.5, top_k=50, top_p=0.9), rng=s).tokens)
            for s in (0, 1)]
    for r in runs:
        assert r.shape == (2, 16) and r.min() >= 0 and r.max() < V
    assert not np.array_equal(runs[0], runs[1])  # different seeds, different samples


def test_sampler_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]], jnp.float32))
    f = Sampler(top_k=2).filter(logits)
    assert np.isfinite(np.asarray(f)).tolist() == [[True, True, False, False]]
    f = Sampler(top_p=0.7).filter(logits)  # 0.5 < 0.7, 0.5 + 0.25 >= 0.7: keep two
    assert np.isfinite(np.asarray(f)).tolist() == [[True, True, False, False]]
    f = Sampler(top_p=0.5).filter(logits)
    assert np.isfinite(np.asarray(f)).tolist() == [[True, False, False, False]]
    key = jax.random.key(0)
    draws = np.asarray([Sampler(top_k=3)(logits, jax.random.fold_in(key, i))[0] for i in range(64)])
    assert set(draws.tolist()) <= {0, 1, 2} and len(set(draws.tolist())) > 1
    assert int(Sampler(temperature=0)(logits, key)[0]) == 0
    with pytest.raises(ValueError):
        Sampler(top_p=0.0)
    with pytest.raises(ValueError):
        Sampler(top_k=0)


def test_one_compile_per_length_bucket(tiny):
    _, _, model = tiny
    assert [bucket_length(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]
    a, b, c = _prompts((20, 27, 40), seed=6)
    kvq.generate(model, np.asarray([a]), 8, kv="int8")
    n0 = trace_count()
    out = kvq.generate(model, np.asarray([b]), 8, kv="int8")  # same bucket (32): no new trace
    assert trace_count() == n0
    assert np.asarray(out.tokens[0]).tolist() == np.asarray(
        kvq.generate(model, np.asarray([b]), 8, kv="int8", bucket=64).tokens[0]).tolist()
    n1 = trace_count()
    kvq.generate(model, np.asarray([c]), 8, kv="int8")  # bucket 64 again: compiled just above
    assert trace_count() == n1


def test_caches_are_donated_and_continue_a_conversation(tiny):
    """Turn 2 appends through the caches of turn 1 (chunked prefill, ragged): the same
    tokens as one greedy run of the whole conversation with the no-cache oracle."""
    config, params, model = tiny
    turn1 = _prompts((9, 14), seed=7)
    toks, lens = _batch(turn1)
    caches = kvq.init_caches(kvq.resolve_policy("bf16", 2), 2, 96, 2, 32)
    out1 = kvq.generate(model, toks, 6, caches=caches, prompt_lengths=lens)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(caches))  # donated
    assert np.asarray(out1.caches[0].lengths).tolist() == (lens + 5).tolist()
    turn2 = _prompts((3, 11), seed=8)
    # the next prompt starts with the last generated token (not yet in the cache)
    nxt = [[int(out1.tokens[i, -1])] + t for i, t in enumerate(turn2)]
    toks2, lens2 = _batch(nxt)
    out2 = kvq.generate(model, toks2, 8, caches=out1.caches, prompt_lengths=lens2)
    for i in range(2):
        history = turn1[i] + np.asarray(out1.tokens[i, :-1]).tolist() + nxt[i]
        want = greedy_generate(config, params, history, 8)
        assert np.asarray(out2.tokens[i]).tolist() == want


def test_stream_callback_sees_every_token(tiny):
    _, _, model = tiny
    toks, lens = _batch(_prompts((6, 9), seed=9))
    seen = []
    out = kvq.generate(model, toks, 7, prompt_lengths=lens, stream=lambda i, t, a: seen.append((i, t.tolist())))
    assert [i for i, _ in seen] == list(range(7))
    np.testing.assert_array_equal(np.asarray([t for _, t in seen]).T, np.asarray(out.tokens))


def test_pallas_impl_equals_xla(tiny):
    """The fused-dequant kernel (interpreted on CPU) inside the model gives the same tokens."""
    _, _, model = tiny
    toks, lens = _batch(_prompts((30, 45), seed=10))
    a = kvq.generate(model, toks, 6, kv="int8", prompt_lengths=lens, impl="xla")
    b = kvq.generate(model, toks, 6, kv="int8", prompt_lengths=lens, impl="pallas")
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_input_errors(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="max_len"):
        kvq.generate(model, np.zeros((1, 30), np.int32), 10, max_len=32)
    with pytest.raises(ValueError, match="prompt_lengths"):
        kvq.generate(model, np.zeros((2, 5), np.int32), 4, prompt_lengths=[0, 5])
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvq.generate(model, np.zeros((1, 5), np.int32), 0)


# ----------------------------------------------------------------------------- real SmolLM2 (optional)

REAL = hub.default_cache_dir() / hub.GGUF_NAME


@pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} absent (kvq_jax.models.fetch_smollm2())")
def test_real_smollm2_bf16_greedy_equals_no_cache_greedy():
    from kvq_jax.models import load_checkpoint

    config, params, tokenizer = load_checkpoint(REAL, progress=False)
    model = LlamaModel.from_params(config, params)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}]))
    want = greedy_generate(config, params, prompt, 24)
    out = kvq.generate(model, np.asarray([prompt]), 24, kv="bf16")
    got = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))


def test_scan_layers_default_unrolls_on_gpus_only(monkeypatch):
    """`kvq.generate`'s ``scan_layers=None``: unrolled on a GPU backend (the scanned step copies the
    caches), scanned elsewhere; an explicit value is kept (both modes' tokens:
    `test_bf16_greedy_equals_no_cache_greedy`)."""
    gen = importlib.import_module("kvq_jax.generate")  # the module (kvq_jax.generate is the function)
    assert gen.scan_layers_default(None) is (jax.default_backend() != "gpu")
    assert gen.scan_layers_default(True) is True and gen.scan_layers_default(False) is False
    monkeypatch.setattr(gen.jax, "default_backend", lambda: "gpu")
    assert gen.scan_layers_default(None) is False
    monkeypatch.setattr(gen.jax, "default_backend", lambda: "cpu")
    assert gen.scan_layers_default(None) is True
