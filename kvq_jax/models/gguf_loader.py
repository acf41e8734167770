"""Load a llama.cpp GGUF file (llama or qwen2 architecture) into (LlamaConfig, params).

Every tensor, whatever its GGML type (F32, F16, Q8_0, Q4_1, K-quants, ...), is
dequantized to f32 with `gguf.quants.dequantize`, then cast to the compute dtype.
GGUF lists dimensions fastest-first (`ne`), so a weight of `ne = [in, out]` reads
as a numpy array [out, in]; we transpose projections to our [in, out] layout
(see `kvq_jax.models.params`).
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np

from kvq_jax.models.config import LlamaConfig
from kvq_jax.models.params import check_params, resolve_dtype
from kvq_jax.models.rope_layout import convert_rope_style

# llama.cpp permutes Q/K rows of "llama" models (rope pairs (2i, 2i+1), its ROPE_TYPE_NORM);
# it leaves "qwen2" in Hugging Face order (pairs (i, i + D/2), ROPE_TYPE_NEOX).
_ROPE_STYLE = {"llama": "interleaved", "qwen2": "half"}

# GGUF tensor name -> (our key, transpose?)
_TOP = {"token_embd.weight": ("embed", False), "output_norm.weight": ("norm", False),
        "output.weight": ("lm_head", True)}
_BLOCK = {
    "attn_norm.weight": ("attn_norm", False), "attn_q.weight": ("wq", True),
    "attn_k.weight": ("wk", True), "attn_v.weight": ("wv", True),
    "attn_output.weight": ("wo", True), "attn_q.bias": ("bq", False),
    "attn_k.bias": ("bk", False), "attn_v.bias": ("bv", False),
    "ffn_norm.weight": ("mlp_norm", False), "ffn_gate.weight": ("w_gate", True),
    "ffn_up.weight": ("w_up", True), "ffn_down.weight": ("w_down", True),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_metadata(reader: gguf.GGUFReader) -> dict:
    """All key/value metadata of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def config_from_gguf_metadata(meta: dict, tensor_shapes: dict[str, tuple[int, ...]]) -> LlamaConfig:
    """Build a LlamaConfig from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys).

    Args:
      meta: output of `gguf_metadata`.
      tensor_shapes: the file's tensors, name -> numpy-order shape (reversed GGUF `ne`);
        they decide vocab_size, tied embeddings (no "output.weight") and qkv_bias.
    Raises:
      NotImplementedError: for architectures or features the reference model does not implement.
    """
    arch = meta.get("general.architecture")
    if arch not in _ROPE_STYLE:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ROPE_STYLE)})")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise NotImplementedError(f"per-layer {arch}.{key} is not supported")
        return value

    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"partial RoPE (rope dims {rope_dim} != head_dim {head_dim}) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise NotImplementedError(f"RoPE scaling {scaling!r} is not supported")
    if "token_embd.weight" in tensor_shapes:
        vocab_size = tensor_shapes["token_embd.weight"][0]
    elif "tokenizer.ggml.tokens" in meta:
        vocab_size = len(meta["tokenizer.ggml.tokens"])
    else:
        vocab_size = int(get("vocab_size"))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    window = meta.get(f"{arch}.attention.sliding_window")
    return LlamaConfig(
        vocab_size=int(vocab_size),
        d_model=d_model,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_shapes,
        max_position=int(get("context_length")),
        rope_style=_ROPE_STYLE[arch],
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        sliding_window=int(window) if window else None,
        arch=arch,
    )


def dequantize_tensor(tensor) -> np.ndarray:
    """One `gguf.ReaderTensor` as f32 numpy, shape = reversed GGUF `ne` ([out, in] for a weight)."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def load_gguf(path: str | os.PathLike, dtype=np.float32, rope_style: str | None = None
              ) -> tuple[LlamaConfig, dict]:
    """Read a GGUF file into (config, params).

    Args:
      path: a .gguf file of a "llama" (Llama, Mistral, SmolLM2) or "qwen2" model.
      dtype: compute dtype of the returned arrays (np.float32, "bfloat16", ...);
        dequantization itself is done in f32.
      rope_style: None keeps the file's layout ("interleaved" for llama files);
        "half" or "interleaved" permutes Q/K to that layout (same logits).
    Returns:
      config: LlamaConfig from the metadata.
      params: nested dict of numpy arrays, layout in `kvq_jax.models.params`
        (e.g. embed [V, d], layers[i]["wq"] [d, Hq*D], lm_head [d, V] unless tied).
    """
    reader = gguf.GGUFReader(os.fspath(path))
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    config = config_from_gguf_metadata(gguf_metadata(reader), shapes)
    dtype = resolve_dtype(dtype)
    params: dict = {"layers": [{} for _ in range(config.n_layers)]}
    for tensor in reader.tensors:
        match = _BLOCK_RE.fullmatch(tensor.name)
        if match and match.group(2) in _BLOCK:
            key, transpose = _BLOCK[match.group(2)]
            dest = params["layers"][int(match.group(1))]
        elif tensor.name in _TOP:
            key, transpose = _TOP[tensor.name]
            dest = params
        elif tensor.name == "rope_freqs.weight":
            raise NotImplementedError("RoPE frequency factors (Llama 3.1 rope scaling) are not supported")
        else:
            raise ValueError(f"unexpected tensor {tensor.name!r} in {path}")
        array = dequantize_tensor(tensor)
        dest[key] = np.ascontiguousarray(array.T if transpose else array, dtype=dtype)
    check_params(config, params)
    if rope_style is not None:
        config, params = convert_rope_style(config, params, rope_style)
    return config, params
