"""The two RoPE channel layouts and the permutation between them.

Hugging Face checkpoints rotate channel pairs (i, i + D/2) of each head ("half").
llama.cpp's converter permutes the rows of W_q and W_k of llama-architecture models
so that the pairs become (2i, 2i + 1) ("interleaved"). Scores q.k are the same either
way: only the order of channels inside a head differs, identically for q and k.
Values and the output projection are never permuted.
"""

from __future__ import annotations

import numpy as np

from kvq_jax.models.config import LlamaConfig


def half_to_interleaved(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute the last axis from "half" to "interleaved" channel order (llama.cpp's permute).

    Args:
      x: [..., n_heads * D] projection columns (our weights are [in, out]) or a bias [n_heads * D].
      n_heads: heads packed in the last axis (Hq for W_q, Hkv for W_k).
    Returns:
      [..., n_heads * D]: per head, channel 2i <- i and 2i + 1 <- i + D/2.
    """
    *lead, n = x.shape
    d = n // n_heads
    return x.reshape(*lead, n_heads, 2, d // 2).swapaxes(-1, -2).reshape(x.shape)


def interleaved_to_half(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `half_to_interleaved`: [..., n_heads * D] -> [..., n_heads * D]."""
    *lead, n = x.shape
    d = n // n_heads
    return x.reshape(*lead, n_heads, d // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def convert_rope_style(config: LlamaConfig, params: dict, rope_style: str) -> tuple[LlamaConfig, dict]:
    """Re-express a model in the other RoPE layout; the logits do not change.

    Permutes wq/bq (Hq heads) and wk/bk (Hkv heads) along their output axis and sets
    `config.rope_style`. Other arrays are shared with the input, not copied.

    Args:
      config: the model's config.
      params: params in the layout documented in `kvq_jax.models`.
      rope_style: "half" or "interleaved".
    Returns:
      (config, params) in the requested layout (the inputs themselves if already there).
    """
    if rope_style == config.rope_style:
        return config, params
    new_config = config.replace(rope_style=rope_style)  # validates rope_style
    perm = half_to_interleaved if rope_style == "interleaved" else interleaved_to_half
    heads = {"wq": config.n_heads, "bq": config.n_heads, "wk": config.n_kv_heads, "bk": config.n_kv_heads}
    layers = []
    for layer in params["layers"]:
        layer = dict(layer)
        for name, n in heads.items():
            if name in layer:
                layer[name] = np.ascontiguousarray(perm(np.asarray(layer[name]), n))
        layers.append(layer)
    return new_config, {**params, "layers": layers}
