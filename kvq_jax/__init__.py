"""kvq_jax: quantized KV caches (int8, int4, int2, fp8) and fused-dequant attention for JAX.

    import kvq_jax as kvq
    cache = kvq.init_cache("int8", batch=4, max_len=4096, num_kv_heads=8, head_dim=128)
    cache = kvq.append(cache, k, v)          # k, v: [B, T, Hkv, D]
    out = kvq.attend(q, cache)               # q: [B, T, Hq, D]

    model, tok = kvq.models.load("smollm2-135m")
    out = kvq.generate(model, tokens, max_new_tokens=64, kv="int4-kivi")
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
from kvq_jax.spec import PRESETS, KVSpec, StaticScales, TensorSpec, bytes_per_token

from kvq_jax import nn  # noqa: E402  (QuantizedAttention, policies)
from kvq_jax.capacity import plan as plan_capacity, session_bytes  # noqa: E402
from kvq_jax.generate import GenerateOutput, Sampler, generate, teacher_force  # noqa: E402
from kvq_jax.nn import QuantizedAttention, init_caches, resolve_policy  # noqa: E402
from kvq_jax import models  # noqa: E402
from kvq_jax import calibrate  # noqa: E402  (calibrated / learned scales, sensitivity, policies)
from kvq_jax import sharding  # noqa: E402  (meshes, shard_cache, shard_params, shard_attend)
from kvq_jax import serve  # noqa: E402  (paged cache, allocator, continuous-batching Engine)

__version__ = "0.1.0"

__all__ = [
    "GenerateOutput", "KVCache", "KVSpec", "PRESETS", "QuantizedAttention", "Quantized", "Sampler",
    "StaticScales", "TensorSpec", "append", "attend", "bytes_per_token", "calibrate", "dequantize", "generate",
    "hadamard",
    "init_cache", "init_caches", "merge", "models", "nn", "pack_int2", "pack_int4", "plan_capacity",
    "quantize", "reset", "resolve_policy", "segment_lengths", "serve", "session_bytes", "sharding", "teacher_force",
    "unpack_int2", "unpack_int4",
]
