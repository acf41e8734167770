"""Flax NNX layers over a quantized KV cache: `QuantizedAttention`, `RMSNorm`, per-layer policies.

    attn = kvq.nn.QuantizedAttention(num_heads=8, in_features=512, num_kv_heads=2,
                                     rope="half", spec="int8", rngs=nnx.Rngs(0))
    y, _ = attn(x, positions)                              # no cache: plain causal attention
    cache = attn.init_cache(batch=4, max_len=4096)
    y, cache = attn(x, positions, cache, prefill=True)     # attend on full-precision K/V, then store them
    y, cache = attn(x1, positions1, cache)                 # decode: append, then attend through the cache

The cache is a plain pytree passed in and out (gemma style); the layer holds only
weights. `QuantizedAttention.from_nnx(mha, spec)` derives the inference layer from a
trained `flax.nnx.MultiHeadAttention` with the same weights (penzai style).

Shapes: x ``[B, T, d]``; positions ``int32[B, T]`` (absolute token positions, used by
RoPE and the no-cache causal mask); q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kvq_jax.cache import KVCache, init_cache
from kvq_jax.sharding import shard_append, shard_attend
from kvq_jax.spec import KVSpec

ROPE_STYLES = ("half", "interleaved")
QK_NORMS = ("rms", "layer")


# ----------------------------------------------------------------------------- policies


def resolve_policy(kv, num_layers: int) -> tuple[KVSpec, ...]:
    """One KVSpec per layer from a preset name, a KVSpec, a sequence or a mapping.

    Args:
      kv: a preset name or canonical spec string ("int8", "int4-kivi", ...), a KVSpec
        (same for every layer), a sequence of ``num_layers`` of those (layer order),
        or a mapping ``{layer_index: spec, ..., "default": spec}`` (layers not named
        take "default", which is required unless every layer is named).
      num_layers: number of attention layers.

    Returns:
      ``tuple[KVSpec, ...]`` of length ``num_layers``.
    """
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
    if isinstance(kv, (str, KVSpec)):
        return (KVSpec.parse(kv),) * num_layers
    if isinstance(kv, Mapping):
        default = kv.get("default")
        out = []
        for i in range(num_layers):
            if i in kv:
                out.append(KVSpec.parse(kv[i]))
            elif default is not None:
                out.append(KVSpec.parse(default))
            else:
                raise ValueError(f"kv: layer {i} has no spec and the mapping has no 'default'")
        extra = [k for k in kv if k != "default" and not (isinstance(k, int) and 0 <= k < num_layers)]
        if extra:
            raise ValueError(f"kv: keys {extra} are not layer indices in [0, {num_layers})")
        return tuple(out)
    if isinstance(kv, Sequence):
        if len(kv) != num_layers:
            raise ValueError(f"kv: expected {num_layers} specs (one per layer), got {len(kv)}")
        return tuple(KVSpec.parse(s) for s in kv)
    raise TypeError(f"kv: expected a preset name, KVSpec, sequence or mapping, got {type(kv).__name__}")


def init_caches(policy, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                dtype=jnp.bfloat16, num_layers: int | None = None) -> tuple[KVCache, ...]:
    """Empty caches, one per layer.

    Args:
      policy: a tuple of KVSpec (`resolve_policy`), or anything `resolve_policy`
        accepts together with ``num_layers``.
      batch, max_len: sequences and tokens per sequence each cache holds.
      num_kv_heads, head_dim: Hkv and D of every layer.
      dtype: dtype of the full-precision segments (residual window, sinks).
      num_layers: needed when ``policy`` is a single preset or KVSpec.

    Returns:
      ``tuple[KVCache, ...]``, one per layer; layer i stored as ``policy[i]``.
    """
    if num_layers is None:
        if isinstance(policy, (str, KVSpec)) or not isinstance(policy, Sequence):
            raise ValueError("num_layers: required when policy is a single spec or a mapping")
        num_layers = len(policy)
    specs = resolve_policy(policy, num_layers)
    return tuple(init_cache(s, batch, max_len, num_kv_heads, head_dim, dtype) for s in specs)


def policy_bytes_per_token(policy: Sequence[KVSpec], num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token of the quantized body occupies across all layers of a per-layer policy."""
    from kvq_jax.spec import bytes_per_token

    return int(sum(bytes_per_token(s, 1, num_kv_heads, head_dim) for s in policy))


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * scale``, computed in f32.

    Input ``[..., d]``; output the same shape in ``dtype`` (default: the input's dtype).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones)
        self.num_features, self.eps, self.dtype = num_features, float(eps), dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[..., d]`` -> ``[..., d]``."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of rotary embeddings: pair i turns by ``position * theta**(-2i/D)``.

    Args:
      positions: ``int[B, T]`` absolute positions.
      head_dim: D (even).
      theta: RoPE base.

    Returns:
      ``(cos, sin)``, each ``f32[B, T, D/2]``.
    """
    inv = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array, style: str) -> jax.Array:
    """Rotate channel pairs of every head by precomputed angles.

    Args:
      x: ``[B, T, H, D]``.
      cos, sin: ``f32[B, T, D/2]`` or ``f32[T, D/2]`` (from `rope_cos_sin`).
      style: "half" rotates pairs (i, i + D/2) (Hugging Face); "interleaved" rotates
        pairs (2i, 2i + 1) (GGUF llama files, the original RoPE paper).

    Returns:
      ``f32[B, T, H, D]``.
    """
    if style not in ROPE_STYLES:
        raise ValueError(f"style: expected one of {ROPE_STYLES}, got {style!r}")
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    x = x.astype(jnp.float32)
    if style == "half":
        x1, x2 = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, style: str) -> jax.Array:
    """Rotate channel pairs of every head by their position (`rotate_pairs` of `rope_cos_sin`).

    Args:
      x: ``[B, T, H, D]``.
      positions: ``int[B, T]``.
      theta: RoPE base.
      style: "half" or "interleaved" (see `rotate_pairs`).

    Returns:
      ``f32[B, T, H, D]``.
    """
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    return rotate_pairs(x, cos, sin, style)


CHUNK_BYTES = 1 << 28  # `causal_attention`: f32 scores held at once, at most (256 MiB)


PREFILL_IMPLS = ("auto", "xla", "cudnn")  # `causal_attention`'s impl


def prefill_impl(impl: str) -> str:
    """`causal_attention`'s ``impl`` beside a cache ``impl`` (`kvq.attend`'s): "xla" keeps every
    attention in XLA; "auto" and "pallas" leave the choice to `causal_attention` ("auto")."""
    return "xla" if impl == "xla" else "auto"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_positions: jax.Array, *, key_lengths: jax.Array | None = None,
                     sliding_window: int | None = None, precision=None,
                     chunk_bytes: int = CHUNK_BYTES, impl: str = "xla") -> jax.Array:
    """Causal grouped-query attention on unquantized K/V, without a cache (training, prefill).

    Query head h reads KV head ``h // G`` with ``G = Hq / Hkv``. Key j is visible to
    query i when ``k_pos[j] <= q_pos[i]`` (and ``q_pos[i] - k_pos[j] < sliding_window``
    when set) and ``j < key_lengths[b]`` when given. Rows that see no key give 0.

    ``impl`` "xla": in f32. The f32 scores of all queries against all keys take ``4 * B * Hq *
    T * S`` bytes (a 32K-token prompt: 128 GiB at Hq 32); where that exceeds ``chunk_bytes``,
    the queries run in chunks of as many rows as fit it (at least 16), one after another
    (``lax.map``), each with the exact softmax of its rows over all keys: the same math, memory
    bounded by the chunk. "cudnn": cuDNN's flash attention (`jax.nn.dot_product_attention`) on
    q, k, v rounded to bf16, f32 accumulation, O(T) memory; for a fresh prompt: the queries are
    the keys' tokens (``q_positions is k_positions``, positions increasing along each sequence),
    and a row with no valid key sees key 0 (its output is unspecified, as padding's). On an H200
    (Hq 32, Hkv 8, D 128) 1.05 ms per layer at 8 x 2048 tokens against 14.1 in f32, 14.7 against
    511 at 1 x 32K; outputs within 1.6e-2 of f32's (mean 2-3e-4) on unit-normal inputs with
    ragged key lengths and a window (BENCHMARKS.md run W).
    "auto": "cudnn" on a GPU backend for a fresh prompt (``q_positions is k_positions``) with no
    ``precision`` asked and ``D`` a multiple of 8 up to 128, else "xla".

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]``.
      q_positions: ``int[B, T]``; k_positions: ``int[B, S]``.
      key_lengths: optional ``int[B]``: only the first keys of each sequence are valid.
      sliding_window: optional window in tokens.
      precision: of the f32 path's einsums ("xla").
      chunk_bytes: the most bytes of f32 scores held at once (positive; "xla").
      impl: "xla", "cudnn" or "auto" (`PREFILL_IMPLS`).

    Returns:
      ``f32[B, T, Hq, D]``.
    """
    B, T, Hq, D = q.shape
    S = k.shape[1]
    if impl not in PREFILL_IMPLS:
        raise ValueError(f"impl: expected one of {PREFILL_IMPLS}, got {impl!r}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected a positive number of bytes, got {chunk_bytes}")
    fresh = q_positions is k_positions
    if impl == "cudnn" and not fresh:
        raise ValueError("impl: 'cudnn' needs the queries to be the keys' tokens (q_positions is k_positions: "
                         "a fresh prompt); use 'xla' for queries at other positions")
    if impl == "auto":
        gpu = jax.default_backend() == "gpu"
        impl = "cudnn" if (gpu and fresh and precision is None and D % 8 == 0 and D <= 128) else "xla"
    if impl == "cudnn":
        lens = None if key_lengths is None else jnp.maximum(jnp.asarray(key_lengths, jnp.int32), 1)
        o = jax.nn.dot_product_attention(
            q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), is_causal=True,
            key_value_seq_lengths=lens,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0), implementation="cudnn")
        return o.astype(jnp.float32)
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    rows = max(16, chunk_bytes // (4 * B * Hq * S))
    if T <= rows:
        return _causal_block(q, k, v, q_positions, k_positions, key_lengths, sliding_window, precision)
    n = -(-T // rows)
    pad = n * rows - T  # padded query rows: computed, then dropped
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, rows, Hq, D).swapaxes(0, 1)
    pc = jnp.pad(q_positions, ((0, 0), (0, pad))).reshape(B, n, rows).swapaxes(0, 1)
    out = jax.lax.map(lambda a: _causal_block(a[0], k, v, a[1], k_positions, key_lengths, sliding_window,
                                              precision), (qc, pc))  # [n, B, rows, Hq, D]
    return out.swapaxes(0, 1).reshape(B, n * rows, Hq, D)[:, :T]


def _causal_block(q, k, v, q_positions, k_positions, key_lengths, sliding_window, precision):
    """`causal_attention` of all of ``q``'s rows at once (k, v in f32)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, Hq // Hkv, D)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k, precision=precision) / math.sqrt(D)
    delta = q_positions[:, :, None] - k_positions[:, None, :]  # [B, T, S]
    vis = delta >= 0
    if sliding_window is not None:
        vis &= delta < sliding_window
    if key_lengths is not None:
        vis &= jnp.arange(k.shape[1])[None, None, :] < key_lengths[:, None, None]
    vis = vis[:, None, None]
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    o = jnp.einsum("bhgts,bshd->bthgd", p, v, precision=precision)
    return o.reshape(B, T, Hq, D)


