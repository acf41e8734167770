"""Decode-attention benchmark on one GPU: kvq_jax kernels against peers, same run.

    python benchmarks/decode.py [--quick] [--sweep] [--out DIR]

1. Checks our GPU kernel against ``reference.py`` (f32, same quantized data) for
   every preset at several shapes (G, D, T, ragged lengths), default and precise.
2. Times, for B=8, Hq=32, Hkv=8, D=128 at S in {1K, 4K, 32K, 128K} and B in
   {1, 64} at S=32K: torch SDPA bf16 (``enable_gqa=True``), cuDNN through
   ``jax.nn.dot_product_attention``, XLA dequantize-then-einsum on int8, and ours
   for each preset. Each time: warm-up, then N launches back to back with one
   sync (JAX: N iterations inside one jit, each depending on the last; torch:
   N launches then one synchronize), median of 5 such batches.
3. Prints time, effective TB/s (cache bytes read / time), ratio to torch bf16;
   writes JSON and a plot to ``--out``.
4. With ``--gpus N``: `kvq.sharding.shard_attend` with the KV heads split over 1, 2, 4, ...
   up to N devices (mesh data 1, model n) at ``--sharded-shape``: time per step and
   per-device throughput against one device.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvq_jax as kvq
from kvq_jax.kernels import decode
from kvq_jax.serve import paged as serve_paged

OURS = ["bf16", "fp8", "int8", "int4", "int2", "k8v4", "int4-kivi", "int2-kivi"]


# -- timing ------------------------------------------------------------------

def chained(fn, *args, n=20):
    """A compiled run of ``n`` chained calls of ``fn(*args) -> array`` (each call depends on the
    previous one: no hoisting, no overlap), called once to compile; calling the result runs them
    and returns seconds per call."""
    first = args[0]

    @jax.jit
    def many(*a):
        def body(i, carry):
            x, acc = carry
            out = fn(x, *a[1:])
            return x + (jnp.sum(out[..., :1]) * 0.0).astype(x.dtype), acc + out[..., :1].astype(jnp.float32).sum()
        return jax.lax.fori_loop(0, n, body, (a[0], jnp.float32(0)))[1]

    jax.block_until_ready(many(first, *args[1:]))

    def run():
        t = time.perf_counter()
        jax.block_until_ready(many(first, *args[1:]))
        return (time.perf_counter() - t) / n

    return run


def time_jax(fn, *args, n=20, reps=5):
    """Median seconds per call of ``fn(*args) -> array`` (n chained calls in one jit)."""
    run = chained(fn, *args, n=n)
    return statistics.median(run() for _ in range(reps))


def time_interleaved(runs: dict, rounds: int, reps: int = 5) -> dict:
    """``{label: run}`` (`chained`) timed round-robin: each of ``rounds`` rounds times every run
    ``reps`` times back to back (median), so drifts of the device's speed spread over all of
    them alike. Returns ``{label: [seconds per call of each round]}``."""
    out = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            out[label].append(statistics.median(run() for _ in range(reps)))
    return out


def time_torch(fn, n=20, reps=5):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(ts)


# -- data --------------------------------------------------------------------

def build_cache(spec, B, S, H, D, key, lengths=None, chunk=4096):
    """A cache holding S random tokens per sequence (outlier key channels), filled in chunks."""
    cache = kvq.init_cache(spec, B, S, H, D)
    app = jax.jit(kvq.append, donate_argnums=0)
    lengths = np.full(B, S) if lengths is None else np.asarray(lengths)
    ch_scale = jnp.ones(D).at[::17].set(8.0)
    for t0 in range(0, S, chunk):
        T = min(chunk, S - t0)
        key, k1, k2 = jax.random.split(key, 3)
        k = (jax.random.normal(k1, (B, T, H, D), jnp.bfloat16) * ch_scale).astype(jnp.bfloat16)
        v = jax.random.normal(k2, (B, T, H, D), jnp.bfloat16)
        n = jnp.asarray(np.clip(lengths - t0, 0, T), jnp.int32)
        cache = app(cache, k, v, n)
    return cache


def cache_bytes_read(spec, B, S, H, D, lengths=None):
    """Bytes of K/V (with scales and zero points) a decode step must read."""
    n = B * S if lengths is None else int(np.sum(lengths))
    return kvq.bytes_per_token(spec, 1, H, D) * n


def bench_sharded(B, S, Hq, H, D, presets, key, gpus):
    """`kvq.sharding.shard_attend` over n = 1, 2, 4, ... <= ``gpus`` devices, KV heads split
    (`make_mesh(data=1, model=n)`); one row per (preset, n) with ``per_device_vs_1`` =
    t(1) / (n * t(n)), the per-device throughput against one device."""
    rows = []
    counts = [n for n in (1, 2, 4, 8) if n <= gpus and H % n == 0]
    q = jax.random.normal(key, (B, 1, Hq, D), jnp.bfloat16)
    for name in presets:
        spec = kvq.KVSpec.parse(name)
        cache = build_cache(spec, B, S, H, D, key)
        nbytes = cache_bytes_read(spec, B, S, H, D)
        base = None
        for n in counts:
            mesh = kvq.sharding.make_mesh(data=1, model=n, devices=jax.devices()[:n])
            c = kvq.sharding.shard_cache(cache, mesh)
            t = time_jax(lambda q, c, mesh=mesh: kvq.sharding.shard_attend(q, c, mesh=mesh), q, c)
            base = base or t
            rows.append(dict(impl=f"kvq-{name}-{n}dev", t=t, bytes=nbytes, B=B, S=S, Hq=Hq, H=H, D=D, devices=n,
                             tbs=nbytes / t / 1e12, vs_torch=None, per_device_vs_1=base / (n * t)))
            print(f"sharded B={B} S={S} {name:10s} {n} dev {t * 1e6:9.1f} us {nbytes / t / 1e12:6.2f} TB/s "
                  f"per device vs 1: {base / (n * t):.3f}", flush=True)
            del c
        del cache
    return rows


# -- correctness ---------------------------------------------------------------

# relative L2 error allowed against the reference on the same quantized data: precise mode; the
# default mode (q and p rounded to 16 bits once); the default mode with q rounded to one int8 term for
# the int8 q·k dot (sub-byte keys): each element of q moves by up to max|q_row| / 254, ~20x the fp16
# rounding (measured 1.3e-2 / 7.2e-4 on asymmetric int4 keys, D 64), still far below the keys' own
# 4-bit rounding that this comparison leaves out; tests/test_kernel.py holds every path to its
# analytic bound
CHECK_REL = {"precise": 2e-5, "default": 1e-2, "q-int8": 4e-2}


def check_tolerance(spec, D, cfg, precise) -> float:
    """The relative error `check` allows the kernel under ``cfg`` (`CHECK_REL`)."""
    if precise:
        return CHECK_REL["precise"]
    qk, terms = decode.qk_int8_choice(spec, decode.make_layout(spec.k, D, cfg.unpack), cfg)
    return CHECK_REL["q-int8" if qk and terms == 1 else "default"]


def check(quick=False, presets=None, unpacks=("auto",), qk_int8=(None,), vary=({},)):
    """Our GPU kernel (each ``Config.unpack`` of ``unpacks``, ``Config.qk_int8`` of ``qk_int8`` and
    override set of ``vary``) vs reference.py on the same quantized data, within `check_tolerance`;
    returns rows of results."""
    rows = []
    key = jax.random.key(1)
    shapes = [(2, 8, 4, 128, 1), (3, 2, 1, 64, 4), (2, 4, 8, 256, 1), (2, 2, 3, 128, 16)]
    if quick:
        shapes = shapes[:2]
    for name in presets or (OURS + ["int4-rot"]):
        spec = kvq.KVSpec.parse(name)
        for (B, H, G, D, T) in shapes:
            key, kq = jax.random.split(key)
            lengths = np.array([3000, 1, 2049][:B]) if B > 1 else np.array([3000])
            lengths = np.maximum(lengths, T)
            cache = build_cache(spec, B, 3072, H, D, key, lengths)
            q = jax.random.normal(kq, (B, T, H * G, D), jnp.float32)
            ref = kvq.attend(q, cache, impl="xla")
            for unpack, qk, var, precise in itertools.product(unpacks, qk_int8, vary, (False, True)):
                cfg = dataclasses.replace(decode.choose_config(cache, T * G), unpack=unpack, qk_int8=qk, **var)
                if qk_int8_unsupported(qk, spec, D, unpack) or H % cfg.heads:
                    continue
                out = jax.jit(lambda q, c: _attend_pallas(q, c, precise, cfg))(q, cache)
                err = float(jnp.max(jnp.abs(out - ref)))
                rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                tol = check_tolerance(spec, D, cfg, precise)
                ok = bool(jnp.all(jnp.isfinite(out))) and rel < tol
                rows.append(dict(preset=name, B=B, H=H, G=G, D=D, T=T, precise=precise, unpack=unpack,
                                 qk_int8=qk, vary=var, max_abs=err, rel=rel, tol=tol, ok=ok))
                print(f"check {name:10s} B={B} H={H} G={G} D={D} T={T} {unpack:5s} qk_int8={qk!s:5s} {var} "
                      f"precise={precise!s:5s} "
                      f"max|d|={err:.2e} rel={rel:.2e} (< {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def _attend_pallas(q, cache, precise=False, config=None):
    """kvq.attend through the compiled kernel (interpreted off a GPU) with explicit precise / config."""
    return kvq.attend(q, cache, impl="pallas", interpret=jax.default_backend() != "gpu",
                      precise=precise, config=config)


# -- paged -------------------------------------------------------------------

BODY = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")


def to_pages(cache, page_size, key, shuffled=True):
    """The body of a contiguous cache as page pools in shuffled page order (``shuffled``; else
    each sequence's pages in a row, sequence after sequence), and its page table."""
    B, H, S = cache.k.shape[:3]
    npg = S // page_size
    order = jax.random.permutation(key, B * npg) if shuffled else jnp.arange(B * npg)

    def pool(x):
        if x is None:
            return None
        rows = x.shape[2] // npg
        pages = jnp.moveaxis(x.reshape(B, H, npg, rows, *x.shape[3:]), 2, 1).reshape(B * npg, H, rows, *x.shape[3:])
        return jnp.zeros_like(pages).at[order].set(pages)

    return {n: pool(getattr(cache, n)) for n in BODY}, order.reshape(B, npg).astype(jnp.int32)


def paged_body(q, pools, table, cache, config=None, v_token_minor=False, v_pairs=False, interpret=None):
    """Our kernel over the body through a page table (the body segment of attend, B=any, T=1)."""
    import types

    B, T, Hq, D = q.shape
    H = cache.num_kv_heads
    view = types.SimpleNamespace(spec=cache.spec, lengths=cache.lengths, **pools)
    qg = q.reshape(B, T, H, Hq // H, D).astype(jnp.float32)
    qpos = cache.lengths[:, None] - 1
    return decode.body_attention(qg, view, qpos, 1.0 / math.sqrt(D),
                                 interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
                                 page_table=table, config=config, v_token_minor=v_token_minor,
                                 v_pairs=v_pairs)[0]


def contiguous_body(q, cache, config=None, v_token_minor=False, interpret=None, v_pairs=False):
    B, T, Hq, D = q.shape
    H = cache.num_kv_heads
    qg = q.reshape(B, T, H, Hq // H, D).astype(jnp.float32)
    return decode.body_attention(qg, cache, cache.lengths[:, None] - 1, 1.0 / math.sqrt(D),
                                 interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
                                 config=config, v_token_minor=v_token_minor, v_pairs=v_pairs)[0]


def qk_int8_unsupported(qk, spec, D, unpack) -> bool:
    """True when ``Config.qk_int8=qk`` asks for the int8 q·k dot that ``spec``'s keys cannot take."""
    return bool(qk) and not decode.qk_int8_supported(spec, decode.make_layout(spec.k, D, unpack))


def parse_vary(arg: str) -> list[dict]:
    """``"block_k=128,num_stages=4;v_fp16=1"`` -> ``[{}, {"block_k": 128, "num_stages": 4}, {"v_fp16": True}]``:
    `decode.Config` field overrides, each timed beside the base config (the empty set)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(decode.Config)}  # "int", "bool | None", "str"
    out = [{}]
    for var in filter(None, arg.split(";")):
        d = {}
        for item in var.split(","):
            k, v = item.split("=")
            if k not in kinds:
                raise SystemExit(f"--vary: {k!r} is not a Config field ({', '.join(kinds)})")
            d[k] = v if "str" in kinds[k] else (bool(int(v)) if "bool" in kinds[k] else int(v))
        out.append(d)
    return out


# --paged-values: bench_paged's v_layouts: "paged" as kvq.serve.PagedKVCache stores values (tokens-minor,
# sub-byte values in pairs), "tokens-minor" without pairs, "token-major" as the contiguous KVCache
PAGED_VALUES = {"paged": ("paged",), "tokens-minor": ("tokens-minor",), "token-major": ("token-major",),
                "both": ("token-major", "paged"), "all": ("token-major", "tokens-minor", "paged")}


def value_layout(spec, layout: str) -> tuple[bool, bool]:
    """``(v_token_minor, v_pairs)`` of a value layout of `PAGED_VALUES` for ``spec``."""
    if layout == "paged":
        return True, serve_paged.value_pairs(spec)
    return layout == "tokens-minor", False


def store_values(v, v_token_minor: bool, v_pairs: bool):
    """Values ``[..., tokens, Dp]`` (a cache's body, or pages) stored in that layout."""
    if v_token_minor:
        v = jnp.swapaxes(v, -1, -2)
    if v_pairs:
        v = jnp.zeros_like(v).at[..., kvq.quant.pair_slot(np.arange(v.shape[-1]))].set(v)
    return v


def bench_paged(B, S, Hq, H, D, presets, key, page_size, unpacks=("auto",), qk_int8=(None,), vary=({},),
                v_layouts=("paged",), rounds=1, in_order=False):
    """Kernel over the body, contiguous vs through a shuffled page table (and, with ``in_order``,
    through pages laid out in sequence order), per ``Config.unpack`` of ``unpacks`` and value
    layout of ``v_layouts`` (`PAGED_VALUES`, `value_layout`): equal outputs, every time. With
    ``rounds`` > 1, a preset's variants are timed interleaved (`time_interleaved`): each row gets
    the median over rounds and every round's time."""
    rows = []
    for name in presets:
        spec = kvq.KVSpec.parse(name)
        if spec.residual or spec.sinks:
            print(f"paged: {name} not timed (a bf16 window or sinks beside the body: the page pools hold "
                  f"bodies alone here)", flush=True)
            continue
        cache = build_cache(spec, B, S, H, D, key)
        q = jax.random.normal(key, (B, 1, Hq, D), jnp.bfloat16)
        orders = ("", "-inorder") if in_order else ("",)  # the paged rows' impl suffix per page order
        paged = [to_pages(cache, page_size, key, shuffled=not o) for o in orders]  # [(pools, table)]
        nbytes = cache_bytes_read(spec, B, S, H, D)
        layouts = {value_layout(spec, lay) for lay in v_layouts}  # (v_token_minor, v_pairs)
        stored = {lay: (dataclasses.replace(cache, v=store_values(cache.v, *lay)),
                        [dict(pools, v=store_values(pools["v"], *lay)) for pools, _ in paged])
                  for lay in sorted(layouts)}
        variants = []  # (what, outputs equal, [(row, run) contiguous, then paged per order]): timed together below
        for unpack, qk, var, lay in itertools.product(unpacks, qk_int8, vary, sorted(layouts)):
            c_v, p_vs = stored[lay]
            vt, vp = lay
            cfg = decode.choose_config(cache, Hq // H, page_size)  # the paged kernel's default blocks
            cfg = dataclasses.replace(cfg, **{"unpack": cfg.unpack if unpack == "auto" else unpack, "qk_int8": qk, **var})
            if page_size % cfg.block_k:
                continue
            if qk_int8_unsupported(qk, spec, D, cfg.unpack):
                continue
            a = jax.jit(lambda q, c, cfg=cfg, vt=vt, vp=vp: contiguous_body(q, c, cfg, vt, v_pairs=vp))(q, c_v)
            paged_fn = jax.jit(lambda q, p, t, c, cfg=cfg, vt=vt, vp=vp: paged_body(q, p, t, c, cfg, vt, vp))
            same = all(bool(jnp.array_equal(a, paged_fn(q, p_v, table, c_v)))
                       for p_v, (_, table) in zip(p_vs, paged))
            err = None
            if vt:  # against the token-major layout's output: equal, or within f32 rounding with pairs
                want = jax.jit(lambda q, c, cfg=cfg: contiguous_body(q, c, cfg))(q, cache)
                err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - want.astype(jnp.float32))))
                same = same and (err == 0.0 if not vp else err <= 1e-4 * float(jnp.max(jnp.abs(want))))
            tag = ("-vP" if vp else "-vT") if vt else ""
            runs = [chained(lambda q, c, cfg=cfg, vt=vt, vp=vp: contiguous_body(q, c, cfg, vt, v_pairs=vp), q, c_v)]
            runs += [chained(lambda q, p, t, c, cfg=cfg, vt=vt, vp=vp: paged_body(q, p, t, c, cfg, vt, vp),
                             q, p_v, table, c_v) for p_v, (_, table) in zip(p_vs, paged)]
            impls = [f"kvq-{name}-body{tag}"] + [f"kvq-{name}-paged{page_size}{o}{tag}" for o in orders]
            what = " v tokens-minor in pairs" if vp else " v tokens-minor" if vt else ""
            variants.append((f"{name:8s} {unpack:5s} qk_int8={qk!s:5s} {var}{what}"
                             + (f" (max|d| to token-major {err:.2e})" if err is not None else ""), same,
                             [(dict(impl=impl, bytes=nbytes, B=B, S=S, Hq=Hq, H=H, D=D, cfg=str(cfg), equal=same,
                                    vs_torch=None), run)
                              for impl, run in zip(impls, runs)]))
        timed = time_interleaved({(i, j): run for i, (_, _, group) in enumerate(variants)
                                  for j, (_, run) in enumerate(group)}, rounds)
        for i, (what, same, group) in enumerate(variants):
            ts = [timed[(i, j)] for j in range(len(group))]
            for (row, _), t_rounds in zip(group, ts):
                t = statistics.median(t_rounds)
                rows.append(dict(row, t=t, tbs=nbytes / t / 1e12, **({"rounds_t": t_rounds} if rounds > 1 else {})))
            t_c, *t_ps = (statistics.median(t) for t in ts)
            spread = (" (rounds: " + " / ".join(f"{min(t) * 1e6:.1f}-{max(t) * 1e6:.1f}" for t in ts) + " us)"
                      if rounds > 1 else "")
            paged_txt = ", ".join(f"paged{' in order' if o else ''} {t_p * 1e6:8.1f} us ({t_p / t_c:.3f}x)"
                                  for o, t_p in zip(orders, t_ps))
            print(f"paged B={B} S={S} {what} page={page_size}: contiguous {t_c * 1e6:8.1f} us, "
                  f"{paged_txt}{spread}, outputs equal: {same}", flush=True)
        del cache, paged, stored, variants
    return rows


# -- peers -------------------------------------------------------------------

def torch_sdpa(B, S, Hq, H, D):
    import torch

    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    f = torch.nn.functional.scaled_dot_product_attention
    t = time_torch(lambda: f(q, k, v, enable_gqa=True))
    del q, k, v
    torch.cuda.empty_cache()
    return t


def jax_cudnn(B, S, Hq, H, D, key):
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, 1, Hq, D), jnp.bfloat16)
    k = jax.random.normal(k2, (B, S, H, D), jnp.bfloat16)
    v = jax.random.normal(k3, (B, S, H, D), jnp.bfloat16)
    return time_jax(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v)


