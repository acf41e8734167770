"""kvq.serve: paged cache == contiguous cache on the same data (every format, scrambled
pages), overflow without wrap-around, allocator accounting and prefix cache, the
continuous-batching engine against kvq.generate, prefix hits, chunked prefill,
speculative decoding, argument errors."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax.cache import residual_capacity
from kvq_jax.kernels import decode
from kvq_jax.models import LlamaConfig, LlamaModel, init_random_params
from kvq_jax.serve import allocator as alloc_mod
from kvq_jax.serve import paged
from kvq_jax.serve.engine import Engine, speculative_generate

FORMATS = ["bf16", "fp8", "int8", "int4", "int4-kivi", "int2-kivi", "k8v4",
           "k=int4:c:asym,v=int8,tg=32,res=48,sinks=4,scale=bf16"]
B, H, D, PS, MP = 3, 2, 64, 32, 7
NP = B * MP + 3

append_paged_jit = jax.jit(paged.append_paged)
attend_paged_jit = jax.jit(paged.attend_paged, static_argnames=("impl",))
append_jit = jax.jit(kvq.append)
attend_jit = jax.jit(kvq.attend, static_argnames=("impl",))


def _kv(rng, T):
    return (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32))


def _scrambled_table(rng):
    return rng.permutation(NP)[:B * MP].reshape(B, MP).astype(np.int32)


def _bytes(x):
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_paged_equals_contiguous(fmt):
    spec = kvq.KVSpec.parse(fmt)
    rng = np.random.default_rng(0)
    table = _scrambled_table(rng)
    pc = paged.init_paged_cache(spec, B, NP, PS, MP, H, D, page_table=table)
    cc = kvq.init_cache(spec, B, MP * PS, H, D)
    # ragged appends: 200, 107 and 63 tokens; the KIVI specs quantize part of the longest
    for lens in ([100, 7, 60], [100, 100, 3]):
        k, v = _kv(rng, 100)
        pc = append_paged_jit(pc, k, v, jnp.asarray(lens, jnp.int32))
        cc = append_jit(cc, k, v, jnp.asarray(lens, jnp.int32))
    assert np.asarray(pc.lengths).tolist() == [200, 107, 63] == np.asarray(cc.lengths).tolist()
    view = paged.contiguous_view(pc)
    _, q_len, _ = kvq.segment_lengths(spec, cc.lengths)
    assert int(q_len[0]) > 0
    for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"):
        a, b = getattr(view, name), getattr(cc, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        per = 1 if b.shape[2] == cc.k.shape[2] else spec.token_group  # rows per token (scales per group)
        for s in range(B):
            n = int(q_len[s]) // per
            np.testing.assert_array_equal(_bytes(a[s, :, :n]), _bytes(b[s, :, :n]), err_msg=f"{name} seq {s}")
    for name in ("res_k", "res_v", "sink_k", "sink_v"):
        np.testing.assert_array_equal(np.asarray(getattr(pc, name)), np.asarray(getattr(cc, name)), err_msg=name)
    # the value pool tokens-minor; sub-byte values in pairs: token t of a page at slot pair_slot(t)
    assert pc.v_token_minor and pc.v_pairs == (spec.v.format in ("int4", "int2"))
    t = np.arange(PS)
    slot = kvq.quant.pair_slot(t) if pc.v_pairs else t
    np.testing.assert_array_equal(_bytes(pc.v[table[0, 0]][:, :, slot]), _bytes(jnp.swapaxes(cc.v[0, :, :PS], 1, 2)))
    # the pages outside every table row were never written
    spare = np.setdiff1d(np.arange(NP), table)
    assert not np.any(np.asarray(pc.k[spare]).astype(np.float32))
    q = jnp.asarray(rng.standard_normal((B, 3, 2 * H, D)), jnp.float32)
    got = attend_paged_jit(q, pc, impl="xla")
    want = attend_jit(q, cc, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int4-kivi"])
def test_paged_pallas_equals_xla(fmt):
    spec = kvq.KVSpec.parse(fmt)
    rng = np.random.default_rng(1)
    ps, mp = 64, 4
    table = rng.permutation(B * mp + 2)[:B * mp].reshape(B, mp)
    pc = paged.init_paged_cache(spec, B, B * mp + 2, ps, mp, H, D, page_table=table)
    k, v = _kv(rng, 250)
    pc = paged.append_paged(pc, k, v, jnp.asarray([250, 90, 161], jnp.int32))
    q = jnp.asarray(rng.standard_normal((B, 2, 2 * H, D)), jnp.float32)
    got = paged.attend_paged(q, pc, impl="pallas", precise=True)
    want = paged.attend_paged(q, pc, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt,ps", [("int8", 16), ("int4", 48), ("k8v4", 32)])
def test_small_pages_through_the_kernel(fmt, ps):
    """Pages under the kernel's default block (16, 32, 48 tokens): each block lies in one page
    (the largest power of two dividing page_size); decode through the kernel (and a prefill
    chunk, at pages of 16) equals the gathered XLA path on the same pages."""
    spec = kvq.KVSpec.parse(fmt)
    rng = np.random.default_rng(ps)
    mp = -(-110 // ps)
    table = rng.permutation(B * mp + 2)[:B * mp].reshape(B, mp)
    pc = paged.init_paged_cache(spec, B, B * mp + 2, ps, mp, H, D, page_table=table)
    k, v = _kv(rng, 100)
    pc = paged.append_paged(pc, k, v, jnp.asarray([100, 37, 64], jnp.int32))
    assert ps % decode.choose_config(pc, 4, ps).block_k == 0
    q = jnp.asarray(rng.standard_normal((B, 2, 2 * H, D)), jnp.float32)
    got = paged.attend_paged(q, pc, impl="pallas", precise=True)
    want = paged.attend_paged(q, pc, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    if ps == 16:
        qc = jnp.asarray(rng.standard_normal((B, 8, 2 * H, D)), jnp.float32)
        kc, vc = _kv(rng, 8)
        got = paged.attend_chunk_paged(qc, kc, vc, pc, impl="pallas", precise=True)
        want = paged.attend_chunk_paged(qc, kc, vc, pc, impl="xla")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_full_sequence_raises_or_flags_never_wraps():
    spec = kvq.KVSpec.parse("int8")
    table = np.full((B, MP), -1, np.int32)
    table[0, :2], table[1, :1], table[2, :3] = [5, 9], [3], [0, 1, 2]
    pc = paged.init_paged_cache(spec, B, NP, PS, MP, H, D, page_table=table)
    k, v = _kv(np.random.default_rng(2), 40)
    with pytest.raises(ValueError, match="^k: .*sequences \\[1\\]"):
        paged.append_paged(pc, k, v)  # 40 tokens need 2 pages; sequence 1 has 1
    out = append_paged_jit(pc, k, v)
    assert np.asarray(out.overflow).tolist() == [False, True, False]
    assert np.asarray(out.lengths).tolist() == [40, 0, 40]
    assert not np.any(np.asarray(out.k[3]))  # nothing of sequence 1 written, not even its own page
    o = attend_paged_jit(jnp.ones((B, 1, 2 * H, D)), out, impl="xla")
    o = np.asarray(o)
    assert np.isnan(o[1]).all() and np.isfinite(o[[0, 2]]).all()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^page_size"):
        paged.init_paged_cache("int8", 2, 8, 24, 4, H, D)
    with pytest.raises(ValueError, match="^page_size"):
        paged.init_paged_cache("int4-kivi", 2, 8, 16, 4, H, D)  # not a multiple of token_group 32
    with pytest.raises(ValueError, match="^num_pages"):
        paged.init_paged_cache("int8", 2, 0, 32, 4, H, D)
    with pytest.raises(ValueError, match="^page_table"):
        paged.init_paged_cache("int8", 2, 8, 32, 2, H, D, page_table=[[0, 1], [1, 2]])  # page 1 twice
    with pytest.raises(ValueError, match="^page_table"):
        paged.init_paged_cache("int8", 2, 8, 32, 2, H, D, page_table=[[0, 8], [-1, -1]])
    pc = paged.init_paged_cache("int8", 2, 8, 32, 2, H, D)
    with pytest.raises(ValueError, match="^impl"):
        paged.attend_paged(jnp.ones((2, 1, H, D)), pc, impl="cuda")
    with pytest.raises(ValueError, match="^page_table"):
        one = jnp.ones((2, 1, H, D))
        cc = kvq.append(kvq.init_cache("int8", 2, 32, H, D), one, one)
        kvq.attend(one, cc, impl="xla", page_table=pc.page_table)
    a = alloc_mod.PageAllocator(4)
    with pytest.raises(ValueError, match="^n:"):
        a.alloc(-1)
    with pytest.raises(ValueError, match="^pages"):
        a.release([0])
    with pytest.raises(ValueError, match="^num_pages"):
        alloc_mod.PageAllocator(0)


# ----------------------------------------------------------------------------- allocator


def test_allocator_accounting_refcounts_and_lru():
    a = alloc_mod.PageAllocator(8)
    r1, r2 = a.alloc(3), a.alloc(4)
    assert len(set(r1 + r2)) == 7 and (a.num_free, a.num_used, a.num_cached) == (1, 7, 0)
    with pytest.raises(alloc_mod.OutOfPages):
        a.alloc(2)
    assert a.num_free == 1  # a failed alloc takes nothing
    a.release(r2)  # cancelled request
    assert (a.num_free, a.num_used) == (5, 3)
    toks = np.arange(100)
    keys = alloc_mod.prefix_keys(toks, 16, 3)
    assert keys == alloc_mod.prefix_keys(np.concatenate([toks[:48], toks[:10]]), 16, 3)
    assert alloc_mod.prefix_keys(toks, 16, 3, salt=b"x")[0] != keys[0]
    assert alloc_mod.prefix_keys(toks + (np.arange(100) == 20), 16, 3)[:1] == keys[:1]
    assert alloc_mod.prefix_keys(toks + (np.arange(100) == 20), 16, 3)[1] != keys[1]
    for key, page in zip(keys, r1):
        assert a.register(key, page)
    assert not a.register(keys[0], r1[1])  # the first page stored for a prefix stays
    hit = a.lookup(keys[:2] + [b"other"])
    assert hit == r1[:2] and [a.refcount(p) for p in r1] == [2, 2, 1]
    a.release(r1)  # the first request finishes: its registered pages stay cached or shared
    assert (a.num_used, a.num_cached, a.num_free) == (2, 1, 5)
    a.release(hit)
    assert (a.num_used, a.num_cached, a.num_free) == (0, 3, 5)
    a.check()
    assert a.lookup([b"unknown"] + keys) == []  # a run stops at the first unknown key
    # pressure: 7 pages wanted, 5 free + 3 cached: evicts the least recently used one
    assert a.lookup(keys[:1]) == [r1[0]]  # touch page 0: now the most recently used
    a.release([r1[0]])
    got = a.alloc(6)  # LRU order was r1[2] (released first), r1[1], r1[0] (touched)
    assert a.evictions == 1 and r1[2] in got
    assert a.lookup(keys) == r1[:2]  # the evicted page's key is gone
    a.release(got + r1[:2])
    a.check()
    assert a.num_used == 0 and a.num_free + a.num_cached == 8
    n_cached = a.num_cached
    assert n_cached == 2 and a.clear_cache() == n_cached
    a.check()
    assert a.num_free == 8


# ----------------------------------------------------------------------------- engine

V = 256
CONFIG = LlamaConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
                     rope_theta=10000.0, rope_style="interleaved", tie_embeddings=False, eos_token_ids=())
DRAFT = LlamaConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=64,
                    rope_theta=10000.0, rope_style="interleaved", tie_embeddings=True, eos_token_ids=())


@pytest.fixture(scope="module")
def model():
    return LlamaModel.from_params(CONFIG, init_random_params(CONFIG, seed=0))


def _prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).astype(np.int32) for n in lengths]


def test_engine_dispatch_flattens_plain_weights_and_engines_share_compiled_steps(model):
    """The step's weights are plain nested dicts of the model's own arrays (flattened in C++ at every
    dispatch, no Python call per Variable), and the static arguments hash once: a second engine of
    the same model and settings reuses the first one's compiled decode step."""
    from kvq_jax.serve import engine as engine_mod

    engines = [Engine(model, kv="int8", max_batch=2, page_size=16, max_len=64) for _ in range(2)]
    treedef = jax.tree.structure(engines[0]._weights)
    assert "State" not in str(treedef) and "Param" not in str(treedef), str(treedef)[:200]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(engines[0]._weights))
    assert jax.tree.leaves(engines[0]._weights)[0] is jax.tree.leaves(engines[1]._weights)[0]  # not copied
    before = engine_mod._decode_step._cache_size()
    for eng in engines:
        eng.submit(_prompts((5,), seed=2)[0], 3)
        eng.run()
    assert engine_mod._decode_step._cache_size() <= before + 1


