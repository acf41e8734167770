"""attention.attend_chunk (chunked prefill over the cache before the chunk) against float64.

The oracle reads the cache's dequantized tokens in absolute order (sinks, body, residual:
conftest.cache_kv_f64), appends the chunk's own full-precision keys and values, and runs
causal float64 attention; rows past a sequence's real chunk length are not compared.
Blocked reads of the body (``block``) must give the same result as reading it at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax import attention, reference

SPECS = ["bf16", "fp8", "int8", "int4", "int4-kivi", "int2-kivi", "int4-rot",
         "k=int4:c:asym,v=int4:t:g32:asym,tg=32,res=16,sinks=4"]
B, HKV, G, D, T, MAX_LEN = 2, 2, 3, 64, 24, 1024


def _chunk_case(kv, spec, seed, past=(700, 333), real=(T, 17)):
    rng = np.random.default_rng(seed)
    c = kvq.init_cache(spec, B, MAX_LEN, HKV, D)
    k0 = kv.bf16_normal(rng, (B, max(past), HKV, D), outlier_channels=(5, 40), outlier_gain=8.0)
    v0 = kv.bf16_normal(rng, (B, max(past), HKV, D))
    c = kv.append(c, k0, v0, jnp.asarray(past, jnp.int32))
    q = jnp.asarray(rng.standard_normal((B, T, HKV * G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
    return c, q, k, v, np.asarray(real)


def _oracle(kv, cache, q, k, v):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    both = [(np.concatenate([K, f(k[b]).transpose(1, 0, 2)], 1), np.concatenate([V, f(v[b]).transpose(1, 0, 2)], 1))
            for b, (K, V) in enumerate(kv.cache_kv_f64(cache))]
    return kv.attention_f64(q, both)


@pytest.mark.parametrize("spec", SPECS)
def test_equals_f64_over_the_dequantized_past_and_the_chunk(kv, spec):
    c, q, k, v, real = _chunk_case(kv, spec, seed=SPECS.index(spec))
    want = _oracle(kv, c, q, k, v)
    vmax = max(np.abs(V).max() for _, V in kv.cache_kv_f64(c))
    outs = {}
    for block in (None, 64):  # the body is 1024 tokens: 1 and 16 blocks
        got = np.asarray(jax.jit(lambda *a, block=block: attention.attend_chunk(*a, lengths=real, block=block))(
            q, k, v, c), np.float64)
        for b in range(B):
            np.testing.assert_allclose(got[b, :real[b]], want[b, :real[b]], rtol=1e-5, atol=1e-5 * max(vmax, 1.0),
                                       err_msg=f"{spec} block={block} row {b}")
        outs[block] = got
    np.testing.assert_allclose(outs[64], outs[None], rtol=1e-5, atol=1e-5)


def test_block_size_divides_the_body_in_whole_token_groups():
    c = kvq.init_cache("int4-kivi", 1, 1000, 1, 64)  # token group 32, body rounded up to 1024
    S = c.k.shape[2]
    assert reference.body_block_size(c, None) == S
    assert reference.body_block_size(c, 10**6) == S
    for want in (100, 300, 512):
        b = reference.body_block_size(c, want)
        assert b <= want and S % b == 0 and b % 32 == 0 and b >= want // 2, (want, b)
    assert reference.body_block_size(c, 16) == S  # no whole token group fits: one block


def test_bad_arguments_and_overflow_rows(kv):
    c, q, k, v, real = _chunk_case(kv, "int8", seed=9)
    with pytest.raises(ValueError, match="^k, v:"):
        attention.attend_chunk(q, k[:, :3], v, c)
    with pytest.raises(ValueError, match="^q:"):
        attention.attend_chunk(q[..., :32], k, v, c)
    over = c.__class__(**{**c.__dict__, "overflow": jnp.asarray([True, False])})
    o = np.asarray(attention.attend_chunk(q, k, v, over))
    assert np.isnan(o[0]).all() and np.isfinite(o[1]).all()


def _paged_and_contiguous(kv, spec, seed, T):
    """The same 300 / 190 tokens in a paged cache (16 pages of 64, shuffled) and a contiguous
    one, and a chunk's ``q``, ``k`` of T tokens."""
    from kvq_jax.serve import append_paged, init_paged_cache

    rng = np.random.default_rng(seed)
    pc = init_paged_cache(spec, B, 16, 64, 8, HKV, D,
                          page_table=jnp.asarray(rng.permutation(16).reshape(B, 8), jnp.int32))
    cc = kvq.init_cache(spec, B, 512, HKV, D)
    k0 = kv.bf16_normal(rng, (B, 300, HKV, D))
    n = jnp.asarray([300, 190], jnp.int32)
    pc, cc = append_paged(pc, k0, k0, n), kvq.append(cc, k0, k0, n)
    q = jnp.asarray(rng.standard_normal((B, T, HKV * G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
    return pc, cc, q, k


def test_paged_twin_equals_the_contiguous_one(kv):
    from kvq_jax.serve import attend_chunk_paged

    pc, cc, q, k = _paged_and_contiguous(kv, "int4-kivi", 3, 8)
    got = attend_chunk_paged(q, k, k, pc, block=128)
    want = attention.attend_chunk(q, k, k, cc, block=128)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


KERNEL_SPECS = ["int8", "int4", "int4-kivi", "k=int4:c:asym,v=int4:t:g32:asym,tg=32,res=16,sinks=4"]


@pytest.mark.parametrize("spec", KERNEL_SPECS)
def test_kernel_path_equals_f64_in_row_tiles(kv, spec):
    """impl="pallas" (interpret mode, precise): the chunk's T * G = 72 rows in tiles of 64
    (the default) and of 16, each program stopping at its own causal limit."""
    from kvq_jax.kernels import decode

    c, q, k, v, real = _chunk_case(kv, spec, seed=40 + KERNEL_SPECS.index(spec))
    want = _oracle(kv, c, q, k, v)
    vmax = max(np.abs(V).max() for _, V in kv.cache_kv_f64(c))
    tg = c.spec.token_group if c.spec.channel_keys else 64
    for row_tile in (64, 16):
        cfg = decode.Config(tg, 2, row_tile=row_tile)
        got = np.asarray(jax.jit(lambda *a, cfg=cfg: attention.attend_chunk(
            *a, lengths=real, impl="pallas", interpret=True, precise=True, config=cfg))(q, k, v, c), np.float64)
        for b in range(B):
            np.testing.assert_allclose(got[b, :real[b]], want[b, :real[b]], rtol=2e-5, atol=2e-5 * max(vmax, 1.0),
                                       err_msg=f"{spec} row_tile={row_tile} row {b}")


def test_kernel_row_tiles_and_config_errors():
    from kvq_jax.kernels import decode

    assert decode._row_tiles(4, 64) == (16, 1)
    assert decode._row_tiles(64, 64) == (64, 1)
    assert decode._row_tiles(65, 64) == (64, 2)
    assert decode._row_tiles(4096, 32) == (32, 128)
    with pytest.raises(ValueError, match="^row_tile"):
        decode.Config(64, 1, row_tile=48)
    c = kvq.init_cache("int8", 1, 128, 1, 64)
    q = jnp.ones((1, 2, 1, 64))
    with pytest.raises(ValueError, match="^impl"):
        attention.attend_chunk(q, q, q, c, impl="triton")
    with pytest.raises(ValueError, match="^page_table"):
        attention.attend_chunk(q, q, q, c, impl="xla", page_table=jnp.zeros((1, 2), jnp.int32))


def test_paged_kernel_path_equals_the_contiguous_xla_one(kv):
    from kvq_jax.serve import attend_chunk_paged

    pc, cc, q, k = _paged_and_contiguous(kv, "int8", 4, 24)
    got = attend_chunk_paged(q, k, k, pc, impl="pallas", interpret=True, precise=True)
    want = attention.attend_chunk(q, k, k, cc, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_chunk_kernel_lowers_for_cuda_in_row_tiles():
    import re

    from kvq_jax.serve import attend_chunk_paged, init_paged_cache

    pc = init_paged_cache("int4", 2, 32, 256, 8, 2, 128)
    q = jnp.zeros((2, 64, 8, 128), jnp.bfloat16)  # 256 rows per KV head: 4 row tiles
    k = jnp.zeros((2, 64, 2, 128), jnp.bfloat16)
    f = jax.jit(lambda q, k, c: attend_chunk_paged(q, k, k, c, impl="pallas", interpret=False))
    text = f.trace(q, k, pc).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text), "no Triton call in the lowered module"
