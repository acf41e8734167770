"""LlamaModel: a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) on quantized KV caches.

    model, tokenizer = kvq_jax.models.load("smollm2-135m")
    caches = model.init_caches("int4-kivi", batch=1, max_len=1024)
    logits, caches = model(tokens, positions, caches, prefill=True)   # prompt
    logits, caches = model(next_tok, next_pos, caches)                # one decode step

Embedding -> n_layers x [RMSNorm -> QuantizedAttention (RoPE, GQA) -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head (or the tied embedding).
One cache per layer, passed in and out as a tuple; layers may use different specs.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.cache import KVCache
from kvq_jax.models.config import LlamaConfig
from kvq_jax.nn import QuantizedAttention, RMSNorm, _set, init_caches, resolve_policy

_ZEROS = nnx.initializers.zeros_init()


class SwiGLU(nnx.Module):
    """``down(silu(x @ w_gate) * (x @ w_up))``: x ``[..., d]`` -> ``[..., d]``, hidden width F."""

    def __init__(self, d_model: int, ffn_dim: int, *, dtype=None, param_dtype=jnp.float32, precision=None,
                 kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision,
                   kernel_init=kernel_init, rngs=rngs)
        self.gate = nnx.Linear(d_model, ffn_dim, **lin)
        self.up = nnx.Linear(d_model, ffn_dim, **lin)
        self.down = nnx.Linear(ffn_dim, d_model, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[..., d]`` -> ``[..., d]``."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nnx.Module):
    """One decoder block: pre-norm attention and pre-norm SwiGLU MLP, both residual."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, precision, impl, kernel_init, rngs):
        c = config
        self.attn_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn = QuantizedAttention(
            c.n_heads, c.d_model, num_kv_heads=c.n_kv_heads, head_dim=c.head_dim, qkv_bias=c.qkv_bias,
            rope=c.rope_style, rope_theta=c.rope_theta, impl=impl, sliding_window=c.sliding_window,
            dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init, rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = SwiGLU(c.d_model, c.ffn_dim, dtype=dtype, param_dtype=param_dtype, precision=precision,
                          kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x, positions, cache, *, prefill, lengths, impl):
        """x ``[B, T, d]`` -> (x ``[B, T, d]``, cache)."""
        a, cache = self.attn(self.attn_norm(x), positions, cache, prefill=prefill, lengths=lengths, impl=impl)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache


class LlamaModel(nnx.Module):
    """A Llama-family decoder whose attention layers read quantized KV caches.

    Attributes:
      config: the LlamaConfig (static).
      dtype: compute and parameter dtype (norms, attention and logits run in f32).
      embed: ``nnx.Embed`` ``[V, d]``; layers: ``nnx.List`` of `LlamaBlock`;
      norm: final RMSNorm; lm_head: ``nnx.Linear [d, V]`` or None when tied.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, precision=None, impl: str = "auto",
                 kernel_init=nnx.initializers.lecun_normal(), embedding_init=nnx.initializers.normal(1.0),
                 rngs: nnx.Rngs):
        c = config
        self.config, self.dtype = c, jnp.dtype(dtype)
        self.embed = nnx.Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs,
                               embedding_init=embedding_init)
        self.layers = nnx.List([
            LlamaBlock(c, dtype=dtype, param_dtype=dtype, precision=precision, impl=impl,
                       kernel_init=kernel_init, rngs=rngs)
            for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype, param_dtype=dtype)
        if c.tie_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = nnx.Linear(c.d_model, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                      precision=precision, kernel_init=kernel_init, rngs=rngs)

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_params(cls, config: LlamaConfig, params: dict, dtype=jnp.float32, *, precision=None,
                    impl: str = "auto") -> "LlamaModel":
        """Build from a params dict in the `kvq_jax.models.params` layout.

        Args:
          config: the model's LlamaConfig.
          params: nested dict of ``[in, out]`` arrays (numpy or jax), any float dtype.
          dtype: parameter and compute dtype (jnp.float32 or jnp.bfloat16).
          precision: matmul precision of the projections (None: backend default).
          impl: attention implementation over caches ("auto", "xla", "pallas").

        Returns:
          a LlamaModel whose logits match `forward_logits(config, params, ...)`.
        """
        from kvq_jax.models.params import check_params

        check_params(config, params)
        if config.sliding_window is not None:
            warnings.warn(f"sliding_window={config.sliding_window} is applied only to attention on "
                          "full-precision K/V (no cache, prefill); attention through a KVCache sees the "
                          "whole cache", stacklevel=2)
        model = cls(config, dtype=dtype, precision=precision, impl=impl, kernel_init=_ZEROS, embedding_init=_ZEROS,
                    rngs=nnx.Rngs(0))
        _set(model.embed.embedding, params["embed"])
        _set(model.norm.scale, params["norm"])
        if not config.tie_embeddings:
            _set(model.lm_head.kernel, params["lm_head"])
        for block, p in zip(model.layers, params["layers"]):
            _set(block.attn_norm.scale, p["attn_norm"])
            _set(block.mlp_norm.scale, p["mlp_norm"])
            for name, key in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                _set(getattr(block.attn, name).kernel, p["w" + key])
                if config.qkv_bias:
                    _set(getattr(block.attn, name).bias, p["b" + key])
            _set(block.attn.o_proj.kernel, p["wo"])
            _set(block.mlp.gate.kernel, p["w_gate"])
            _set(block.mlp.up.kernel, p["w_up"])
            _set(block.mlp.down.kernel, p["w_down"])
        return model

    # -- shapes ----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.n_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    def init_caches(self, kv, batch: int, max_len: int, dtype=jnp.bfloat16) -> tuple[KVCache, ...]:
        """Empty caches, one per layer: ``kv`` is a preset, KVSpec, or per-layer policy (`kvq.nn.resolve_policy`)."""
        return init_caches(resolve_policy(kv, self.num_layers), batch, max_len, self.num_kv_heads,
                           self.head_dim, dtype)

    # -- forward ---------------------------------------------------------------
    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               caches: tuple[KVCache, ...] | None = None, *, prefill: bool = False,
               lengths: jax.Array | None = None, impl: str | None = None):
        """The final-normed hidden states: tokens ``int[B, T]`` -> (``[B, T, d]``, caches).

        Arguments as `__call__`.
        """
        tokens = jnp.asarray(tokens)
        B, T = tokens.shape
        if caches is not None and len(caches) != self.num_layers:
            raise ValueError(f"caches: expected {self.num_layers} caches (one per layer), got {len(caches)}")
        if positions is None:
            start = caches[0].lengths[:, None] if (caches is not None and not prefill) else 0
            positions = start + jnp.arange(T, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T))
        x = self.embed(tokens)
        new = []
        for i, block in enumerate(self.layers):
            x, c = block(x, positions, None if caches is None else caches[i], prefill=prefill,
                         lengths=lengths, impl=impl)
            new.append(c)
        return self.norm(x), (None if caches is None else tuple(new))

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states ``[..., d]`` -> f32 logits ``[..., V]`` (lm_head or the tied embedding)."""
        w = self.embed.embedding[...] if self.lm_head is None else self.lm_head.kernel[...]
        eq = "...d,vd->...v" if self.lm_head is None else "...d,dv->...v"
        return jnp.einsum(eq, h.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 caches: tuple[KVCache, ...] | None = None, *, prefill: bool = False,
                 lengths: jax.Array | None = None, impl: str | None = None):
        """Next-token logits.

        Args:
          tokens: ``int32[B, T]``.
          positions: ``int32[B, T]`` absolute positions; default ``arange(T)`` without
            caches or with ``prefill``, else each sequence's cached length + ``arange(T)``.
          caches: None (plain causal forward, no cache) or a tuple of one KVCache per layer.
          prefill: with caches: attend on the prompt's full-precision K/V, then quantize-append
            them (caches must be empty for these sequences). Without: append then attend
            through the caches (decode, T >= 1).
          lengths: optional ``int[B]``: real tokens per row (right padding); only those are appended.
          impl: attention implementation over caches (default: each layer's, "auto").

        Returns:
          ``(logits f32[B, T, V], caches)`` (caches None when None was given).
        """
        h, caches = self.hidden(tokens, positions, caches, prefill=prefill, lengths=lengths, impl=impl)
        return self.logits(h), caches

    def scanned(self, specs=None) -> "ScannedLlama":
        """This model with its blocks run by ``lax.scan`` (inside a jit): see `ScannedLlama`.

        Args:
          specs: the cache spec of every layer (``[c.spec for c in caches]``), or None
            when running without caches. Consecutive layers of equal spec are scanned together.
        """
        return ScannedLlama(self, specs)


def _runs(specs, n: int) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive layers with equal cache specs."""
    if specs is None:
        return [(0, n)]
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or specs[i] != specs[start]:
            runs.append((start, i))
            start = i
    return runs


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class ScannedLlama:
    """A LlamaModel whose blocks run under ``lax.scan``: one compiled block per run of
    layers with the same cache spec instead of n_layers unrolled copies.

    Compiles several times faster than the unrolled model (30 layers of SmolLM2: a decode
    step in ~2 s instead of ~14 s with int4-kivi). Build it *inside* a jit: it stacks the
    block parameters (one copy of the layer weights per jit call), and works on stacked
    caches (`stack_caches` / `unstack_caches`, one copy each way), so build it once outside
    a decode loop, as `kvq.generate` does. Same results as the model, same call signature,
    except that ``caches`` are the stacked form.
    """

    def __init__(self, model: LlamaModel, specs=None):
        self.model = model
        n = model.num_layers
        if specs is not None and len(specs) != n:
            raise ValueError(f"specs: expected {n} (one per layer), got {len(specs)}")
        self.runs = _runs(None if specs is None else tuple(specs), n)
        self.graphdef = nnx.split(model.layers[0])[0]
        self.states = [_stack([nnx.split(model.layers[i])[1] for i in range(a, b)]) for a, b in self.runs]

    def stack_caches(self, caches):
        """Per-layer caches -> one KVCache per run, every leaf with a leading layer axis."""
        return tuple(_stack(caches[a:b]) for a, b in self.runs)

    def unstack_caches(self, stacked):
        """Inverse of `stack_caches`: a tuple of one KVCache per layer."""
        out = []
        for (a, b), c in zip(self.runs, stacked):
            out.extend(jax.tree.map(lambda x, i=i: x[i], c) for i in range(b - a))
        return tuple(out)

    def hidden(self, tokens, positions=None, caches=None, *, prefill=False, lengths=None, impl=None):
        """As `LlamaModel.hidden`, with stacked caches (or None)."""
        m = self.model
        tokens = jnp.asarray(tokens)
        B, T = tokens.shape
        if positions is None:
            start = caches[0].lengths[0][:, None] if (caches is not None and not prefill) else 0
            positions = start + jnp.arange(T, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T))
        x = m.embed(tokens)

        def body(x, xs):
            state, cache = xs
            block = nnx.merge(self.graphdef, state)
            return block(x, positions, cache, prefill=prefill, lengths=lengths, impl=impl)

        new = []
        for r, state in enumerate(self.states):
            x, c = jax.lax.scan(body, x, (state, None if caches is None else caches[r]))
            new.append(c)
        return m.norm(x), (None if caches is None else tuple(new))

    def logits(self, h):
        """As `LlamaModel.logits`."""
        return self.model.logits(h)

    def __call__(self, tokens, positions=None, caches=None, *, prefill=False, lengths=None, impl=None):
        """As `LlamaModel.__call__`, with stacked caches: ``(logits f32[B, T, V], stacked caches)``."""
        h, caches = self.hidden(tokens, positions, caches, prefill=prefill, lengths=lengths, impl=impl)
        return self.logits(h), caches


# ----------------------------------------------------------------------------- loading

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_NAMES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct", "default"}


def load_model(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, dtype=jnp.float32, *,
               rope_style: str | None = None, progress: bool = True, impl: str = "auto"):
    """Load a checkpoint as a ready LlamaModel and its tokenizer.

    Args:
      name_or_path: "smollm2-135m" (the embedded default, fetched once with a progress
        bar, see `fetch_smollm2`), a .gguf file, or a Hugging Face directory.
      dtype: parameter/compute dtype (jnp.float32 or jnp.bfloat16).
      rope_style: None keeps the checkpoint's Q/K layout; "half"/"interleaved" converts.
      progress: show progress while fetching the default model.
      impl: attention implementation over caches.

    Returns:
      ``(model, tokenizer)``.
    """
    from kvq_jax.models.checkpoint import load as load_checkpoint

    path = None
    if name_or_path is not None and str(name_or_path).lower() not in _SMOLLM2_NAMES:
        path = name_or_path
    config, params, tokenizer = load_checkpoint(path, dtype=np.float32, rope_style=rope_style, progress=progress)
    return LlamaModel.from_params(config, params, dtype=dtype, impl=impl), tokenizer


load = load_model
