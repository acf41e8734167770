"""kvq_jax: quantized KV caches (int8, int4, int2, fp8) and fused-dequant attention for JAX.

    import kvq_jax as kvq
    cache = kvq.init_cache("int8", batch=4, max_len=4096, num_kv_heads=8, head_dim=128)
    cache = kvq.append(cache, k, v)          # k, v: [B, T, Hkv, D]
    out = kvq.attend(q, cache)               # q: [B, T, Hq, D]
"""

from kvq_jax.attention import attend, merge
from kvq_jax.cache import KVCache, append, init_cache, reset, segment_lengths
from kvq_jax.quant import (
    Quantized,
    dequantize,
    hadamard,
    pack_int2,
    pack_int4,
    quantize,
    unpack_int2,
    unpack_int4,
)
from kvq_jax.spec import PRESETS, KVSpec, TensorSpec, bytes_per_token

__version__ = "0.1.0"

__all__ = [
    "KVCache", "KVSpec", "PRESETS", "Quantized", "TensorSpec", "append", "attend",
    "bytes_per_token", "dequantize", "hadamard", "init_cache", "merge", "pack_int2",
    "pack_int4", "quantize", "reset", "segment_lengths", "unpack_int2", "unpack_int4",
]
