"""Prefill a 128K-token prompt in chunks into each preset's paged cache, then decode.

A Llama-3-8B-shaped model (32 layers, 32 query heads, 8 KV heads, head_dim 128,
d 4096, ffn 14336) with random bf16 weights, on one GPU:

    python examples/long_context_128k.py                          # --small on CPU by default
    python examples/long_context_128k.py --full --presets bf16,int8,int4

Prints, per preset: KV cache bytes held by the session, peak device memory, prefill
and decode tokens/s (after a short warm-up request that compiles the steps). Random
weights make the tokens meaningless; memory and speed are those of the real shape.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvq_jax as kvq
from kvq_jax.models import LlamaConfig, LlamaModel

LLAMA3_8B = dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                 ffn_dim=14336, rope_theta=500000.0)
SMALL = dict(vocab_size=1024, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=512,
             rope_theta=500000.0)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the Llama-3-8B shape (default on GPU)")
    ap.add_argument("--small", action="store_true", help="a small shape (default on CPU)")
    ap.add_argument("--presets", default="bf16,int8,int4")
    ap.add_argument("--context", type=int, default=None, help="prompt tokens (default 131072, small: 2048)")
    ap.add_argument("--new", type=int, default=16, help="tokens to decode")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 1024, small: 512)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page (the Engine's default)")
    for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "ffn_dim"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    a = ap.parse_args(argv)
    small = a.small or (not a.full and jax.default_backend() != "gpu")
    shape = dict(SMALL if small else LLAMA3_8B)
    for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "ffn_dim"):
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    context = a.context or (2048 if small else 131072)
    chunk = a.chunk or (512 if small else 1024)
    config = LlamaConfig(**shape, rope_style="half", tie_embeddings=False, eos_token_ids=())
    model = LlamaModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, context).astype(np.int32)
    print(f"model: {shape}, prompt {context} tokens, chunks of {chunk}, {a.new} new tokens, "
          f"backend {jax.default_backend()}")
    print(f"{'preset':<10} {'KV bytes':>14} {'peak device':>14} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for preset in a.presets.split(","):
        eng = kvq.serve.Engine(model, kv=preset, max_batch=1, page_size=a.page_size,
                               max_len=context + a.new, prefill_chunk=chunk)
        kv_bytes = eng.kv_bytes
        eng.submit(prompt[:2 * chunk], 2)  # compiles the first-chunk, later-chunk and decode steps
        eng.run()
        rid = eng.submit(prompt, a.new)
        t0 = time.perf_counter()
        steps0 = eng.stats["decode_steps"]
        while eng.stats["decode_steps"] == steps0 and eng.num_active + eng.num_queued:
            eng.step()  # prefill chunks, then the first decode step
        t1 = time.perf_counter()
        steps0 = eng.stats["decode_steps"]
        out = eng.run()
        t2 = time.perf_counter()
        steps = eng.stats["decode_steps"] - steps0
        assert len(out[rid]) == a.new
        peak = peak_bytes()
        print(f"{preset:<10} {kv_bytes:>14,} {('-' if peak is None else f'{peak:,}'):>14} "
              f"{context / (t1 - t0):>14.1f} {(steps / (t2 - t1) if steps else float('nan')):>13.2f}")
        del eng


if __name__ == "__main__":
    main()
