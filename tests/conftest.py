"""Shared fixtures of the foundation tests: one set of jitted entry points (so every
test file reuses the same compiled functions) and a float64 numpy oracle that reads a
KVCache's storage with its own unpacking code, independent of quant.dequantize."""

from __future__ import annotations

import os
import types

# The suite compiles hundreds of small programs (interpret-mode kernels above all) and runs each
# on tiny inputs: XLA's optimization passes cost more than they save there (tests/test_kernel.py:
# 252-275 s -> 179 s on 2 cores). Set in the environment before jax starts, so the subprocesses of
# tests/test_sharding.py and tests/test_cli.py inherit it. The GPU benchmarks run fully optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA's CPU compiler with its older fusion code generator compiles these programs in about half
# the time (an interpret-mode kernel: 1.16 -> 0.54 s); read when the CPU backend starts, so also here.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402

if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"):  # jax may have started first
    jax.config.update("jax_disable_most_optimizations", True)
import jax.numpy as jnp
import numpy as np
import pytest

import kvq_jax as kvq

# Compiled once per (spec, shapes) for the whole session; the spec is pytree metadata
# of KVCache, so it is static without being named.
append_jit = jax.jit(kvq.append)
attend_jit = jax.jit(kvq.attend, static_argnames=("impl", "interpret", "scale"))

MEASURED = {}  # test_attend_xla fills it: preset -> measured errors; printed at the end


def bf16_normal(rng, shape, outlier_channels=(), outlier_gain=20.0):
    """Fresh N(0, 1) values, exactly representable in bf16 (returned as a bf16 array)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if len(outlier_channels):
        x[..., list(outlier_channels)] *= outlier_gain
    return jnp.asarray(x, jnp.bfloat16)


def hadamard_np(n):
    """Orthonormal Sylvester-Hadamard in float64, built here, not by the library."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def unpack_np(data, t):
    """Stored bytes -> integer grid values (int64), split layout of DESIGN.md."""
    d = np.asarray(data)
    if t.format in ("int8",):
        return d.astype(np.int64)
    bits = t.bits
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [((d.astype(np.int64) >> (bits * i)) & mask) for i in range(per)]
    out = np.concatenate(parts, axis=-1)
    if t.symmetric:  # two's complement of `bits` bits
        out = np.where(out >= 1 << (bits - 1), out - (1 << bits), out)
    return out


def dequant_np(data, scale, zero, t, token_group=None):
    """float64 x̂ from stored data/scale/zero of TensorSpec ``t`` ([..., S, Dp] -> [..., S, D])."""
    if t.format == "bf16":
        return np.asarray(jnp.asarray(data, jnp.float32), np.float64)
    if t.format == "fp8":
        q = np.asarray(jnp.asarray(data, jnp.float32), np.float64)
    else:
        q = unpack_np(data, t).astype(np.float64)
    s = np.asarray(jnp.asarray(scale, jnp.float32), np.float64)
    z = None if zero is None else np.asarray(jnp.asarray(zero, jnp.float32), np.float64)
    if t.axis == "token":
        g = q.shape[-1] // s.shape[-1]
        s = np.repeat(s, g, axis=-1)
        z = None if z is None else np.repeat(z, g, axis=-1)
    else:
        s = np.repeat(s, token_group, axis=-2)[..., : q.shape[-2], :]
        z = None if z is None else np.repeat(z, token_group, axis=-2)[..., : q.shape[-2], :]
    return q * s + (0.0 if z is None else z)


def expected_split(spec, n):
    """(n_sink, n_body, n_residual) for a sequence of n tokens, from cache.py's docstring."""
    n_sink = min(n, spec.sinks)
    m = n - n_sink
    if not spec.quantized:
        return n_sink, m, 0
    gran = spec.token_group if (spec.k.quantized and spec.k.axis == "channel") else 1
    q = max(m - spec.residual, 0) // gran * gran
    return n_sink, q, m - q


def cache_kv_f64(cache):
    """Per sequence b: (K_b, V_b) float64 ``[Hkv, n_b, D]`` in absolute token order,
    unrotated: sinks, dequantized body, residual — read from the storage leaves."""
    spec = cache.spec
    D = cache.head_dim
    tg = spec.token_group
    kb = dequant_np(cache.k, cache.k_scale, cache.k_zero, spec.k, tg)
    vb = dequant_np(cache.v, cache.v_scale, cache.v_zero, spec.v, tg)
    if spec.rotate:  # body holds x @ H; undo with H^T
        h = hadamard_np(D)
        kb, vb = kb @ h.T, vb @ h.T
    f = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    sk, sv, rk, rv = f(cache.sink_k), f(cache.sink_v), f(cache.res_k), f(cache.res_v)
    out = []
    for b, n in enumerate(np.asarray(cache.lengths).tolist()):
        ns, nq, nr = expected_split(spec, n)
        K = np.concatenate([sk[b, :, :ns], kb[b, :, :nq], rk[b, :, :nr]], axis=1)
        V = np.concatenate([sv[b, :, :ns], vb[b, :, :nq], rv[b, :, :nr]], axis=1)
        out.append((K, V))
    return out


def attention_f64(q, kv, scale=None):
    """Causal attention in float64. q: [B, T, Hq, D]; kv: per sequence (K, V) [Hkv, n, D].
    Query t of sequence b sits at position n_b - T + t and sees keys at positions <= it."""
    q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    B, T, Hq, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.zeros_like(q)
    for b, (K, V) in enumerate(kv):
        H, n, _ = K.shape
        G = Hq // H
        qb = q[b].reshape(T, H, G, D)
        s = np.einsum("thgd,hsd->thgs", qb, K) * scale
        qpos = n - T + np.arange(T)
        mask = np.arange(n)[None, :] <= qpos[:, None]  # [T, n]
        s = np.where(mask[:, None, None, :], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        out[b] = np.einsum("thgs,hsd->thgd", p, V).reshape(T, Hq, D)
    return out


@pytest.fixture(scope="session")
def kv():
    """The shared helpers above, as one namespace."""
    return types.SimpleNamespace(
        append=append_jit, attend=attend_jit, bf16_normal=bf16_normal, hadamard_np=hadamard_np,
        unpack_np=unpack_np, dequant_np=dequant_np, expected_split=expected_split,
        cache_kv_f64=cache_kv_f64, attention_f64=attention_f64, measured=MEASURED)


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        tr = terminalreporter
        tr.section("attend(impl='xla') vs float64 attention over the original k/v")
        tr.write_line(f"{'preset':<10} {'max|err|':>10} {'mean|err|':>10} {'rms|o|':>10} {'median bound':>13}")
        for name, (mx, mean, rms, bound) in MEASURED.items():
            tr.write_line(f"{name:<10} {mx:>10.2e} {mean:>10.2e} {rms:>10.2e} {bound:>13.2e}")