def test_engine_greedy_equals_generate_with_requests_joining(model):
    eng = Engine(model, kv="int8", max_batch=2, page_size=16, max_len=160, prefill_chunk=64)
    prompts = _prompts((5, 37, 20, 50), seed=1)
    news = (9, 4, 7, 6)
    ids = [eng.submit(p, n) for p, n in zip(prompts[:3], news)]
    out = eng.run(max_steps=3)  # the 4-token request finishes in step 3, freeing a slot
    assert list(out) == [ids[1]] and eng.num_active == 1 and eng.num_queued == 1
    ids.append(eng.submit(prompts[3], news[3]))  # joins mid-run
    out.update(eng.run())
    assert sorted(out) == ids
    toks = np.zeros((4, 50), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    want = np.asarray(kvq.generate(model, toks, max(news), kv="int8", prompt_lengths=[len(p) for p in prompts]).tokens)
    for i, (rid, n) in enumerate(zip(ids, news)):
        assert out[rid] == want[i, :n].tolist(), rid
    eng.allocator.check()
    assert eng.allocator.num_used == 0 and eng.num_active == 0
    # cancelling a running and a queued request leaks nothing
    a, b, c = (eng.submit(p, 20) for p in prompts[:3])
    eng.step()
    eng.cancel(a)
    eng.cancel(c)
    rest = eng.run()
    assert list(rest) == [b] and eng.allocator.num_used == 0
    eng.allocator.check()
    with pytest.raises(ValueError, match="^rid"):
        eng.cancel(a)


def test_eos_read_a_step_late_frees_the_slot_without_changing_any_tokens(model):
    """Pipelined decode: an EOS is read after the next step was dispatched; that step's token
    is dropped and the next request, admitted into the freed slot and pages, is unaffected."""
    prompts = _prompts((12, 30), seed=5)
    kw = dict(kv="int8", max_batch=1, page_size=16, max_len=96, prefill_chunk=64)
    plain = Engine(model, eos_id=(), **kw)
    rids = [plain.submit(p, 12) for p in prompts]
    done = plain.run()
    full = [done[r] for r in rids]
    eos = full[0][4]  # the first request's 5th token ends it
    eng = Engine(model, eos_id=eos, **kw)
    ids = [eng.submit(p, 12) for p in prompts]
    out = eng.run()
    for rid, want in zip(ids, full):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert out[rid] == want[:cut], rid
    assert len(out[ids[0]]) <= 5
    eng.allocator.check()
    assert eng.allocator.num_used == 0 and eng.num_active == 0


def test_in_flight_step_does_not_see_later_page_table_changes(model):
    """The page tables a dispatched decode step reads are its own: ``jax.device_put`` of a
    host array may alias it (CPU), and admissions change the host table between steps."""
    eng = Engine(model, kv="int8", max_batch=2, page_size=16, max_len=64, prefill_chunk=32)
    eng.submit(_prompts((20,), seed=3)[0], 6)
    eng.step()  # prefill
    eng.step()  # the first decode step: the tables go to the device
    sent = np.asarray(eng._table_dev).copy()
    eng._table[:] = -7
    np.testing.assert_array_equal(np.asarray(eng._table_dev), sent)


@pytest.mark.parametrize("policy", [{0: "int4-kivi", "default": "int8"}, ("int4", "k8v4")])
def test_engine_per_layer_policy_equals_generate(model, policy):
    eng = Engine(model, kv=policy, max_batch=2, page_size=32, max_len=160, prefill_chunk=64)
    specs = kvq.nn.resolve_policy(policy, model.num_layers)
    assert eng.spec is None and eng.specs == specs and len(eng._kv) == 2  # one stacked pool per format
    # the residual window of the KIVI layer turns the default prefix cache off; the other policy keeps it
    assert eng.prefix_cache == all(s.residual == 0 and s.sinks == 0 for s in specs)
    prompts = _prompts((90, 33), seed=12)
    ids = [eng.submit(p, 6) for p in prompts]
    out = eng.run()
    toks = np.zeros((2, 90), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    want = np.asarray(kvq.generate(model, toks, 6, kv=policy, prompt_lengths=[90, 33]).tokens)
    for i, rid in enumerate(ids):
        assert out[rid] == want[i].tolist(), (policy, i)
    H, D = model.num_kv_heads, model.head_dim
    want_bytes = sum(paged.page_bytes(s, 32, H, D) * eng.num_pages  # each layer's pool
                     + 2 * 2 * eng.max_batch * H * (residual_capacity(s) + s.sinks) * D for s in specs)  # bf16 windows
    assert eng.kv_bytes == want_bytes
    assert eng.allocator.num_used == 0
    eng.allocator.check()


def test_prefix_cache_skips_prefill_and_gives_identical_tokens(model):
    system = _prompts((64,), seed=5)[0]
    users = _prompts((9, 14), seed=6)
    kw = dict(kv="int8", max_batch=2, page_size=16, max_len=128, prefill_chunk=32)
    eng = Engine(model, **kw)
    first = eng.submit(np.concatenate([system, users[0]]), 5)
    eng.run()
    before = eng.stats["prefill_tokens"]
    second = eng.submit(np.concatenate([system, users[1]]), 5)
    got = eng.run()[second]
    assert eng.stats["prefill_tokens"] - before == 14  # the 64 system tokens came from the cache
    assert eng.stats["prefix_hit_tokens"] == 64
    fresh = Engine(model, prefix_cache=False, **kw)
    fresh.submit(np.concatenate([system, users[1]]), 5)
    assert list(fresh.run().values())[0] == got
    assert fresh.stats["prefill_tokens"] == 78
    assert first != second and eng.allocator.num_used == 0 and eng.allocator.num_cached > 0
    eng.allocator.check()


WINDOW_SPEC = "k=int4:c:asym,v=int4:t:g32:asym,tg=32,res=16,sinks=4"  # a body ending mid-page, sinks


def _prefill_logits(eng) -> list:
    """The logits each completed prefill samples its first token from, recorded from now on."""
    seen, sample = [], eng._sample

    def spy(logits, reqs):
        seen.append(np.asarray(logits))
        return sample(logits, reqs)

    eng._sample = spy
    return seen


def test_prefix_snapshots_for_window_specs_give_identical_tokens(model):
    """prefix_cache=True with a bf16 window and sinks (layer 0; int8 elsewhere, whose body ends
    elsewhere): a second prompt sharing 128 tokens starts from the first one's snapshot (one
    body page shared, the partly filled one copied, window and sinks restored) and generates
    what a prefill from scratch gives."""
    kv = {0: WINDOW_SPEC, "default": "int8"}
    system = _prompts((150,), seed=21)[0]
    users = _prompts((9, 14), seed=22)
    kw = dict(kv=kv, max_batch=2, page_size=64, max_len=192, prefill_chunk=64)
    eng = Engine(model, prefix_cache=True, **kw)
    assert Engine(model, **kw).prefix_cache is False  # off by default for window specs
    eng.submit(np.concatenate([system, users[0]]), 5)
    eng.run()
    assert eng.num_prefix_snapshots == 2  # after 64 and 128 prompt tokens
    # with sinks 4, window 16, groups of 32: 128 tokens leave 96 in the body -> 1 full page, 1 partial
    assert eng.allocator.num_used == 1  # page 0, shared by the 128-token snapshot (copies live outside the pool)
    before = eng.stats["prefill_tokens"]
    second = eng.submit(np.concatenate([system, users[1]]), 5)
    logits = _prefill_logits(eng)
    got = eng.run()[second]
    assert eng.stats["prefill_tokens"] - before == 150 + 14 - 128 and eng.stats["prefix_hit_tokens"] == 128
    fresh = Engine(model, prefix_cache=False, **kw)
    fresh.submit(np.concatenate([system, users[1]]), 5)
    want = _prefill_logits(fresh)
    assert list(fresh.run().values())[0] == got
    np.testing.assert_array_equal(logits[0], want[0])  # the same cache state: bit for bit
    eng.allocator.check()
    assert eng.clear_prefix_cache() == 1 and eng.allocator.num_used == 0 and eng.num_prefix_snapshots == 0


def test_prefix_snapshots_give_way_to_requests(model):
    """Snapshots hold pages; a request that needs them drops the least recently used ones,
    and ``prefix_snapshots`` bounds their number."""
    kw = dict(kv=WINDOW_SPEC, max_batch=1, page_size=64, max_len=320, prefill_chunk=64, prefix_cache=True)
    eng = Engine(model, num_pages=6, prefix_snapshots=3, **kw)
    a, b = _prompts((300, 250), seed=23)
    eng.submit(a, 2)  # 4 pages
    eng.run()
    assert eng.num_prefix_snapshots == 3  # 4 taken (64 ... 256 tokens), the oldest dropped
    assert eng.allocator.num_used == 3 and eng.allocator.num_free == 3  # the body pages the snapshots share
    rid = eng.submit(b, 8)  # needs 4 pages: the snapshots give theirs back
    out = eng.run()
    assert len(out[rid]) == 8 and eng.num_prefix_snapshots <= 3
    eng.allocator.check()
    with pytest.raises(ValueError, match="prefix_snapshots"):
        Engine(model, prefix_snapshots=-1, **kw)


@pytest.mark.parametrize("kv", ["bf16", "int4-kivi"])
def test_chunked_prefill_equals_one_shot_within_quantization_error(model, kv):
    prompt = _prompts((230,), seed=7)[0]
    one = Engine(model, kv=kv, max_batch=1, page_size=32, max_len=256, prefill_chunk=256).prefill(prompt)
    chunked = Engine(model, kv=kv, max_batch=1, page_size=32, max_len=256, prefill_chunk=64).prefill(prompt)
    ref = np.asarray(model(jnp.asarray(prompt)[None])[0][0, -1])  # no cache, full precision
    np.testing.assert_allclose(one, ref, rtol=1e-4, atol=1e-4)
    err = np.max(np.abs(chunked - ref)) / np.max(np.abs(ref))
    assert err < (2e-2 if kv == "bf16" else 1e-1), err
    assert err > 0  # the chunks did read the stored (rounded) past


def test_chunks_read_the_past_in_blocks_with_the_same_result(model):
    # 230 tokens in chunks of 64 over a 256-token body: prefill_block 32 reads it in 8 blocks
    prompt = _prompts((230,), seed=11)[0]
    kw = dict(kv="int4-kivi", max_batch=1, page_size=32, max_len=256, prefill_chunk=64)
    whole = Engine(model, prefill_block=None, **kw).prefill(prompt)
    blocked = Engine(model, prefill_block=32, **kw).prefill(prompt)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5 * np.max(np.abs(whole)))


@pytest.mark.parametrize("kv", ["int8", "int4-kivi"])
def test_chunks_through_the_kernel_equal_the_xla_path(model, kv):
    """impl="pallas" (interpret mode here): later chunks read the pages with the kernel, rows
    in tiles (and the bf16 window in XLA); same last-token logits as the XLA path up to the
    kernel's 16-bit rounding."""
    prompt = _prompts((230,), seed=13)[0]
    kw = dict(kv=kv, max_batch=1, page_size=64, max_len=256, prefill_chunk=64)
    xla = Engine(model, impl="xla", **kw).prefill(prompt)
    pallas = Engine(model, impl="pallas", **kw).prefill(prompt)
    err = np.max(np.abs(pallas - xla)) / np.max(np.abs(xla))
    assert 0 < err < 2e-3, err  # measured 2.2e-4


@pytest.mark.parametrize("kv", ["int8", "int4-kivi"])
def test_speculative_greedy_equals_plain_greedy(model, kv):
    draft = LlamaModel.from_params(DRAFT, init_random_params(DRAFT, seed=3))
    prompt = _prompts((150,), seed=8)[0]
    got, stats = speculative_generate(model, draft, prompt, k=3, max_new_tokens=16, kv=kv, draft_kv="bf16")
    want = kvq.generate(model, prompt[None], 16, kv=kv)
    assert got == np.asarray(want.tokens[0]).tolist()
    assert stats["rounds"] > 0 and stats["accepted"] < stats["proposed"]  # the draft was wrong sometimes
    if kv == "int8":  # a perfect draft: every proposal accepted
        same, s2 = speculative_generate(model, model, prompt, k=3, max_new_tokens=8, kv=kv)
        assert same == got[:8] and s2["accepted"] == s2["proposed"]


def test_engine_bad_arguments_name_themselves(model):
    with pytest.raises(ValueError, match="^kv"):
        Engine(model, kv={0: "int8"})  # a per-layer mapping that leaves layer 1 without a spec
    with pytest.raises(ValueError, match="^kv"):
        Engine(model, kv=["int8"] * 3)
    with pytest.raises(ValueError, match="^prefill_chunk"):
        Engine(model, page_size=32, prefill_chunk=48)
    with pytest.raises(ValueError, match="^max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="^prefill_block"):
        Engine(model, prefill_block=0)
    eng = Engine(model, kv="int8", max_batch=1, page_size=16, max_len=64, num_pages=2)
    with pytest.raises(ValueError, match="^token_ids"):
        eng.submit([[1, 2]], 4)
    with pytest.raises(ValueError, match="^token_ids"):
        eng.submit([V], 4)
    with pytest.raises(ValueError, match="^max_new_tokens"):
        eng.submit([1, 2], 0)
    with pytest.raises(ValueError, match="^max_new_tokens"):
        eng.submit([1] * 60, 10)  # beyond max_len
    with pytest.raises(ValueError, match="^token_ids"):
        eng.submit([1] * 40, 10)  # needs 4 pages, the pool has 2
    with pytest.raises(ValueError, match="^sampler"):
        eng.submit([1, 2], 3, sampler="greedy")
    with pytest.raises(ValueError, match="^k:"):
        speculative_generate(model, model, [1, 2], k=0)
    with pytest.raises(ValueError, match="^tokens"):
        speculative_generate(model, model, [[1, 2]], k=2)
    assert "page_table" in inspect.signature(kvq.attend).parameters
