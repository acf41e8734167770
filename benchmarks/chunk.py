"""One prefill chunk over a long quantized past: the kernel path against the blocked XLA path.

A chunk of ``--chunk`` new tokens (Hq 32, Hkv 8, D 128: the Llama-3-8B attention shape)
attends to a cache already holding ``--past`` tokens and causally to itself
(`kvq.attention.attend_chunk`), for each preset:

* check: ``impl="pallas"`` (rows in tiles, the fused-dequant kernel) against
  ``impl="xla"`` (dequantize blocks of 2048 tokens, f32) on the same cache: relative
  L2 error of the output;
* time: per call (one layer), for the kernel with each ``--row-tiles`` and for XLA;
  chained calls, one sync per batch (`_common.time_steps`).

    python benchmarks/chunk.py --out chunk.json    # on the GPU
    python benchmarks/chunk.py --small             # CPU smoke run (interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

import kvq_jax as kvq
from _common import time_steps  # noqa: E402  (benchmarks/_common.py)
from kvq_jax.kernels import decode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="bf16,int8,int4,int4-kivi")
    ap.add_argument("--past", type=int, default=65536, help="tokens already in the cache")
    ap.add_argument("--chunk", type=int, default=1024, help="new tokens in the chunk")
    ap.add_argument("--row-tiles", default="32,64", help="query rows per kernel program")
    ap.add_argument("--qk-int8", default="auto",
                    help="comma-separated Config.qk_int8 values timed per row tile: auto (the default), 0, 1")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes, interpret mode (CPU smoke run)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    B, Hq, H, D = (1, 4, 2, 64) if a.small else (1, 32, 8, 128)
    past, T = (300, 64) if a.small else (a.past, a.chunk)
    steps = 1 if a.small else a.steps
    interpret = jax.default_backend() != "gpu"
    rng = np.random.default_rng(0)
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
               B=B, Hq=Hq, Hkv=H, D=D, past=past, chunk=T, presets={})
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
    print(f"{res['device']}, jax {jax.__version__}: chunk {T} over a past of {past}, B {B} Hq {Hq} Hkv {H} D {D}")
    print(f"{'preset':<10} {'impl':<16} {'ms/call':>9} {'rel. L2 vs xla':>15}")
    for preset in a.presets.split(","):
        cache = kvq.init_cache(preset, B, past + T, H, D)
        kp = jnp.asarray(rng.standard_normal((B, past, H, D)), jnp.bfloat16)
        vp = jnp.asarray(rng.standard_normal((B, past, H, D)), jnp.bfloat16)
        cache = jax.jit(kvq.append)(cache, kp, vp)
        del kp, vp
        runs = {"xla": dict(impl="xla")}
        for rt in map(int, a.row_tiles.split(",")):  # the default launch config at each row tile
            tile, tiles = decode._row_tiles(T * (Hq // H), rt)
            cfg = decode._choose(cache.spec, B * H * tiles, cache.body_capacity, row_tile=tile)
            for qk in a.qk_int8.split(","):
                if qk != "auto" and int(qk) and not decode.qk_int8_supported(
                        cache.spec, decode.make_layout(cache.spec.k, D, cfg.unpack)):
                    continue
                label = f"pallas rt{rt}" + ("" if qk == "auto" else f" qk_int8={qk}")
                runs[label] = dict(impl="pallas", interpret=interpret, config=dataclasses.replace(
                    cfg, row_tile=rt, qk_int8=None if qk == "auto" else bool(int(qk))))
        r = res["presets"].setdefault(preset, {})
        want = None
        for name, kw in runs.items():
            f = jax.jit(lambda q, k, v, c, kw=kw: kvq.attention.attend_chunk(q, k, v, c, **kw))
            out = np.asarray(f(q, k, v, cache), np.float32)
            if want is None:
                want, err = out, 0.0
            else:
                err = float(np.linalg.norm(out - want) / np.linalg.norm(want))
            qi = q

            def advance(i, f=f):
                nonlocal qi
                o = f(qi, k, v, cache)
                qi = o.astype(q.dtype)  # chained: each call reads the previous output
                return o

            sec, _ = time_steps(advance, steps)
            r[name] = dict(ms=sec * 1e3, rel_l2_vs_xla=err)
            print(f"{preset:<10} {name:<16} {sec * 1e3:>9.3f} {err:>15.2e}", flush=True)
        del cache
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
