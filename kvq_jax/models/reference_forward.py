"""The no-cache oracle: a plain-jnp f32 forward pass of the Llama architecture.

No Flax modules, no KV cache, no kernels: every layer recomputes attention over the whole
sequence with a causal mask. Later tests compare the cached, quantized model to it.
It is a pure function of (config, params, tokens); jit it with the config static:
`jax.jit(forward_logits, static_argnums=0)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvq_jax.models.config import LlamaConfig
# RoPE has one home, kvq_jax.nn; tests check it against independent float64 transcriptions.
from kvq_jax.nn import rope_cos_sin as rope_angles
from kvq_jax.nn import rotate_pairs as apply_rope

# An oracle must not use TF32 on GPUs: every product at full f32 precision.
_HI = jax.lax.Precision.HIGHEST


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight. x: [..., d], weight: [d]."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight.astype(jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
              sliding_window: int | None = None) -> jax.Array:
    """Causal grouped-query attention, f32, no cache.

    Query head h uses key/value head h // G (G = Hq / Hkv), as Hugging Face's repeat_kv.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (after RoPE for q and k).
      positions: [T] or [B, T] positions; key j is visible to query i iff pos_j <= pos_i
        (and pos_i - pos_j < sliding_window when set).
    Returns:
      [B, T, Hq, D] f32.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, precision=_HI) / jnp.sqrt(jnp.float32(d))
    pos = jnp.broadcast_to(positions, (b, t))
    delta = pos[:, :, None] - pos[:, None, :]  # [B, Tq, Tk]
    visible = delta >= 0
    if sliding_window is not None:
        visible &= delta < sliding_window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32), precision=_HI)
    return out.reshape(b, t, hq, d)


def _proj(x, w, b=None):
    y = jnp.matmul(x, w.astype(jnp.float32), precision=_HI)
    return y if b is None else y + b.astype(jnp.float32)


def forward_logits(config: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array | None = None,
                   return_kv: bool = False):
    """Full-sequence forward pass in f32: tokens -> next-token logits.

    RMSNorm -> GQA attention with RoPE (config.rope_style) and a causal mask -> residual
    -> RMSNorm -> SwiGLU MLP -> residual, n_layers times; final RMSNorm; lm_head or the
    tied embedding table.

    Args:
      config: model hyper-parameters.
      params: params in the `kvq_jax.models.params` layout (any dtype; computed in f32).
      tokens: [B, T] int token ids.
      positions: [T] or [B, T] int positions; default arange(T).
      return_kv: also return every layer's keys (after RoPE) and values.
    Returns:
      logits [B, T, V] f32; with return_kv, (logits, [(k, v) per layer]) with
      k, v: [B, T, Hkv, D] f32.
    """
    c = config
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.arange(t)
    cos, sin = rope_angles(jnp.asarray(positions), c.head_dim, c.rope_theta)
    x = jnp.asarray(params["embed"])[tokens].astype(jnp.float32)  # [B, T, d]
    kvs = []
    for layer in params["layers"]:
        h = rms_norm(x, layer["attn_norm"], c.rms_eps)
        q = _proj(h, layer["wq"], layer.get("bq")).reshape(b, t, c.n_heads, c.head_dim)
        k = _proj(h, layer["wk"], layer.get("bk")).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = _proj(h, layer["wv"], layer.get("bv")).reshape(b, t, c.n_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin, c.rope_style), apply_rope(k, cos, sin, c.rope_style)
        kvs.append((k, v))
        o = attention(q, k, v, jnp.asarray(positions), c.sliding_window)
        x = x + _proj(o.reshape(b, t, -1), layer["wo"])
        h = rms_norm(x, layer["mlp_norm"], c.rms_eps)
        x = x + _proj(jax.nn.silu(_proj(h, layer["w_gate"])) * _proj(h, layer["w_up"]), layer["w_down"])
    x = rms_norm(x, params["norm"], c.rms_eps)
    head = jnp.asarray(params["embed"]).T if c.tie_embeddings else params["lm_head"]
    logits = _proj(x, head)
    return (logits, kvs) if return_kv else logits


def greedy_generate(config: LlamaConfig, params: dict, tokens: list[int], n_new: int) -> list[int]:
    """Greedy continuation that re-runs the full forward every step (no cache; an oracle, not a server).

    The sequence is padded to len(tokens) + n_new so one jit compilation serves every
    step: causal masking keeps the padding from reaching earlier positions.

    Args:
      tokens: prompt ids of one sequence.
      n_new: number of tokens to generate.
    Returns:
      the generated ids (at most n_new; stops after an id of config.eos_token_ids).
    """
    if not tokens:
        raise ValueError("greedy_generate needs at least one prompt token")
    forward = _forward_jit
    params = jax.tree.map(jnp.asarray, params)
    n = len(tokens)
    buf = jnp.zeros((1, n + n_new), jnp.int32).at[0, :n].set(jnp.asarray(tokens, jnp.int32))
    out: list[int] = []
    for step in range(n_new):
        logits = forward(config, params, buf)
        out.append(int(jnp.argmax(logits[0, n + step - 1])))
        if out[-1] in config.eos_token_ids:
            break
        buf = buf.at[0, n + step].set(out[-1])
    return out


_forward_jit = jax.jit(forward_logits, static_argnums=0, static_argnames="return_kv")
