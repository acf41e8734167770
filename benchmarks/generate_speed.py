"""Decode tokens/s of `kvq.generate` (contiguous caches, a `lax.while_loop` decode) at the
Llama-3-8B shape with random bf16 weights, per preset, and a digest of the greedy tokens (the
same weights and prompts give the same digest wherever the same bytes are stored and read).

    python benchmarks/generate_speed.py --presets bf16,int8,int4 --batch 8 --prompt 4096 --new 64

Decode tokens/s = batch * new / (time of a warm call with ``--new + 1`` new tokens - time of one
with 1; medians of ``--reps`` calls): the prefill and the first token cancel. First token = the
warm call with 1 new token (prefill and one token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SHAPES, profile_steps, random_model  # noqa: E402  (benchmarks/_common.py)

import kvq_jax as kvq  # noqa: E402
from kvq_jax.models import LlamaConfig  # noqa: E402


def warm_call(fn, reps: int):
    """Median seconds of ``reps`` calls of ``fn()`` after a first (compiling) one, a result, and the
    first call's seconds (compile and run)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn().tokens)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="bf16,int8,int4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--scan", default="0", help="comma list of scan_layers values to time (0, 1)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--model", default="8b", choices=tuple(SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile one call of --new + 1 tokens per run under DIR/PRESET-scanS and print the "
                         "device ms per generated token of its kernels by kind (prefill included, over --new)")
    a = ap.parse_args(argv)
    config = LlamaConfig(**SHAPES[a.model], rope_style="half", tie_embeddings=False, eos_token_ids=())
    model = random_model(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (a.batch, a.prompt)).astype(np.int32)
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, batch=a.batch, prompt=a.prompt,
               new=a.new, model=a.model, runs={})
    print(f"{res['device']}, jax {jax.__version__}, {a.model}: {a.batch} x {a.prompt}-token prompts, {a.new} new tokens")
    print(f"{'preset':<10} {'scan':>4} {'decode tok/s':>13} {'ms/step':>8} {'first token s':>13} {'compile s':>10} "
          f"{'digest':>18}")
    for preset in a.presets.split(","):
        for scan in (bool(int(s)) for s in a.scan.split(",")):
            def run(n, preset=preset, scan=scan):
                return kvq.generate(model, tokens, n, kv=preset, max_len=a.prompt + a.new + 1, scan_layers=scan)

            t1, _, _ = warm_call(lambda: run(1), a.reps)
            tn, out, first = warm_call(lambda: run(a.new + 1), a.reps)
            step = (tn - t1) / a.new
            compile_s = first - tn  # the first call of the timed length, less a warm one
            digest = hashlib.sha256(np.asarray(out.tokens).tobytes()).hexdigest()[:16]
            res["runs"][f"{preset}/scan{int(scan)}"] = dict(tokens_per_s=a.batch / step, step_ms=step * 1e3,
                                                            first_token_s=t1, compile_s=compile_s, digest=digest)
            print(f"{preset:<10} {int(scan):>4} {a.batch / step:13.1f} {step * 1e3:8.2f} {t1:13.3f} {compile_s:10.1f} "
                  f"{digest:>18}", flush=True)
            if a.profile:
                prof = profile_steps(lambda i, run=run: run(a.new + 1).tokens, 1,
                                     os.path.join(a.profile, f"{preset}-scan{int(scan)}"))
                for proc, d in prof["devices"].items():
                    res["runs"][f"{preset}/scan{int(scan)}"].setdefault("profile", {})[proc] = d
                    print(f"  {proc}: busy {d['busy_ms'] / a.new:.3f} ms per token step; by kind (ms per step, "
                          f"calls per call):", flush=True)
                    for kind, (ms, n) in list(d["by_kind"].items())[:14]:
                        print(f"    {ms / a.new:8.4f}  {n:6d}  {kind}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