def xla_int8(B, S, Hq, H, D, key):
    """What MaxText does: dequantize int8 K/V (per-token scales) to bf16, then einsum attention."""
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, 1, Hq, D), jnp.bfloat16)
    kd = jax.random.randint(k2, (B, H, S, D), -127, 128, jnp.int8)
    vd = jax.random.randint(k3, (B, H, S, D), -127, 128, jnp.int8)
    ks = jnp.full((B, H, S, 1), 0.01, jnp.float32)
    vs = jnp.full((B, H, S, 1), 0.01, jnp.float32)
    G = Hq // H

    def f(q, kd, vd, ks, vs):
        k = kd.astype(jnp.bfloat16) * ks.astype(jnp.bfloat16)
        v = vd.astype(jnp.bfloat16) * vs.astype(jnp.bfloat16)
        qg = q.reshape(B, 1, H, G, D)
        s = jnp.einsum("bthgd,bhsd->bhgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
        p = jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16)
        return jnp.einsum("bhgts,bhsd->bthgd", p, v).reshape(B, 1, Hq, D)

    return time_jax(f, q, kd, vd, ks, vs)


# -- streaming floor -----------------------------------------------------------

def stream_floor(B, S, H, words, key, block_k=128, splits=8, num_warps=4, num_stages=3):
    """Seconds to stream K and V of ``words`` uint32 words per token through the same grid, no math.

    The practical floor of a kernel that reads the packed cache once.
    """
    from jax.experimental import pallas as pl
    from kvq_jax.kernels import _compat

    k1, k2 = jax.random.split(key)
    kw = jax.random.bits(k1, (B, H, S, words), jnp.uint32)
    vw = jax.random.bits(k2, (B, H, S, words), jnp.uint32)
    nblk = S // block_k // splits

    def kernel(k_ref, v_ref, o_ref):
        j = pl.program_id(2)

        def body(i, acc):
            start = pl.multiple_of((j * nblk + i) * block_k, block_k)
            return acc ^ k_ref[pl.ds(start, block_k), :] ^ v_ref[pl.ds(start, block_k), :]

        acc = jax.lax.fori_loop(0, nblk, body, jnp.zeros((block_k, words), jnp.uint32))
        o_ref[...] = acc

    f = pl.pallas_call(
        kernel, grid=(B, H, splits),
        in_specs=[pl.BlockSpec((None, None, S, words), lambda b, h, j: (b, h, 0, 0))] * 2,
        out_specs=pl.BlockSpec((None, None, None, block_k, words), lambda b, h, j: (b, h, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, splits, block_k, words), jnp.uint32),
        compiler_params=_compat.triton_params(num_warps, num_stages))
    return time_jax(lambda k, v: f(k, v).astype(jnp.float32), kw, vw)


