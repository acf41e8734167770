"""The params layout shared by every loader, its shape check, and random params of real shapes.

Params are a nested dict of arrays (numpy from the loaders; any array type works in
`reference_forward`). Every projection is stored [in, out], so a layer applies `x @ w`:

    {
      "embed":   [V, d]                     token embedding table
      "layers": [                           n_layers dicts, block order
        {
          "attn_norm": [d]                  RMSNorm weight before attention
          "wq":        [d, Hq * D]          query projection (heads major, channels minor)
          "wk":        [d, Hkv * D]
          "wv":        [d, Hkv * D]
          "wo":        [Hq * D, d]          attention output projection
          "bq": [Hq * D], "bk": [Hkv * D], "bv": [Hkv * D]   only when config.qkv_bias
          "mlp_norm":  [d]                  RMSNorm weight before the MLP
          "w_gate":    [d, F]               SwiGLU: down(silu(x @ w_gate) * (x @ w_up))
          "w_up":      [d, F]
          "w_down":    [F, d]
        }, ...
      ],
      "norm":    [d]                        final RMSNorm weight
      "lm_head": [d, V]                     absent when config.tie_embeddings (then embed.T)
    }

Within a head, the channel order of wq/wk/bq/bk follows `config.rope_style`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from kvq_jax.models.config import LlamaConfig


def param_shapes(config: LlamaConfig) -> dict:
    """The shape of every array of the params layout, as the same nested dict of tuples."""
    c = config
    d, q, kv = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layer = {
        "attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d),
        "mlp_norm": (d,), "w_gate": (d, c.ffn_dim), "w_up": (d, c.ffn_dim), "w_down": (c.ffn_dim, d),
    }
    if c.qkv_bias:
        layer.update(bq=(q,), bk=(kv,), bv=(kv,))
    shapes = {"embed": (c.vocab_size, d), "layers": [dict(layer) for _ in range(c.n_layers)], "norm": (d,)}
    if not c.tie_embeddings:
        shapes["lm_head"] = (d, c.vocab_size)
    return shapes


def check_params(config: LlamaConfig, params: dict) -> None:
    """Raise ValueError unless `params` has exactly the keys and shapes of `param_shapes(config)`."""
    want = param_shapes(config)

    def check(prefix, want_d, got_d):
        if set(want_d) != set(got_d):
            raise ValueError(f"{prefix}: expected keys {sorted(want_d)}, got {sorted(got_d)}")
        for k, shape in want_d.items():
            if tuple(got_d[k].shape) != shape:
                raise ValueError(f"{prefix}{k}: expected shape {shape}, got {tuple(got_d[k].shape)}")

    top = {k: v for k, v in want.items() if k != "layers"}
    check("params.", top, {k: v for k, v in params.items() if k != "layers"})
    if len(params.get("layers", ())) != config.n_layers:
        raise ValueError(f"expected {config.n_layers} layers, got {len(params.get('layers', ()))}")
    for i, (w, g) in enumerate(zip(want["layers"], params["layers"])):
        check(f"params.layers[{i}].", w, g)


def init_random_params(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random params of the config's real shapes (for speed runs and tests, not quality).

    Projections ~ N(0, 1/fan_in), norm weights = 1, embeddings ~ N(0, 1), biases ~ N(0, 0.02^2).

    Returns:
      params in the layout above, numpy arrays of `dtype`.
    """
    rng = np.random.default_rng(seed)

    def make(name, shape):
        if name.endswith("norm"):
            a = np.ones(shape, np.float32)
        elif name == "embed":
            a = rng.standard_normal(shape, np.float32)
        elif name.startswith("b"):
            a = 0.02 * rng.standard_normal(shape, np.float32)
        else:
            a = rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
        return a.astype(dtype)

    shapes = param_shapes(config)
    params = {k: make(k, s) for k, s in shapes.items() if k != "layers"}
    params["layers"] = [{k: make(k, s) for k, s in layer.items()} for layer in shapes["layers"]]
    return params


def resolve_dtype(dtype) -> np.dtype:
    """A numpy dtype from a name or type: "float32", "bfloat16", np.float16, jnp.bfloat16, ..."""
    if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype)


def cast_params(params: dict, dtype) -> dict:
    """The same params with every array cast to `dtype` (numpy, contiguous; "bfloat16" allowed)."""
    dtype = resolve_dtype(dtype)
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    out = {k: cast(v) for k, v in params.items() if k != "layers"}
    out["layers"] = [{k: cast(v) for k, v in layer.items()} for layer in params["layers"]]
    return out
