"""The FMA decode kernel (interpret mode on CPU) against reference.py on the same quantized data.

The kernel is f32 after the exact unpacking (no 16-bit rounding of q or p), so it is
held to f32 rounding of the reference: relative L2 error of o below 1e-5, lse within
1e-5, and the same rows empty (lse = -inf). Every preset it reads meets one shape
(G in {1, 4, 8}, D in {64, 128}, T in {1, 2} over the list), with ragged lengths
(max_len, 0, block non-multiples); split counts, the paged path and the CUDA
(Triton) lowering are checked on a few.
"""

from __future__ import annotations

import math
import re
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq
from kvq_jax import reference
from kvq_jax.kernels import decode_fma

# (preset, G, D, T): each preset once; G, D and T values all met over the list
CASES = [
    ("bf16", 1, 64, 1),
    ("fp8", 4, 128, 1),
    ("int8", 8, 64, 2),
    ("int4", 4, 128, 2),
    ("int2", 1, 128, 2),
    ("k8v4", 4, 64, 1),
    ("int4-kivi", 4, 128, 1),
    ("int2-kivi", 8, 64, 1),
    ("int4-rot", 4, 64, 1),
]
MAX_LEN = 400
REL_TOL = 1e-5
_append = jax.jit(kvq.append)


def _case(spec_str, G, D, T, seed, lengths=None, max_len=MAX_LEN, B=4, H=2):
    rng = np.random.default_rng(seed)
    spec = kvq.KVSpec.parse(spec_str)
    lengths = np.array([max_len, 0, 133, 271][:B] if lengths is None else lengths)
    cache = kvq.init_cache(spec, B, max_len, H, D)
    k = rng.standard_normal((B, max_len, H, D)).astype(np.float32)
    k[..., 5] *= 12.0  # an outlier channel, as real keys have
    v = rng.standard_normal((B, max_len, H, D)).astype(np.float32)
    cache = _append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32))
    q = jnp.asarray(rng.standard_normal((B, T, H * G, D)), jnp.float32)
    qg = q.reshape(B, T, H, G, D)
    if spec.rotate:
        qg = kvq.quant.rotate(qg)
    qpos = cache.lengths[:, None] - T + jnp.arange(T)[None]
    return spec, cache, qg, qpos, 1.0 / math.sqrt(D)


def _reference(qg, cache, qpos, scale):
    return jax.jit(lambda qg, c, qp: reference.body_attention(qg, c, qp, scale))(qg, cache, qpos)


def _fma(qg, cache, qpos, scale, config=None, page_table=None):
    """The kernel in interpret mode, jitted (one compilation instead of op-by-op dispatch)."""
    if page_table is not None:  # the paged view is not a pytree: closed over
        return jax.jit(lambda qg, qp, t: decode_fma.body_attention_fma(
            qg, cache, qp, scale, interpret=True, config=config, page_table=t))(qg, qpos, page_table)
    return jax.jit(lambda qg, c, qp: decode_fma.body_attention_fma(
        qg, c, qp, scale, interpret=True, config=config))(qg, cache, qpos)


