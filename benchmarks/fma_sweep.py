"""FMA decode kernel (`decode_fma.body_attention_fma`): correctness check and launch-config sweep.

    python benchmarks/fma_sweep.py [--presets bf16,int8,...] [--out FILE.json]
    python benchmarks/fma_sweep.py --small        # CPU smoke test: tiny shapes, interpret mode

1. Checks the FMA kernel against ``reference.body_attention`` on the same quantized
   data (B=2, Hkv=8, G=4, D=128, T=1, lengths 3000 and 1): max |error|, relative L2
   error, PASS when finite and relative error < 1e-5.
2. Times the body kernel at B=8, Hq=32, Hkv=8, D=128, T=1, S=32768 (all full):
   `decode.body_attention` (default config) and the FMA kernel over block_k in
   {16, 32, 64, 128}, num_warps in {1, 2, 4}, num_splits in {choose_fma_config's, 2x},
   num_stages 3. Timing as benchmarks/decode.py: warm-up, N launches chained inside
   one jit, one sync, median of several batches. Effective TB/s = bytes of the
   quantized body read (scales included) / time. A config that fails to compile is
   reported (first line of the error) and skipped.
3. Prints a table and writes JSON to ``--out`` (after every preset).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvq_jax as kvq
from kvq_jax import reference
from kvq_jax.cache import segment_lengths
from kvq_jax.kernels import decode, decode_fma


def _bench_decode():
    """benchmarks/decode.py as a module (its timing and cache-building helpers)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode.py")
    spec = importlib.util.spec_from_file_location("kvq_bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _bench_decode()
CHECK_PRESETS = "bf16,fp8,int8,int4,int2,int4-kivi"
TIME_PRESETS = "bf16,int8,int4,int2,fp8,int4-kivi"
REL_TOL = 1e-5


def _inputs(cache, G, key):
    """Queries ``qg: f32[B, 1, Hkv, G, D]`` (rotated when the spec rotates), positions, softmax scale."""
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    qg = jax.random.normal(key, (B, 1, H, G, D), jnp.float32)
    if cache.spec.rotate:
        qg = kvq.quant.rotate(qg)
    return qg, cache.lengths[:, None] - 1, 1.0 / math.sqrt(D)


def body_bytes(cache) -> int:
    """Bytes of the quantized body (data, scales, zero points) a decode step reads."""
    _, q_len, _ = segment_lengths(cache.spec, cache.lengths)
    return kvq.bytes_per_token(cache.spec, 1, cache.num_kv_heads, cache.head_dim) * int(jnp.sum(q_len))


def check(presets, B, H, G, D, lengths, capacity, interpret):
    """FMA kernel vs the f32 reference on the same quantized data; rows of results."""
    rows = []
    key = jax.random.key(1)
    for name in presets:
        spec = kvq.KVSpec.parse(name)
        key, kc, kq = jax.random.split(key, 3)
        cache = bench.build_cache(spec, B, capacity, H, D, kc, lengths)
        qg, qpos, scale = _inputs(cache, G, kq)
        o_ref, _ = jax.jit(lambda q, c: reference.body_attention(q, c, qpos, scale))(qg, cache)
        try:
            o, _ = jax.jit(lambda q, c: decode_fma.body_attention_fma(
                q, c, qpos, scale, interpret=interpret))(qg, cache)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"check {name:10s} FAIL {msg}", flush=True)
            rows.append(dict(preset=name, ok=False, error=msg))
            continue
        err = float(jnp.max(jnp.abs(o - o_ref)))
        rel = float(jnp.linalg.norm(o - o_ref) / jnp.linalg.norm(o_ref))
        ok = bool(jnp.all(jnp.isfinite(o))) and rel < REL_TOL
        rows.append(dict(preset=name, B=B, H=H, G=G, D=D, T=1, lengths=list(map(int, lengths)),
                         max_abs=err, rel=rel, ok=ok))
        print(f"check {name:10s} B={B} Hkv={H} G={G} D={D} T=1 lengths={list(map(int, lengths))} "
              f"max|d|={err:.2e} rel={rel:.2e} {'PASS' if ok else 'FAIL'}", flush=True)
    return rows


