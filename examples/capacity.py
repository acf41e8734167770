"""How many sessions of a given context fit, per cache preset: computed, then measured.

    python examples/capacity.py                                   # SmolLM2-135M shape, 8K context
    python examples/capacity.py --layers 32 --kv-heads 8 --head-dim 128 --context 32768

Computed: ``budget // session_bytes`` where a session is ``context`` tokens of quantized
body (`kvq.bytes_per_token`) plus the bf16 residual window and sinks.
Measured: allocate one-sequence caches (`kvq.init_caches`, every layer) on the current
device until an allocation fails or the budget is spent. On a GPU the budget defaults
to the device's free memory; on CPU it is capped (``--budget``, default 256MB) so the
run stays small. Measured sessions can be fewer than computed: ``init_cache`` rounds
the body up to a multiple of 256 tokens, and the allocator has its own overheads.
"""

from __future__ import annotations

import argparse
import sys

import jax

import kvq_jax as kvq
from kvq_jax.capacity import parse_bytes, plan

PRESETS = ("bf16", "fp8", "int8", "k8v4", "int4", "int4-kivi", "int2-kivi")


def default_budget() -> int:
    """Free bytes of the first device on a GPU; 256 MB elsewhere."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return 256 * 10**6


def measure(spec: str, budget: int, context: int, layers: int, kv_heads: int, head_dim: int,
            max_sessions: int = 100_000) -> tuple[int, int]:
    """Allocate one-sequence caches until failure or ``budget`` bytes; return (sessions, bytes per session)."""
    held, used, per = [], 0, 0
    policy = kvq.resolve_policy(spec, layers)
    try:
        while len(held) < max_sessions:
            caches = kvq.init_caches(policy, 1, context, kv_heads, head_dim)
            per = sum(c.nbytes for c in caches)
            if used + per > budget:
                break
            jax.block_until_ready(caches)
            held.append(caches)
            used += per
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
    n = len(held)
    del held
    return n, per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", default=None, help="bytes to fill, e.g. 256MB, 40GiB (default: see above)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args(argv)

    budget = parse_bytes(args.budget) if args.budget else default_budget()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    shape = dict(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim)
    computed = plan(presets, context=args.context, memory=budget, **shape)
    print(f"{jax.devices()[0].platform.upper()}: budget {budget / 1e9:.3f} GB; {args.layers} layers x "
          f"{args.kv_heads} KV heads x {args.head_dim}; context {args.context:,} tokens")
    print(f"{'preset':<10} {'B/token':>9} {'MB/session':>11} {'computed':>9} {'alloc MB/session':>17} {'measured':>9}")
    for p in presets:
        c = computed[p]
        n, per = measure(p, budget, args.context, args.layers, args.kv_heads, args.head_dim)
        print(f"{p:<10} {c['bytes_per_token']:>9,} {c['session_bytes'] / 1e6:>11.2f} {c['sessions']:>9,} "
              f"{per / 1e6:>17.2f} {n:>9,}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