def _check(o, lse, o_ref, lse_ref, what=""):
    o, lse, o_ref, lse_ref = (np.asarray(x) for x in (o, lse, o_ref, lse_ref))
    finite = np.isfinite(lse_ref)
    assert np.array_equal(np.isfinite(lse), finite), f"{what}: empty rows differ"
    assert np.all(o[~finite] == 0), f"{what}: empty rows must give o = 0"
    rel = np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref)
    assert rel < REL_TOL, f"{what}: relative L2 error {rel:.2e}"
    np.testing.assert_allclose(lse[finite], lse_ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,G,D,T", CASES, ids=[f"{c[0]}-G{c[1]}-D{c[2]}-T{c[3]}" for c in CASES])
def test_fma_kernel_matches_reference(name, G, D, T):
    spec, cache, qg, qpos, scale = _case(name, G, D, T, seed=zlib.crc32(f"fma{name}{G}{D}{T}".encode()))
    o_ref, lse_ref = _reference(qg, cache, qpos, scale)
    o, lse = _fma(qg, cache, qpos, scale)
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    _check(o, lse, o_ref, lse_ref, name)


def test_split_count_and_block_size_do_not_change_the_result():
    """Also rows padded to a power of two (G = 3: 3 rows in 4)."""
    spec, cache, qg, qpos, scale = _case("int8", 3, 64, 1, seed=3, lengths=[400, 0, 97], B=3)
    o_ref, lse_ref = _reference(qg, cache, qpos, scale)
    for cfg in (decode_fma.FmaConfig(16, 1), decode_fma.FmaConfig(32, 3), decode_fma.FmaConfig(64, 8)):
        o, lse = _fma(qg, cache, qpos, scale, config=cfg)
        _check(o, lse, o_ref, lse_ref, str(cfg))


def test_per_channel_keys_with_blocks_smaller_than_a_token_group():
    spec, cache, qg, qpos, scale = _case("int4-kivi", 2, 64, 1, seed=7, B=2)
    o_ref, lse_ref = _reference(qg, cache, qpos, scale)
    o, lse = _fma(qg, cache, qpos, scale, config=decode_fma.FmaConfig(16, 2))
    _check(o, lse, o_ref, lse_ref, "int4-kivi block 16")
    with pytest.raises(ValueError, match="token_group"):
        decode_fma.body_attention_fma(qg, cache, qpos, scale, interpret=True, config=decode_fma.FmaConfig(64, 2))


def _paged(cache, page_size, rng):
    """The body of a contiguous cache moved into a pool of pages in scrambled order (+ 3 spare pages)."""
    B, H, S = cache.k.shape[:3]
    npg = S // page_size
    P = B * npg + 3
    order = rng.permutation(P)[: B * npg]

    def pool(x):
        if x is None:
            return None
        rows = x.shape[2] // npg  # tokens (or token groups) per page
        pages = x.reshape(B, H, npg, rows, *x.shape[3:]).transpose(0, 2, 1, 3, *range(4, x.ndim + 1))
        pages = pages.reshape(B * npg, H, rows, *x.shape[3:])
        out = jnp.asarray(rng.standard_normal((P, *pages.shape[1:])) * 7).astype(x.dtype)  # junk in spare pages
        return out.at[order].set(pages)

    fields = {n: pool(getattr(cache, n)) for n in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")}
    paged = types.SimpleNamespace(spec=cache.spec, lengths=cache.lengths, **fields)
    return paged, jnp.asarray(order.reshape(B, npg), jnp.int32)


@pytest.mark.parametrize("name", ["int4", "int4-kivi", "bf16"])
def test_paged_body_matches_reference(name):
    """Reading through a scrambled page table gives the reference result on the same data."""
    rng = np.random.default_rng(zlib.crc32(f"paged{name}".encode()))
    spec, cache, qg, qpos, scale = _case(name, 2, 64, 1, seed=zlib.crc32(name.encode()), B=3)
    o_ref, lse_ref = _reference(qg, cache, qpos, scale)
    paged, table = _paged(cache, 64, rng)
    o, lse = _fma(qg, paged, qpos, scale, config=decode_fma.FmaConfig(32, 3), page_table=table)
    _check(o, lse, o_ref, lse_ref, f"paged {name}")
    with pytest.raises(ValueError, match="page_table"):
        decode_fma.body_attention_fma(qg, paged, qpos, scale, interpret=True, page_table=table[:1])
    if not spec.channel_keys:  # (per-channel keys reject block_k 128 for its token group first)
        with pytest.raises(ValueError, match="page size"):
            decode_fma.body_attention_fma(qg, paged, qpos, scale, interpret=True, page_table=table,
                                          config=decode_fma.FmaConfig(128, 1))


@pytest.mark.parametrize("name", ["int8", "int4", "bf16", "int4-kivi"])
def test_fma_kernel_lowers_for_cuda_with_the_triton_call(name):
    spec = kvq.KVSpec.parse(name)
    cache = kvq.init_cache(spec, 2, 512, 2, 128)
    qg = jnp.zeros((2, 1, 2, 4, 128), jnp.float32)
    qpos = jnp.full((2, 1), 511, jnp.int32)
    f = jax.jit(lambda qg, c: decode_fma.body_attention_fma(qg, c, qpos, 0.1, interpret=False))
    text = f.trace(qg, cache).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text), "no Triton call in the lowered module"


def test_paged_fma_kernel_lowers_for_cuda():
    rng = np.random.default_rng(0)
    spec = kvq.KVSpec.parse("int4")
    cache = kvq.init_cache(spec, 2, 512, 2, 128)
    paged, table = _paged(cache, 128, rng)
    qg = jnp.zeros((2, 2, 2, 4, 128), jnp.float32)
    qpos = jnp.full((2, 2), 511, jnp.int32)
    f = jax.jit(lambda qg, t: decode_fma.body_attention_fma(qg, paged, qpos, 0.1, interpret=False, page_table=t))
    text = f.trace(qg, table).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text)


def test_more_than_16_rows_is_a_clear_error():
    spec = kvq.KVSpec.parse("int8")
    cache = kvq.init_cache(spec, 1, 256, 1, 64)
    qg = jnp.zeros((1, 3, 1, 8, 64), jnp.float32)  # T * G = 24 rows
    with pytest.raises(ValueError, match=r"qg: .*24"):
        decode_fma.body_attention_fma(qg, cache, jnp.zeros((1, 3), jnp.int32), 0.1, interpret=True)


@pytest.mark.parametrize("name", ["bf16", "fp8", "int8", "int4", "int2", "k8v4", "int4-kivi", "int2-kivi"])
@pytest.mark.parametrize("D", [64, 128])
def test_layout_pieces_never_straddle_a_scale_group(name, D):
    spec = kvq.KVSpec.parse(name)
    for t in (spec.k, spec.v):
        lay = decode_fma.fma_layout(t, D)
        assert sorted(lay.perm) == list(range(D))
        g = t.group_size(D) if t.quantized and t.axis == "token" else D
        for off, pc in zip(lay.offsets(), lay.pieces):
            assert 1 <= pc.width <= 32 and len(pc.segs) == 1
            cols = lay.perm[off:off + pc.width]
            assert len({c // g for c in cols}) == 1
            if t.quantized and t.axis == "token":
                assert cols[0] // g == pc.segs[0][0]
    cfg = decode_fma.choose_fma_config(spec, 64, 32768)
    assert not spec.channel_keys or spec.token_group % cfg.block_k == 0
    with pytest.raises(NotImplementedError, match="group"):
        decode_fma.fma_layout(kvq.KVSpec.parse("k=int4:g2,v=int4:g2").k, 64)