def _right_align(x: jax.Array, n: jax.Array) -> jax.Array:
    """Move the first ``n[b]`` rows of ``x[b]`` ([B, T, ...]) to the end; the front is filled with row 0."""
    T = x.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    src = jnp.clip(t - (T - n[:, None]), 0, T - 1)
    return jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)


def _left_align(x: jax.Array, n: jax.Array) -> jax.Array:
    """Inverse of `_right_align`: rows ``[T - n[b], T)`` of ``x[b]`` become rows ``[0, n[b])``; the rest are 0."""
    T = x.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    src = jnp.clip(t + (T - n[:, None]), 0, T - 1)
    out = jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)
    keep = (t < n[:, None]).reshape(src.shape + (1,) * (x.ndim - 2))
    return jnp.where(keep, out, jnp.zeros((), out.dtype))


# ----------------------------------------------------------------------------- the layer


class QuantizedAttention(nnx.Module):
    """Multi-head (GQA/MQA) self-attention whose KV cache is a quantized `KVCache`.

    Projections q/k/v/o (``nnx.Linear``, kernels ``[in, out]``), optional q/k/v bias,
    optional per-head q/k norm (RMSNorm or LayerNorm), RoPE in either convention or
    none. Three modes of ``__call__``:

    * ``cache=None``: plain causal attention over x's own full-precision K/V.
    * ``cache`` and ``prefill=True``: the same attention over x's own full-precision
      K/V (the cache must hold no earlier tokens of these sequences), then the K/V
      are quantize-appended to the cache.
    * ``cache`` and ``prefill=False`` (decode, chunked prefill): K/V are appended
      first, then the queries attend through the cache (``kvq.attend``), causal
      among themselves.

    Attributes:
      num_heads, num_kv_heads, head_dim, in_features, out_features: Hq, Hkv, D, d_in, d_out.
      rope: "half", "interleaved" or None; rope_theta: its base.
      spec: default KVSpec of `init_cache` (a cache carries its own spec).
      impl: implementation of attention through the cache and of appends to it ("auto", "xla",
        "pallas"; `kvq.attend`, `kvq.append`).
      sliding_window: applied only where attention runs on full-precision K/V
        (no cache, prefill); attention through a cache sees the whole cache.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        rope: str | None = "half",
        rope_theta: float = 10000.0,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        spec: KVSpec | str = "bf16",
        impl: str = "auto",
        sliding_window: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        kernel_init=nnx.initializers.lecun_normal(),
        bias_init=nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads: {num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        head_dim = in_features // num_heads if head_dim is None else head_dim
        if rope is not None and rope not in ROPE_STYLES:
            raise ValueError(f"rope: expected one of {ROPE_STYLES} or None, got {rope!r}")
        if rope is not None and head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm: expected one of {QK_NORMS} or None, got {qk_norm!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.in_features = in_features
        self.out_features = in_features if out_features is None else out_features
        self.rope, self.rope_theta = rope, float(rope_theta)
        self.qk_norm, self.spec, self.impl = qk_norm, KVSpec.parse(spec), impl
        self.sliding_window, self.dtype, self.precision = sliding_window, dtype, precision
        lin = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                   bias_init=bias_init, rngs=rngs)
        self.q_proj = nnx.Linear(in_features, num_heads * head_dim, use_bias=qkv_bias, **lin)
        self.k_proj = nnx.Linear(in_features, num_kv_heads * head_dim, use_bias=qkv_bias, **lin)
        self.v_proj = nnx.Linear(in_features, num_kv_heads * head_dim, use_bias=qkv_bias, **lin)
        self.o_proj = nnx.Linear(num_heads * head_dim, self.out_features, use_bias=out_bias, **lin)
        if qk_norm == "rms":
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
        elif qk_norm == "layer":
            ln = dict(epsilon=norm_eps, use_bias=False, param_dtype=param_dtype, rngs=rngs)
            self.q_norm = nnx.LayerNorm(head_dim, **ln)
            self.k_norm = nnx.LayerNorm(head_dim, **ln)
        else:
            self.q_norm = nnx.data(None)
            self.k_norm = nnx.data(None)

    # -- construction from a trained layer ---------------------------------
    @classmethod
    def from_nnx(cls, mha: nnx.MultiHeadAttention, spec: KVSpec | str = "bf16", *, rope: str | None = None,
                 rope_theta: float = 10000.0, impl: str = "auto") -> "QuantizedAttention":
        """A QuantizedAttention with the weights of a ``flax.nnx.MultiHeadAttention`` (self-attention).

        Copies query/key/value/out kernels (``[in, H, D]`` -> ``[in, H*D]``, out
        ``[H, D, out]`` -> ``[H*D, out]``), their biases, and the q/k LayerNorm scales
        when ``normalize_qk``. The MHA has no RoPE, so ``rope=None`` by default; its
        dropout is not carried over (inference layer).

        Args:
          mha: the trained layer (``in_kv_features`` must equal ``in_features``).
          spec: default KVSpec of the caches this layer makes (`init_cache`).
          rope, rope_theta: add rotary embeddings (only if the MHA was trained with them
            applied outside; default none).
          impl: attention implementation over the cache.

        Returns:
          a QuantizedAttention; with ``cache=None`` (or a bf16 cache, up to bf16
          rounding of K/V) it computes what ``mha(x, mask=causal)`` computes.
        """
        if mha.in_kv_features != mha.in_features:
            raise ValueError("mha: cross-attention (in_kv_features != in_features) is not supported")
        H, Hkv, D = mha.num_heads, mha.num_kv_heads, mha.head_dim
        qk_norm = None
        eps = 1e-6
        if mha.normalize_qk:
            qk_norm, eps = "layer", mha.query_ln.epsilon
        new = cls(H, mha.in_features, num_kv_heads=Hkv, head_dim=D, out_features=mha.out_features,
                  qkv_bias=mha.use_bias, out_bias=mha.use_bias, rope=rope, rope_theta=rope_theta,
                  qk_norm=qk_norm, norm_eps=eps, spec=spec, impl=impl, dtype=mha.dtype,
                  param_dtype=mha.param_dtype, precision=mha.precision,
                  kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
        d_in = mha.in_features
        _set(new.q_proj.kernel, mha.query.kernel[...].reshape(d_in, H * D))
        _set(new.k_proj.kernel, mha.key.kernel[...].reshape(d_in, Hkv * D))
        _set(new.v_proj.kernel, mha.value.kernel[...].reshape(d_in, Hkv * D))
        _set(new.o_proj.kernel, mha.out.kernel[...].reshape(H * D, mha.out_features))
        if mha.use_bias:
            _set(new.q_proj.bias, mha.query.bias[...].reshape(H * D))
            _set(new.k_proj.bias, mha.key.bias[...].reshape(Hkv * D))
            _set(new.v_proj.bias, mha.value.bias[...].reshape(Hkv * D))
            _set(new.o_proj.bias, mha.out.bias[...])
        if mha.normalize_qk:
            _set(new.q_norm.scale, mha.query_ln.scale[...])
            _set(new.k_norm.scale, mha.key_ln.scale[...])
        return new

    # -- caches ------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, spec: KVSpec | str | None = None,
                   dtype=jnp.bfloat16) -> KVCache:
        """An empty KVCache for this layer: ``batch`` sequences of up to ``max_len`` tokens (spec default: ``self.spec``)."""
        return init_cache(self.spec if spec is None else spec, batch, max_len, self.num_kv_heads,
                          self.head_dim, dtype)

    # -- forward -----------------------------------------------------------
    def qkv(self, x: jax.Array, positions: jax.Array):
        """Project, normalize and rotate: x ``[B, T, d]``, positions ``int[B, T]`` ->
        q ``[B, T, Hq, D]``, k, v ``[B, T, Hkv, D]`` (q, k in f32 after RoPE)."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q = apply_rope(q, positions, self.rope_theta, self.rope)
            k = apply_rope(k, positions, self.rope_theta, self.rope)
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        prefill: bool = False,
        lengths: jax.Array | None = None,
        impl: str | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Self-attention of x, through ``cache`` when given.

        Args:
          x: ``[B, T, d_in]``.
          positions: ``int32[B, T]`` absolute positions (RoPE, causal mask). Default:
            ``arange(T)`` without a cache or with ``prefill``, else
            ``cache.lengths[:, None] + arange(T)``.
          cache: None, or this layer's KVCache.
          prefill: with a cache: attend on x's own full-precision K/V, then append
            them (the cache must not hold earlier tokens of these sequences).
          lengths: optional ``int[B]``: only the first ``lengths[b]`` of the T tokens
            of sequence b are real (right padding): only they are appended, and their
            outputs are exact; outputs of padded rows are unspecified (0 or finite).
          impl: override of ``self.impl`` for attention through the cache and appends to it.

        Returns:
          ``(y, cache)``: y ``[B, T, d_out]`` and the updated cache (None stays None).
        """
        B, T, _ = x.shape
        if positions is None:
            start = cache.lengths[:, None] if (cache is not None and not prefill) else 0
            positions = start + jnp.arange(T, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T))
        q, k, v = self.qkv(x, positions)
        if cache is None or prefill:
            o = causal_attention(q, k, v, positions, positions, key_lengths=lengths,
                                 sliding_window=self.sliding_window, precision=self.precision,
                                 impl=prefill_impl(impl or self.impl))
            if cache is not None:
                cache = shard_append(cache, k, v, lengths=lengths, impl=impl or self.impl)
        else:
            cache = shard_append(cache, k, v, lengths=lengths, impl=impl or self.impl)
            if lengths is not None and T > 1:
                # attend() puts the T queries at the last T positions of each sequence;
                # with ragged lengths, move each sequence's real queries to the end.
                n = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, T)
                o = _left_align(shard_attend(_right_align(q, n), cache, impl=impl or self.impl), n)
            else:
                o = shard_attend(q, cache, impl=impl or self.impl)
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        if self.dtype is not None:
            o = o.astype(self.dtype)
        else:
            o = o.astype(x.dtype)
        return self.o_proj(o), cache


def _set(param: nnx.Variable, value) -> None:
    """Assign ``value`` to an nnx Param of the same shape, cast to the param's dtype."""
    value = jnp.asarray(value)
    old = param[...]
    if value.shape != old.shape:
        raise ValueError(f"expected shape {old.shape}, got {value.shape}")
    param[...] = value.astype(old.dtype)


__all__ = [
    "QuantizedAttention", "RMSNorm", "apply_rope", "causal_attention", "prefill_impl", "init_caches",
    "policy_bytes_per_token", "resolve_policy", "rope_cos_sin", "rotate_pairs",
]