# -- main --------------------------------------------------------------------

def bench_shape(B, S, Hq, H, D, presets, key, peers=True, sweep=False, unpacks=("auto",), v_dequant=(None,),
                qk_int8=(None,), vary=({},), rounds=1):
    """Peers and our kernel at one shape: per preset the base config and the variants asked for
    (``unpacks``, ``v_dequant``, ``qk_int8``, ``vary``; the launch sweep with ``sweep``), timed
    interleaved over ``rounds`` (`time_interleaved`)."""
    rows = []
    bf16_bytes = B * S * H * D * 2 * 2
    t_torch = None
    if peers:
        try:
            t_torch = torch_sdpa(B, S, Hq, H, D)
            rows.append(dict(impl="torch-sdpa-bf16", t=t_torch, bytes=bf16_bytes))
        except Exception as e:  # noqa: BLE001
            print(f"torch sdpa failed: {e}", flush=True)
        for name, fn in (("jax-cudnn-bf16", jax_cudnn), ("xla-int8-dequant", xla_int8)):
            try:
                t = fn(B, S, Hq, H, D, key)
                nbytes = bf16_bytes if "bf16" in name else B * S * H * (D + 4) * 2
                rows.append(dict(impl=name, t=t, bytes=nbytes))
            except Exception as e:  # noqa: BLE001
                print(f"{name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if peers and sweep and os.environ.get("KVQ_BENCH_FLOOR") and jax.default_backend() == "gpu":
        for words, label in ((D // 2, "bf16"), (D // 4, "int8"), (D // 8, "int4"), (D // 16, "int2")):
            try:
                t = stream_floor(B, S, H, words, key)
                rows.append(dict(impl=f"floor-stream-{label}", t=t, bytes=B * S * H * words * 4 * 2))
            except Exception as e:  # noqa: BLE001
                print(f"floor {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    for name in presets:
        spec = kvq.KVSpec.parse(name)
        cache = build_cache(spec, B, S, H, D, key)
        q = jax.random.normal(key, (B, 1, Hq, D), jnp.bfloat16)
        nbytes = cache_bytes_read(spec, B, S, H, D)
        base = decode.choose_config(cache, 16)
        configs = [None if (u, vd, qk, var) == ("auto", None, None, {}) else
                   dataclasses.replace(base, **{"unpack": base.unpack if u == "auto" else u, "v_dequant": vd,
                                                "qk_int8": qk, **var})
                   for u in unpacks for vd in v_dequant for qk in qk_int8 for var in vary
                   if not qk_int8_unsupported(qk, spec, D, base.unpack if u == "auto" else u)]
        if sweep and name != "bf16":
            configs += [dataclasses.replace(base, block_k=bk, num_splits=ns, num_warps=nw,
                                            unpack=base.unpack if u == "auto" else u)
                        for bk in ((32, 64, 128) if spec.channel_keys else (64, 128))
                        for ns in (base.num_splits // 2, base.num_splits)
                        for nw in (4, 8)
                        for u in unpacks
                        if (bk, ns, nw) != (base.block_k, base.num_splits, base.num_warps)]
        runs = {}  # timed together below (interleaved over `rounds`)
        for i, cfg in enumerate(configs):
            try:
                runs[i] = chained(lambda q, c, cfg=cfg: _attend_pallas(q, c, config=cfg), q, cache)
            except Exception as e:  # noqa: BLE001
                print(f"ours {name} {cfg} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
        for i, ts in time_interleaved(runs, rounds).items():
            cfg = configs[i]
            rows.append(dict(impl=f"kvq-{name}", cfg=str(cfg) if cfg else "auto", t=statistics.median(ts), bytes=nbytes,
                             **({"rounds_t": ts} if rounds > 1 else {})))
        del cache, runs
    for r in rows:
        r.update(B=B, S=S, Hq=Hq, H=H, D=D, tbs=r["bytes"] / r["t"] / 1e12,
                 vs_torch=(r["t"] / t_torch) if t_torch else None)
        print(f"B={B:3d} S={S:6d} {r['impl']:18s} {r.get('cfg', ''):60s} {r['t'] * 1e6:9.1f} us "
              f"{r['tbs']:5.2f} TB/s  x{(r['vs_torch'] or 0):.3f} of torch", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs at B=8 S=32K")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-presets", default=None, help="comma-separated; default all")
    ap.add_argument("--shapes", default="8x1024,8x4096,8x32768,8x131072,1x32768,64x32768")
    ap.add_argument("--presets", default="bf16,fp8,int8,int4,int2", help="timed at every shape")
    ap.add_argument("--main-presets", default="k8v4,int4-kivi,int2-kivi", help="also timed at B=8 S=32K")
    ap.add_argument("--unpack", default="auto",
                    help="comma-separated Config.unpack variants timed per preset (auto = choose_config's)")
    ap.add_argument("--v-dequant", default="auto",
                    help="comma-separated Config.v_dequant values timed per preset: auto (None), 0, 1")
    ap.add_argument("--qk-int8", default="auto",
                    help="comma-separated Config.qk_int8 values checked and timed per preset: auto (None), 0, 1")
    ap.add_argument("--vary", default="",
                    help="Config overrides checked and timed beside the base config: 'field=value,...;field=value' "
                         "(e.g. 'block_k=128;num_stages=4;v_fp16=1')")
    ap.add_argument("--paged", type=int, default=0,
                    help="also time the kernel through a page table of this page size (at --paged-shape)")
    ap.add_argument("--paged-shape", default="8x32768")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time each preset's kernel variants (at every shape, and with --paged) interleaved over "
                         "this many rounds (median per variant, every round kept): for differences below the "
                         "run-to-run drift")
    ap.add_argument("--paged-values", default="paged", choices=tuple(PAGED_VALUES),
                    help="with --paged: the value layouts timed (same data): paged (as kvq.serve.PagedKVCache "
                         "stores them: [Dp, tokens] per page, sub-byte values' tokens in pairs), tokens-minor "
                         "(without pairs), token-major (as the contiguous KVCache), both (token-major and paged) "
                         "or all")
    ap.add_argument("--paged-in-order", action="store_true",
                    help="with --paged: also time the pages laid out in sequence order (each sequence's pages in "
                         "a row) beside the shuffled pool")
    ap.add_argument("--gpus", type=int, default=0,
                    help="also time kvq.sharding.shard_attend over 1, 2, 4, ... up to this many devices")
    ap.add_argument("--sharded-shape", default="8x32768")
    ap.add_argument("--heads", default="32,8",
                    help="query heads and KV heads of the timed shapes and --paged (e.g. 16,4: one device's share "
                         "of the 8B shape on 2 GPUs, tensor parallel); --gpus keeps 32,8 and shards them")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args(argv)
    hq, hkv = (int(x) for x in a.heads.split(","))
    if hq % hkv:
        raise SystemExit(f"--heads: query heads {hq} must be a multiple of KV heads {hkv}")
    os.makedirs(a.out, exist_ok=True)
    print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
    result = {"jax": jax.__version__, "device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d")}
    flags = lambda arg: [None if x == "auto" else bool(int(x)) for x in arg.split(",")]  # noqa: E731
    qk = flags(a.qk_int8)
    vary = parse_vary(a.vary)
    if not a.no_check:
        result["check"] = check(a.quick, a.check_presets.split(",") if a.check_presets else None,
                                unpacks=a.unpack.split(","), qk_int8=qk, vary=vary)
        if not all(r["ok"] for r in result["check"]):
            print("CHECK FAILED", flush=True)
    key = jax.random.key(0)
    rows = []

    def save(rows):  # after every part: a later failure keeps what was measured
        with open(os.path.join(a.out, "decode.json"), "w") as f:
            json.dump(dict(result, rows=rows), f, indent=1)

    for shp in filter(None, a.shapes.split(",")):
        B, S = (int(x) for x in shp.split("x"))
        main = (B, S) == (8, 32768)
        presets = a.presets.split(",") + (a.main_presets.split(",") if main and a.main_presets else [])
        rows += bench_shape(B, S, hq, hkv, 128, presets, key, sweep=a.sweep and main,
                            unpacks=a.unpack.split(","), v_dequant=flags(a.v_dequant), qk_int8=qk, vary=vary,
                            rounds=a.rounds)
        save(rows)
    if a.paged:
        B, S = (int(x) for x in a.paged_shape.split("x"))
        rows += bench_paged(B, S, hq, hkv, 128, list(filter(None, (a.presets + "," + a.main_presets).split(","))), key, a.paged,
                            unpacks=a.unpack.split(","), qk_int8=qk, vary=vary,
                            v_layouts=PAGED_VALUES[a.paged_values], rounds=a.rounds, in_order=a.paged_in_order)
        save(rows)
    if a.gpus:
        B, S = (int(x) for x in a.sharded_shape.split("x"))
        rows += bench_sharded(B, S, 32, 8, 128, a.presets.split(","), key, a.gpus)
        save(rows)
    result["rows"] = rows
    print("\nsummary (best config per impl and shape):")
    best = {}
    for r in rows:
        k = (r["B"], r["S"], r["impl"])
        if k not in best or r["t"] < best[k]["t"]:
            best[k] = r
    for (B, S, impl), r in sorted(best.items()):
        print(f"B={B:3d} S={S:6d} {impl:18s} {r['t'] * 1e6:9.1f} us {r['tbs']:5.2f} TB/s "
              f"x{(r['vs_torch'] or 0):.3f} {r.get('cfg', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
