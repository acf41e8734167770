"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into (LlamaConfig, params).

Supports model_type "llama", "mistral" and "qwen2" with the usual tensor names
(`model.layers.N.self_attn.q_proj.weight` [out, in], ...). Projections are transposed
to our [in, out] layout (see `kvq_jax.models.params`); RoPE layout is "half".
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
from safetensors import safe_open

from kvq_jax.models.config import LlamaConfig
from kvq_jax.models.params import check_params, resolve_dtype
from kvq_jax.models.rope_layout import convert_rope_style

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# HF tensor name -> (our key, transpose?)
_TOP = {"model.embed_tokens.weight": ("embed", False), "model.norm.weight": ("norm", False),
        "lm_head.weight": ("lm_head", True)}
_BLOCK = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True), "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True), "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False), "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True), "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def config_from_hf(hf: dict, tensor_names: set[str] = frozenset()) -> LlamaConfig:
    """Build a LlamaConfig from a parsed Hugging Face config.json.

    Args:
      hf: the config.json dict.
      tensor_names: names in the checkpoint; q_proj biases there set qkv_bias, and a
        missing lm_head.weight means tied embeddings.
    Raises:
      NotImplementedError: model types or features the reference model does not implement.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    if hf.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise NotImplementedError(f"rope_scaling {scaling} is not supported")
    if hf.get("attention_bias") and model_type != "qwen2":
        raise NotImplementedError("attention_bias (biased o_proj) is not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 use_sliding_window is not supported")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    n_heads, d_model = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    tied = hf.get("tie_word_embeddings", False) or (bool(tensor_names) and "lm_head.weight" not in tensor_names)
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        ffn_dim=int(hf["intermediate_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(tied),
        max_position=int(hf.get("max_position_embeddings", 4096)),
        rope_style="half",
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensor_names,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos),
        sliding_window=int(window) if window else None,
        arch=model_type,
    )


def load_safetensors(path: str | os.PathLike, dtype=np.float32, rope_style: str | None = None
                     ) -> tuple[LlamaConfig, dict]:
    """Read a Hugging Face model directory into (config, params).

    Args:
      path: directory with config.json and one or more *.safetensors files (shards).
      dtype: compute dtype of the returned arrays (np.float32, "bfloat16", ...).
      rope_style: None keeps the checkpoint's "half" layout; "interleaved" permutes
        Q/K rows as llama.cpp does (same logits).
    Returns:
      config: LlamaConfig (rope_style "half" unless asked otherwise).
      params: nested dict of numpy arrays, layout in `kvq_jax.models.params`.
    """
    path = pathlib.Path(path)
    hf = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    names = set()
    for file in files:
        with safe_open(file, framework="np") as f:
            names.update(f.keys())
    config = config_from_hf(hf, names)
    dtype = resolve_dtype(dtype)
    params: dict = {"layers": [{} for _ in range(config.n_layers)]}
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                match = _BLOCK_RE.fullmatch(name)
                if match and match.group(2) in _BLOCK:
                    key, transpose = _BLOCK[match.group(2)]
                    dest = params["layers"][int(match.group(1))]
                elif name in _TOP:
                    key, transpose = _TOP[name]
                    dest = params
                    if key == "lm_head" and config.tie_embeddings:
                        continue
                elif name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer some old checkpoints saved; recomputed from rope_theta
                else:
                    raise ValueError(f"unexpected tensor {name!r} in {file}")
                array = f.get_tensor(name)
                dest[key] = np.ascontiguousarray(array.T if transpose else array, dtype=dtype)
    check_params(config, params)
    if rope_style is not None:
        config, params = convert_rope_style(config, params, rope_style)
    return config, params
