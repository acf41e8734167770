"""Memory planning: bytes per session of a given context, and how many sessions fit.

A session (one sequence of ``context`` tokens) costs, in every layer and KV head:

* ``context - sinks`` tokens of quantized body at `bytes_per_token` each (scales and
  zero points included), and
* a fixed full-precision overhead: ``residual_capacity(spec) + sinks`` tokens of bf16 K
  and V (``2 * 2 * D`` bytes each), the KIVI residual window and the attention sinks.

``init_cache`` rounds the body up to a multiple of 256 tokens (to a multiple of
lcm(256, token_group) for per-channel keys); the plan counts tokens, not that padding.
"""

from __future__ import annotations

import re

from kvq_jax.cache import residual_capacity
from kvq_jax.spec import KVSpec, bytes_per_token

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """"141GB" -> 141e9, "16GiB" -> 16 * 2**30, "512MB", "1e9", 1000 -> bytes (int).

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, ...) of 1024.
    """
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {text!r} (e.g. 141GB, 16GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def overhead_bytes(spec: KVSpec | str, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Fixed bf16 bytes per sequence: residual window slots and sinks, K and V, all layers."""
    spec = KVSpec.parse(spec)
    slots = residual_capacity(spec) + spec.sinks
    return slots * 2 * 2 * head_dim * num_kv_heads * num_layers


def session_bytes(spec: KVSpec | str, context: int, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of KV cache one sequence of ``context`` tokens needs: body + bf16 overhead."""
    spec = KVSpec.parse(spec)
    body = max(int(context) - spec.sinks, 0)
    return body * bytes_per_token(spec, num_layers, num_kv_heads, head_dim) + overhead_bytes(
        spec, num_layers, num_kv_heads, head_dim)


def plan(presets, *, num_layers: int, num_kv_heads: int, head_dim: int, context: int,
         memory: int, weights: int = 0) -> dict:
    """Sessions of ``context`` tokens that fit in ``memory - weights`` bytes, per preset.

    Args:
      presets: preset names or KVSpecs.
      num_layers, num_kv_heads, head_dim: model shape.
      context: tokens per session.
      memory: device bytes; weights: bytes taken by the weights (and anything else).

    Returns:
      ``{name: {"bytes_per_token": int, "session_bytes": int, "sessions": int}}`` with
      ``sessions = (memory - weights) // session_bytes``.
    """
    free = max(int(memory) - int(weights), 0)
    out = {}
    for p in presets:
        spec = KVSpec.parse(p)
        sb = session_bytes(spec, context, num_layers, num_kv_heads, head_dim)
        out[str(p) if isinstance(p, str) else str(spec)] = {
            "bytes_per_token": bytes_per_token(spec, num_layers, num_kv_heads, head_dim),
            "session_bytes": sb,
            "sessions": free // sb if sb else 0,
        }
    return out