def configs(spec, programs, S, rows, block_ks, warps, small):
    """FMA launch configs to time: block_k x num_warps x (choose's splits, 2x), num_stages 3."""
    base = decode_fma.choose_fma_config(spec, programs, S, rows)
    if small:
        return [base, decode_fma.FmaConfig(16, 2 * base.num_splits, num_warps=2)]
    out = []
    for bk in block_ks:
        for nw in warps:
            for ns in (base.num_splits, 2 * base.num_splits):
                out.append(decode_fma.FmaConfig(bk, ns, num_warps=nw, num_stages=3))
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def sweep(presets, B, Hq, H, D, S, interpret, small, block_ks, warps, n, reps, out_path, result):
    """Times decode.body_attention (default config) and the FMA configs per preset."""
    rows = result.setdefault("rows", [])
    key = jax.random.key(0)
    G = Hq // H
    for name in presets:
        spec = kvq.KVSpec.parse(name)
        key, kc, kq = jax.random.split(key, 3)
        cache = bench.build_cache(spec, B, S, H, D, kc)
        qg, qpos, scale = _inputs(cache, G, kq)
        nbytes = body_bytes(cache)
        timed = [("mma", "decode default", lambda q, c: decode.body_attention(
            q, c, qpos, scale, interpret=interpret)[0])]
        for cfg in configs(spec, B * H, S, G, block_ks, warps, small):
            label = f"bk={cfg.block_k} w={cfg.num_warps} s={cfg.num_splits} st={cfg.num_stages}"
            if spec.channel_keys and spec.token_group % cfg.block_k:
                print(f"{name:10s} fma {label:28s} skipped (block_k must divide token_group "
                      f"{spec.token_group})", flush=True)
                continue
            timed.append(("fma", label, lambda q, c, cfg=cfg: decode_fma.body_attention_fma(
                q, c, qpos, scale, interpret=interpret, config=cfg)[0]))
        for impl, label, fn in timed:
            try:
                t = bench.time_jax(fn, qg, cache, n=n, reps=reps)
            except Exception as e:  # noqa: BLE001
                print(f"{name:10s} {impl:4s} {label:28s} FAILED {_first_line(e)}", flush=True)
                rows.append(dict(preset=name, impl=impl, cfg=label, error=_first_line(e)))
                continue
            row = dict(preset=name, impl=impl, cfg=label, t=t, bytes=nbytes, tbs=nbytes / t / 1e12,
                       B=B, S=S, Hq=Hq, H=H, D=D, T=1)
            rows.append(row)
            print(f"{name:10s} {impl:4s} {label:28s} {t * 1e6:10.1f} us {row['tbs']:6.3f} TB/s", flush=True)
        del cache
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    return rows


def summary(rows):
    print("\nsummary: default MMA kernel vs best FMA config per preset")
    print(f"{'preset':10s} {'mma us':>9s} {'TB/s':>6s} {'fma us':>9s} {'TB/s':>6s} {'speedup':>8s}  best fma config")
    for name in dict.fromkeys(r["preset"] for r in rows):
        ok = [r for r in rows if r["preset"] == name and "t" in r]
        mma = next((r for r in ok if r["impl"] == "mma"), None)
        fma = min((r for r in ok if r["impl"] == "fma"), key=lambda r: r["t"], default=None)
        f = lambda r: (f"{r['t'] * 1e6:9.1f} {r['tbs']:6.3f}" if r else f"{'-':>9s} {'-':>6s}")  # noqa: E731
        sp = f"{mma['t'] / fma['t']:8.2f}" if (mma and fma) else f"{'-':>8s}"
        print(f"{name:10s} {f(mma)} {f(fma)} {sp}  {fma['cfg'] if fma else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, interpret mode, 2 configs (CPU smoke test)")
    ap.add_argument("--check-presets", default=CHECK_PRESETS)
    ap.add_argument("--presets", default=TIME_PRESETS, help="timed presets (comma-separated)")
    ap.add_argument("--block-k", default="16,32,64,128")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fma_sweep.json"),
                    help="JSON output file")
    a = ap.parse_args(argv)
    interpret = a.small or jax.default_backend() != "gpu"
    if interpret and not a.small:
        print("no GPU: running in interpret mode; use --small for a quick smoke test", flush=True)
    if os.path.dirname(a.out):
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
    print(f"jax {jax.__version__} devices {jax.devices()} interpret={interpret}", flush=True)
    result = {"jax": jax.__version__, "device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d"),
              "small": a.small, "interpret": interpret}
    if a.small:  # check shape, timed shape, timing repetitions
        chk = dict(B=2, H=2, G=4, D=64, lengths=np.array([300, 1]), capacity=512)
        shp = dict(B=2, Hq=8, H=2, D=64, S=512)
        n, reps = 2, 2
    else:
        chk = dict(B=2, H=8, G=4, D=128, lengths=np.array([3000, 1]), capacity=3072)
        shp = dict(B=8, Hq=32, H=8, D=128, S=32768)
        n, reps = 20, 5
    if not a.no_check:
        result["check"] = check(a.check_presets.split(","), interpret=interpret, **chk)
        print("CHECK " + ("PASS" if all(r["ok"] for r in result["check"]) else "FAILED"), flush=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    if not a.no_time:
        rows = sweep(a.presets.split(","), interpret=interpret, small=a.small,
                     block_ks=[int(x) for x in a.block_k.split(",")], warps=[int(x) for x in a.warps.split(",")],
                     n=n, reps=reps, out_path=a.out, result=result, **shp)
        summary(rows)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    return 0 if all(r["ok"] for r in result.get("check", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
