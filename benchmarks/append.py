"""Appends to a paged cache through the write kernel (``impl="pallas"``) and through one XLA
scatter per pool (``impl="xla"``): the bytes stored (must be identical) and the time of a
decode step's append of every layer (one token per sequence, layers' pools stacked and donated,
as `kvq_jax.serve.Engine` holds them).

    python benchmarks/append.py --presets bf16,int8,int4,fp8,k8v4,int4-kivi --out results.json

Prints one row per preset: identical or not (also in pools of just over 2**31 bytes, where
32-bit pointer offsets would wrap), the decode kernel's error against XLA's attention over the
result, and microseconds per step for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_steps  # noqa: E402  (benchmarks/_common.py)

import kvq_jax as kvq  # noqa: E402
from kvq_jax.serve import paged  # noqa: E402

BODY = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


def _bytes(x):
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def check(spec, batch, heads, dim, page, pages_per_seq, key, num_pages=None):
    """A ragged prefill chunk then three decode steps into scrambled pages (the last
    ``batch * pages_per_seq + 3`` of ``num_pages``), both impls. Returns (every pool leaf, window
    and length byte-identical, max |difference| of the kernel's attention from XLA's over the
    result)."""
    rng = np.random.default_rng(0)
    n_used = batch * pages_per_seq
    num_pages = num_pages or n_used + 3
    table = (num_pages - 1 - rng.permutation(n_used + 3)[:n_used]).reshape(batch, pages_per_seq).astype(np.int32)
    caches = {impl: paged.init_paged_cache(spec, batch, num_pages, page, pages_per_seq, heads, dim, page_table=table)
              for impl in ("xla", "pallas")}
    lens = jnp.asarray(rng.integers(0, 300, batch), jnp.int32)
    for i, T in enumerate((300, 1, 1, 1)):
        k, v = (jax.random.normal(jax.random.fold_in(key, 2 * i + j), (batch, T, heads, dim), jnp.float32) for j in (0, 1))
        for impl in caches:
            caches[impl] = paged.append_paged(caches[impl], k, v, lens if T > 1 else None, impl=impl)
    a, b = caches.pop("pallas"), caches.pop("xla")
    differ = {n: int(np.sum(_bytes(getattr(a, n)) != _bytes(getattr(b, n))))
              for n in BODY + ("res_k", "res_v", "sink_k", "sink_v", "lengths") if getattr(a, n) is not None}
    differ = {n: c for n, c in differ.items() if c}
    if differ:
        print(f"  {spec}: elements that differ between the kernel and the scatters: {differ}", flush=True)
    same = not differ
    del b
    q = jax.random.normal(jax.random.fold_in(key, 99), (batch, 1, 4 * heads, dim), jnp.float32)
    o = paged.attend_paged(q, a, impl="pallas", precise=True)
    ref = paged.attend_paged(q, a, impl="xla")
    return same, float(jnp.max(jnp.abs(o - ref)))


def step_time(spec, impl, layers, batch, heads, dim, page, context, steps):
    """Seconds of one decode step's appends: ``layers`` appends of one token per sequence into one
    stacked, donated pool per leaf (layer l's pages offset by l * pages), as the engine does."""
    per_seq = -(-(context + 64) // page)
    P = batch * per_seq
    one = paged.init_paged_cache(spec, batch, P, page, per_seq, heads, dim,
                                 page_table=np.arange(P, dtype=np.int32).reshape(batch, per_seq))
    pools = {n: jnp.concatenate([getattr(one, n)] * layers) for n in BODY if getattr(one, n) is not None}
    n0 = jnp.full((batch,), context, jnp.int32)

    @partial(jax.jit, donate_argnums=0)
    def step(pools, n, key):
        k = jax.random.normal(key, (batch, 1, heads, dim), jnp.bfloat16)
        for layer in range(layers):  # unrolled, layer l's pages at rows l * P + page
            c = dataclasses.replace(one, **pools, lengths=n,
                                    page_table=jnp.where(one.page_table >= 0, one.page_table + layer * P, -1))
            c = paged.append_paged(c, k * (layer + 1), k - layer, impl=impl)
            pools = {name: getattr(c, name) for name in pools}
        return pools

    key = jax.random.key(0)

    def advance(i):
        nonlocal pools
        pools = step(pools, n0, jax.random.fold_in(key, i))
        return pools["k"]

    sec, _ = time_steps(advance, steps)
    return sec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="bf16,int8,int4")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096, help="tokens each sequence holds before the step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layers=a.layers, batch=a.batch,
               context=a.context, heads=8, head_dim=128, page=64, presets={})
    print(f"{res['device']}, jax {jax.__version__}: {a.layers} layers x {a.batch} sequences x 8 KV heads x D 128, "
          f"pages of 64")
    print(f"{'preset':<12} {'identical':>9} {'attend err':>10} {'> 2 GiB pools':>14} {'attend err':>10} "
          f"{'xla us':>8} {'pallas us':>10}")
    for name in a.presets.split(","):
        spec = kvq.KVSpec.parse(name)
        same, err = check(spec, 4, 8, 128, 64, 8, jax.random.key(1))
        # pools of just over 2**31 bytes (the largest leaf), the sequences' pages at their end
        page_bytes = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
            lambda: paged.init_paged_cache(spec, 1, 1, 64, 1, 8, 128, page_table=np.zeros((1, 1), np.int32)))))
        big_same, big_err = check(spec, 4, 8, 128, 64, 8, jax.random.key(2), num_pages=2**31 // page_bytes + 64)
        t = {impl: step_time(spec, impl, a.layers, a.batch, 8, 128, 64, a.context, a.steps) for impl in ("xla", "pallas")}
        res["presets"][name] = dict(identical=bool(same), attend_err=err, big_identical=bool(big_same),
                                    big_attend_err=big_err, xla_us=t["xla"] * 1e6, pallas_us=t["pallas"] * 1e6)
        print(f"{name:<12} {str(same):>9} {err:10.2e} {str(big_same):>14} {big_err:10.2e} {t['xla'] * 1e6:8.1f} "
              f"{t['pallas'] * 1e6:10.1f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
