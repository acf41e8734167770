"""Llama-family models (Llama, Mistral, Qwen2, SmolLM2): loaders, tokenizer, reference forward.

    model, tokenizer = kvq_jax.models.load("smollm2-135m")     # LlamaModel on quantized caches
    config, params, tokenizer = kvq_jax.models.load_checkpoint()  # the raw params dict
    logits = forward_logits(config, params, tokens)            # [B, T] -> [B, T, V] (no-cache oracle)

The params layout (a nested dict of [in, out] arrays) is documented in `params.py`.
The loaders and the tokenizer need the `models` extra (gguf, tokenizers, safetensors);
they are imported on first use, so config, params and the forward work without it.
"""

import importlib

from kvq_jax.models.config import SMOLLM2_135M, LlamaConfig
from kvq_jax.models.hub import fetch_smollm2
from kvq_jax.models.model import LlamaBlock, LlamaModel, SwiGLU, load_model
from kvq_jax.models.params import cast_params, check_params, init_random_params, param_shapes
from kvq_jax.models.reference_forward import forward_logits, greedy_generate
from kvq_jax.models.rope_layout import convert_rope_style

_LAZY = {
    "load_gguf": "gguf_loader", "load_safetensors": "safetensors_loader",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}


load = load_model  # (model, tokenizer); the raw (config, params, tokenizer) is load_checkpoint


def __getattr__(name):
    if name == "load_checkpoint":
        return importlib.import_module("kvq_jax.models.checkpoint").load
    if name in _LAZY:
        return getattr(importlib.import_module(f"kvq_jax.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kvq_jax.models' has no attribute {name!r}")


__all__ = [
    "LlamaBlock", "LlamaConfig", "LlamaModel", "SMOLLM2_135M", "SwiGLU", "Tokenizer", "cast_params",
    "check_params", "convert_rope_style", "fetch_smollm2", "forward_logits", "greedy_generate",
    "init_random_params", "load", "load_checkpoint", "load_gguf", "load_model", "load_safetensors",
    "load_tokenizer", "param_shapes",
]
