"""Calibrated and learned KV-cache scales, per-layer sensitivity, mixed-precision policies.

    import kvq_jax as kvq
    model, tok = kvq.models.load("smollm2-135m")
    cal = kvq.calibrate.collect_stats(model, text, tokenizer=tok, model_id="smollm2-135m")
    cal = kvq.calibrate.learn_clipping(model, text, "int2-kivi", cal, tokenizer=tok)
    cal.save("smollm2-135m.kvcal.npz")                      # ship it beside the spec
    cal = kvq.calibrate.load("smollm2-135m.kvcal.npz")
    kv = cal.spec("int4")                                     # static per-channel scales, one spec per layer
    kv = cal.spec("int2-kivi", learned=True)                  # + learned clip ratios
    out = kvq.generate(model, prompt, 64, kv=kv)
    kv = kvq.calibrate.policy(model, text, budget_bits=5.0, tokenizer=tok)   # mixed per-layer formats

What the pieces are:

* Statistics (`collect_stats`): the model runs over calibration windows; at each layer
  the keys after RoPE and the values that the cache would receive (rounded to the cache's
  bf16, as `kvq.append` does) are reduced per (layer, KV head, channel) to min, max,
  absmax, mean, rms and two percentiles. They live in a `Calibration`, saved as one
  ``.npz`` file (arrays plus a JSON header naming the model, shapes and learned entries).
* Static scales (`Calibration.static`, `Calibration.spec`): per (KV head, channel) a shift
  (the midpoint of the percentile range) and a divisor (half that range, to the power
  ``alpha``, normalized to geometric mean 1 per head) in a `kvq_jax.spec.StaticScales`
  attached to each layer's KVSpec: the cache stores ``(x - shift) / scale`` with its
  usual dynamic scales, and attention folds the inverse into q, the log-sum-exp and the
  output (see `StaticScales`). Per-token scales then see channels of equal range instead
  of a few outlier channels setting every group's scale.
* Learned clip ratios (`learn_clipping`): per layer, a key and a value clip ratio that
  shrink each quantization group's dynamic range, chosen by optax (Adam from the best
  point of a coarse grid) to minimize the error of the layer's attention output after
  its output projection, on calibration queries, through a straight-through
  fake-quantizer (`kvq_jax.quant.fake_quantize`).
* Sensitivity (`sensitivity`): per layer and candidate format, the mean KL of the
  model's next-token distribution when only that layer's keys (or only its values) are
  stored in that format and every other layer stays bf16, through the real cache path:
  the first half of each window is prefilled, the second half appended and attended in
  one chunk.
* Policy (`choose`, `policy`): one (key format, value format) per layer that meets an
  average bits-per-element budget with the least summed measured KL: an exact
  multiple-choice knapsack over the measured sensitivities (KL taken as additive over
  layers and tensors). The result is a `Policy`, a tuple of KVSpec usable as ``kv=``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax import quant
from kvq_jax.attention import attend
from kvq_jax.cache import append, init_cache, prescale
from kvq_jax.nn import causal_attention, resolve_policy
from kvq_jax.spec import KVSpec, StaticScales, TensorSpec, bytes_per_token

FILE_FORMAT = "kvq-calibration"
FILE_VERSION = 1
STAT_NAMES = ("min", "max", "absmax", "mean", "rms", "lo", "hi")

_BF = dict(token_group=32, residual=128, scale_dtype="bf16")
# Candidate formats of `sensitivity` / `policy`: KIVI-style layouts at 8, 4 and 2 bits,
# all with the same residual window so that keys of one and values of another combine.
DEFAULT_FORMATS: dict[str, KVSpec] = {
    "int8": KVSpec(k=TensorSpec("int8"), v=TensorSpec("int8"), **_BF),
    "int4": KVSpec(k=TensorSpec("int4", "channel", None, False), v=TensorSpec("int4", "token", 32, False), **_BF),
    "int2": KVSpec(k=TensorSpec("int2", "channel", None, False), v=TensorSpec("int2", "token", 32, False), **_BF),
}


# ----------------------------------------------------------------------------- inputs


def _tokens(tokens_or_text, tokenizer) -> np.ndarray:
    """``int32[N]`` from token ids, or from text with a tokenizer."""
    from kvq_jax.eval.perplexity import tokenize

    if isinstance(tokens_or_text, str):
        if tokenizer is None:
            raise ValueError("tokenizer: required when tokens_or_text is a text")
        return tokenize(tokenizer, tokens_or_text)
    return tokenize(tokens_or_text)


def _windows(tokens, context, windows, granule=1) -> np.ndarray:
    from kvq_jax.eval.perplexity import make_windows

    if not isinstance(context, (int, np.integer)) or context < 2 or context % granule:
        raise ValueError(f"context: expected an int >= 2 divisible by {granule}, got {context!r}")
    if windows is not None and (not isinstance(windows, (int, np.integer)) or windows < 1):
        raise ValueError(f"windows: expected a positive int or None, got {windows!r}")
    return make_windows(tokens, int(context), windows)


def _check_model(model):
    for attr in ("layers", "embed", "num_layers", "num_kv_heads", "head_dim"):
        if not hasattr(model, attr):
            raise TypeError(f"model: expected a kvq_jax.models.LlamaModel, got {type(model).__name__}")


# ----------------------------------------------------------------------------- running one block


@partial(jax.jit, static_argnums=0)
def _block_qkv(graphdef, state, x, positions):
    """One block on full-precision K/V: x ``[B, T, d]`` -> (y, q, k, v) with the layer's q, k, v."""
    block = nnx.merge(graphdef, state)
    q, k, v = block.attn.qkv(block.attn_norm(x), positions)
    y, _ = block(x, positions, None, prefill=False, lengths=None, impl=None)
    return y, q, k, v


@partial(jax.jit, static_argnums=(0, 5, 6))
def _block_cached(graphdef, state, x, positions, cache, prefill, impl):
    """One block through its cache: (y ``[B, T, d]``, cache)."""
    block = nnx.merge(graphdef, state)
    return block(x, positions, cache, prefill=prefill, lengths=None, impl=impl)


def _logp(graphdef, state, h):
    """Final norm and head: h ``[B, T, d]`` -> log-probs ``f32[B, T, V]``."""
    model = nnx.merge(graphdef, state)
    return jax.nn.log_softmax(model.logits(model.norm(h)), axis=-1)


_head_logp = jax.jit(_logp, static_argnums=0)


@partial(jax.jit, static_argnums=0)
def _head_kl(graphdef, state, h, ref_logp):
    """Mean over tokens of KL(ref || model(h)): h ``[B, T, d]``, ref_logp ``f32[B, T, V]``."""
    logp = _logp(graphdef, state, h)
    return jnp.mean(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1))


class _Blocks:
    """A model split into one graph and per-layer states, so that one compiled block serves every layer."""

    def __init__(self, model):
        _check_model(model)
        self.model = model
        self.graphdef = nnx.split(model.layers[0])[0]
        self.states = [nnx.split(b)[1] for b in model.layers]
        self.head = nnx.split(model)

    def embed(self, tokens):
        """int ``[B, T]`` -> ``[B, T, d]``."""
        return self.model.embed(jnp.asarray(tokens, jnp.int32))

    def walk(self, tokens):
        """Yield ``(i, q, k, v)`` per layer for windows ``int[B, C]``: q ``f32[B, C, Hq, D]``,
        k, v ``f32[B, C, Hkv, D]`` (K after RoPE; K and V rounded to bf16 as the cache stores them)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        B, C = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None], (B, C))
        x = self.embed(tokens)
        for i, st in enumerate(self.states):
            x, q, k, v = _block_qkv(self.graphdef, st, x, pos)
            rb = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
            yield i, q, rb(k), rb(v)


# ----------------------------------------------------------------------------- calibration


class Policy(tuple):
    """A per-layer tuple of `KVSpec` with a name: ``str(policy)`` is the name.

    Usable wherever a per-layer policy is (``kv=`` of `kvq.generate`, `LlamaModel.init_caches`,
    `kvq.eval.perplexity.evaluate`, which reports it under its name).
    """

    def __new__(cls, specs, name: str = "policy"):
        specs = tuple(KVSpec.parse(s) for s in specs)
        if not specs:
            raise ValueError("specs: expected at least one KVSpec")
        obj = super().__new__(cls, specs)
        obj.name = str(name)
        return obj

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, {len(self)} layers)"

    def bits_per_element(self, head_dim: int) -> float:
        """Average stored bits per K/V element of the quantized bodies over the layers."""
        return float(np.mean([s.bits_per_element(head_dim) for s in self]))


@dataclasses.dataclass
class Calibration:
    """Per-layer, per-KV-head, per-channel statistics of one model's keys and values,
    and learned clip ratios; saved and loaded as one ``.npz`` file.

    Attributes:
      model_id: the model the statistics belong to (checked by name only).
      stats: ``{"k_min", "k_max", "k_absmax", "k_mean", "k_rms", "k_lo", "k_hi", and
        the same for "v_"}``, each ``f32[L, Hkv, D]``: over every calibration token,
        the channel's min, max, max |x|, mean, root mean square, and the
        ``percentile``-th lower and upper percentiles. Keys are after RoPE.
      percentile: the upper percentile of "lo" / "hi" (lower: ``100 - percentile``).
      tokens: calibration tokens the statistics cover.
      learned: ``{name: {"base": spec string, "smooth": str, "static_kw": dict, "k_clip": f32[L],
        "v_clip": f32[L], "objective_before": f32[L], "objective_after": f32[L]}}`` from
        `learn_clipping`.
      info: free-form provenance (text name, context, windows).
    """

    model_id: str
    stats: dict
    percentile: float = 99.9
    tokens: int = 0
    learned: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    # -- shapes ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(L, Hkv, D)``."""
        return tuple(int(n) for n in self.stats["k_absmax"].shape)

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    def check(self, model) -> None:
        """Raise ValueError unless the statistics fit ``model`` (layers, KV heads, head_dim)."""
        want = (model.num_layers, model.num_kv_heads, model.head_dim)
        if self.shape != want:
            raise ValueError(f"model: the calibration is for (layers, kv heads, head_dim) = {self.shape}, "
                             f"the model has {want}")

    @property
    def digest(self) -> str:
        """8 hex digits identifying the statistics (and learned entries)."""
        h = hashlib.sha256(self.model_id.encode())
        for k in sorted(self.stats):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.stats[k], np.float32).tobytes())
        for k in sorted(self.learned):
            for f in ("k_clip", "v_clip"):
                h.update(np.ascontiguousarray(self.learned[k][f], np.float32).tobytes())
        return h.hexdigest()[:8]

    # -- static scales ---------------------------------------------------------
    def channel_params(self, tensor: str, alpha: float = 1.0, shift: bool = True):
        """Per-channel divisor and shift of ``tensor`` ("k" or "v") from the statistics.

        shift = midpoint of the channel's [lo, hi] percentile range (0 when ``shift`` is
        False); divisor = (half that range, or the absolute percentile bound without a
        shift) ** ``alpha``, normalized to geometric mean 1 within each KV head (a per-head
        constant does not change what dynamic scales store). ``alpha`` = 1 equalizes the
        channels' ranges, 0 leaves them as they are.

        Returns:
          ``(scale, shift)``, each ``f32[L, Hkv, D]`` (shift None when ``shift`` is False).
        """
        if tensor not in ("k", "v"):
            raise ValueError(f"tensor: expected 'k' or 'v', got {tensor!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
        lo = self.stats[f"{tensor}_lo"].astype(np.float64)
        hi = self.stats[f"{tensor}_hi"].astype(np.float64)
        if shift:
            mid = 0.5 * (lo + hi)
            half = 0.5 * (hi - lo)
        else:
            mid = None
            half = np.maximum(np.abs(lo), np.abs(hi))
        floor = 1e-3 * np.max(half, axis=-1, keepdims=True) + 1e-12
        r = np.maximum(half, floor) ** float(alpha)
        r = r / np.exp(np.mean(np.log(r), axis=-1, keepdims=True))
        return r.astype(np.float32), (None if mid is None else mid.astype(np.float32))

    def static(self, layer: int, smooth: str = "kv", *, k_alpha: float = 1.0, v_alpha: float = 0.5,
               k_shift: bool = True, v_shift: bool = False, k_clip: float = 1.0, v_clip: float = 1.0,
               tag: str | None = None) -> StaticScales:
        """The `StaticScales` of one layer.

        Args:
          layer: layer index.
          smooth: which tensors get per-channel scales (and shifts): "kv", "k", "v" or "".
          k_alpha, v_alpha, k_shift, v_shift: as `channel_params`.
          k_clip, v_clip: clip ratios in (0, 1].
          tag: name shown by ``str(spec)`` (default "cal-<digest>").
        """
        if smooth not in ("kv", "k", "v", ""):
            raise ValueError(f"smooth: expected 'kv', 'k', 'v' or '', got {smooth!r}")
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        kw = {}
        if "k" in smooth:
            s, z = self.channel_params("k", k_alpha, k_shift)
            kw.update(k_scale=s[layer], k_shift=None if z is None else z[layer])
        if "v" in smooth:
            s, z = self.channel_params("v", v_alpha, v_shift)
            kw.update(v_scale=s[layer], v_shift=None if z is None else z[layer])
        return StaticScales(**kw, k_clip=float(k_clip), v_clip=float(v_clip),
                            tag=tag or f"cal-{self.digest}")

    def spec(self, base, smooth: str = "kv", *, learned: bool | str = False, name: str | None = None,
             **static_kw) -> Policy:
        """One KVSpec per layer: ``base`` with this calibration's static scales.

        Args:
          base: a preset name, canonical spec string or KVSpec (the same for every layer),
            or a per-layer sequence of them.
          smooth: "kv", "k", "v" or "" (only clip ratios), as `static`.
          learned: False, True (the entry `learn_clipping` stored for ``base``) or an
            entry name: use its clip ratios and its ``smooth`` and `static` settings.
          name: the policy's name (default "<base>+cal" or "<base>+learn").
          static_kw: further arguments of `static` (alpha, shifts, clips).

        Returns:
          a `Policy` of ``num_layers`` KVSpecs.
        """
        L = self.num_layers
        specs = resolve_policy(base, L)
        entry = None
        if learned:
            key = _base_name(base) if learned is True else str(learned)
            if key not in self.learned:
                raise ValueError(f"learned: no learned entry {key!r}; have {sorted(self.learned)}")
            entry = self.learned[key]
            smooth = entry["smooth"]
            static_kw = {**entry.get("static_kw", {}), **static_kw}
        out = []
        for i, s in enumerate(specs):
            kw = dict(static_kw)
            if entry is not None:
                kw.update(k_clip=float(entry["k_clip"][i]), v_clip=float(entry["v_clip"][i]))
                kw.setdefault("tag", f"learn-{self.digest}")
            out.append(dataclasses.replace(s, static=self.static(i, smooth, **kw)))
        suffix = "learn" if entry is not None else ("cal" if smooth else "clip")
        return Policy(out, name or f"{_base_name(base)}+{suffix}")

    # -- file ------------------------------------------------------------------
    def save(self, path) -> str:
        """Write one ``.npz`` file: the statistics, learned clip ratios and a JSON header."""
        header = {"format": FILE_FORMAT, "version": FILE_VERSION, "model": self.model_id,
                  "shape": list(self.shape), "percentile": self.percentile, "tokens": int(self.tokens),
                  "info": self.info, "digest": self.digest,
                  "learned": {k: {f: (v.tolist() if isinstance(v, np.ndarray) else v) for f, v in e.items()
                                  if f not in ("k_clip", "v_clip")} for k, e in self.learned.items()}}
        arrays = {f"stat.{k}": np.asarray(v, np.float32) for k, v in self.stats.items()}
        for i, (k, e) in enumerate(sorted(self.learned.items())):
            header["learned"][k]["index"] = i
            arrays[f"learned.{i}.k_clip"] = np.asarray(e["k_clip"], np.float32)
            arrays[f"learned.{i}.v_clip"] = np.asarray(e["v_clip"], np.float32)
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = str(path)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return path


def _base_name(base) -> str:
    """The name a base spec (or policy) is known by: its preset name or canonical string."""
    if isinstance(base, (str, KVSpec)):
        return str(KVSpec.parse(base))
    return str(base) if isinstance(base, Policy) else "per-layer"


def load(path) -> Calibration:
    """Read a file written by `Calibration.save`."""
    with np.load(str(path), allow_pickle=False) as z:
        if "header" not in z.files:
            raise ValueError(f"path: {path} is not a kvq calibration file (no header)")
        header = json.loads(bytes(z["header"]).decode())
        if header.get("format") != FILE_FORMAT:
            raise ValueError(f"path: {path} is not a kvq calibration file (format {header.get('format')!r})")
        if header.get("version") != FILE_VERSION:
            raise ValueError(f"path: {path} has version {header.get('version')}, expected {FILE_VERSION}")
        stats = {k[5:]: np.asarray(z[k]) for k in z.files if k.startswith("stat.")}
        learned = {}
        for name, e in header["learned"].items():
            i = e.pop("index")
            e = {f: (np.asarray(v, np.float32) if f.startswith("objective") else v) for f, v in e.items()}
            e["k_clip"] = np.asarray(z[f"learned.{i}.k_clip"])
            e["v_clip"] = np.asarray(z[f"learned.{i}.v_clip"])
            learned[name] = e
    missing = [f"{t}_{n}" for t in "kv" for n in STAT_NAMES if f"{t}_{n}" not in stats]
    if missing:
        raise ValueError(f"path: {path} lacks statistics {missing}")
    return Calibration(model_id=header["model"], stats=stats, percentile=float(header["percentile"]),
                       tokens=int(header["tokens"]), learned=learned, info=header.get("info", {}))


def collect_stats(model, tokens_or_text, *, tokenizer=None, context: int = 2048, windows: int | None = 4,
                  batch_size: int = 2, percentile: float = 99.9, model_id: str | None = None,
                  max_samples: int = 32768) -> Calibration:
    """Per-layer, per-KV-head, per-channel statistics of K (after RoPE) and V on calibration text.

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      tokens_or_text: token ids ``int[N]``, or a text (then ``tokenizer`` is required).
      tokenizer: encodes a text (no special tokens).
      context: tokens per window (every window starts at position 0).
      windows: windows spread over the tokens (None: every whole window).
      batch_size: windows per compiled call.
      percentile: "hi" is this percentile of each channel, "lo" the ``100 - percentile``-th.
      model_id: stored name of the model (default: from its shapes).
      max_samples: the percentiles are computed on at most this many tokens, evenly
        strided (min, max, absmax, mean, rms use every token).

    Returns:
      a `Calibration` with ``stats`` of shape ``f32[L, Hkv, D]`` each.
    """
    _check_model(model)
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile: expected a number in (50, 100], got {percentile!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    tokens = _tokens(tokens_or_text, tokenizer)
    wins = _windows(tokens, context, windows)
    blocks = _Blocks(model)
    L, H, D = model.num_layers, model.num_kv_heads, model.head_dim
    acc = {t: {"min": np.full((L, H, D), np.inf), "max": np.full((L, H, D), -np.inf),
               "sum": np.zeros((L, H, D)), "sq": np.zeros((L, H, D)), "samples": [[] for _ in range(L)]}
           for t in "kv"}
    n_tok = wins.size
    stride = max(1, -(-n_tok // max_samples))
    for b0 in range(0, wins.shape[0], batch_size):
        wb = wins[b0:b0 + batch_size]
        for i, _, k, v in blocks.walk(wb):
            for t, x in (("k", k), ("v", v)):
                x = np.asarray(x, np.float64).reshape(-1, H, D)  # [B*C, H, D]
                a = acc[t]
                a["min"][i] = np.minimum(a["min"][i], x.min(0))
                a["max"][i] = np.maximum(a["max"][i], x.max(0))
                a["sum"][i] += x.sum(0)
                a["sq"][i] += (x * x).sum(0)
                a["samples"][i].append(x[::stride].astype(np.float32))
    stats = {}
    for t in "kv":
        a = acc[t]
        stats[f"{t}_min"], stats[f"{t}_max"] = a["min"], a["max"]
        stats[f"{t}_absmax"] = np.maximum(np.abs(a["min"]), np.abs(a["max"]))
        stats[f"{t}_mean"] = a["sum"] / n_tok
        stats[f"{t}_rms"] = np.sqrt(a["sq"] / n_tok)
        samples = [np.concatenate(s, 0) for s in a["samples"]]  # L x [N', H, D]
        stats[f"{t}_hi"] = np.stack([np.percentile(s, percentile, axis=0) for s in samples])
        stats[f"{t}_lo"] = np.stack([np.percentile(s, 100.0 - percentile, axis=0) for s in samples])
    stats = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    c = model.config
    mid = model_id or f"llama-{c.n_layers}L-d{c.d_model}-kv{c.n_kv_heads}x{c.head_dim}"
    return Calibration(model_id=mid, stats=stats, percentile=float(percentile), tokens=int(n_tok),
                       info={"context": int(context), "windows": int(wins.shape[0])})


# ----------------------------------------------------------------------------- attention-output error


def _quant_tensor(x, spec: KVSpec, which: str, clip, sc=None, zs=None, exact_tail: int = 0):
    """Fake-quantize K or V ``f32[B, C, Hkv, D]`` as the cache would store it under ``spec``.

    The write path of `kvq.append` (per-channel shift ``zs`` and scale ``sc``, each None or
    ``[Hkv, D]``, rotation, quantization with the clip ratio ``clip``) through
    `quant.fake_quantize`, mapped back to the model's basis; the last ``exact_tail``
    tokens stay exact (the cache's bf16 residual window). ``spec.static`` is not read.
    """
    t = getattr(spec, which)
    if not t.quantized:
        return x
    xt = jnp.swapaxes(x, 1, 2)  # [B, H, C, D]
    y = prescale(xt, sc, zs)
    if spec.rotate:
        y = quant.rotate(y)
    y = quant.fake_quantize(y, t, scale_dtype=spec.scale_dtype,
                            token_group=spec.token_group if t.axis == "channel" else None, clip=clip)
    if spec.rotate:
        y = quant.rotate(y, inverse=True)
    if sc is not None:
        y = y * jnp.asarray(sc)[None, :, None, :]
    if zs is not None:
        y = y + jnp.asarray(zs)[None, :, None, :]
    if exact_tail:
        C = xt.shape[2]
        keep = (jnp.arange(C) >= C - exact_tail)[None, None, :, None]
        y = jnp.where(keep, xt, y)
    return jnp.swapaxes(y, 1, 2)


def _proxy_loss(spec, queries, clips, q, k, v, wo, chan):
    """Normalized squared error of the projected attention output of the last ``queries``
    positions, keys/values fake-quantized with clip ratios ``clips = (k_clip, v_clip)``
    and per-channel ``chan = (k_scale, k_shift, v_scale, v_shift)`` (each None or [Hkv, D])."""
    B, C = k.shape[:2]
    tail = spec.residual
    kq = _quant_tensor(k, spec, "k", clips[0], chan[0], chan[1], tail)
    vq = _quant_tensor(v, spec, "v", clips[1], chan[2], chan[3], tail)
    pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None], (B, C))
    qs, qpos = q[:, C - queries:], pos[:, C - queries:]
    hi = jax.lax.Precision.HIGHEST
    ref = causal_attention(qs, k, v, qpos, pos, precision=hi)
    out = causal_attention(qs, kq, vq, qpos, pos, precision=hi)
    d = (out - ref).reshape(B, queries, -1) @ wo
    r = ref.reshape(B, queries, -1) @ wo
    return jnp.mean(d * d) / jnp.maximum(jnp.mean(r * r), 1e-30)


_proxy_value = jax.jit(_proxy_loss, static_argnums=(0, 1))
_proxy_grad = jax.jit(jax.value_and_grad(_proxy_loss, argnums=2), static_argnums=(0, 1))


@partial(jax.jit, static_argnums=4)
def _append_attend(cache, k, v, q, impl):
    """Append k, v ``[B, C, Hkv, D]`` to an empty cache, then attend with q ``[B, T, Hq, D]`` (the last T)."""
    return attend(q, append(cache, k, v), impl=impl).astype(jnp.float32)


def _wo(model, i):
    return model.layers[i].attn.o_proj.kernel[...].astype(jnp.float32)


def attention_error(model, tokens_or_text, kv, *, tokenizer=None, context: int = 1024, windows: int | None = 2,
                    queries: int = 256, impl: str = "auto") -> np.ndarray:
    """Per-layer error of the attention output through the real cache path.

    For each layer i, the calibration windows' keys and values are appended to a cache
    of ``kv[i]`` (`kvq.append`, as a prefill stores them) and the last ``queries``
    positions attend through it (`kvq.attend`); the error is
    ``mean((o - o_ref) @ Wo)^2 / mean((o_ref @ Wo)^2)`` against full-precision attention,
    with ``Wo`` the layer's output projection.

    Returns:
      ``f64[L]``.
    """
    _check_model(model)
    L = model.num_layers
    policy = resolve_policy(kv, L)
    if not isinstance(queries, int) or not 1 <= queries <= context:
        raise ValueError(f"queries: expected an int in [1, context={context}], got {queries!r}")
    wins = _windows(_tokens(tokens_or_text, tokenizer), context, windows)
    blocks = _Blocks(model)
    H, D = model.num_kv_heads, model.head_dim
    num, den = np.zeros(L), np.zeros(L)
    for i, q, k, v in blocks.walk(wins):
        B, C = k.shape[:2]
        qs = q[:, C - queries:]
        o = _append_attend(init_cache(policy[i], B, C, H, D, dtype=jnp.float32), k, v, qs, impl)
        pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None], (B, C))
        ref = causal_attention(qs, k, v, pos[:, C - queries:], pos, precision=jax.lax.Precision.HIGHEST)
        wo = _wo(model, i)
        d = (o - ref).reshape(B, queries, -1) @ wo
        r = ref.reshape(B, queries, -1) @ wo
        num[i] += float(jnp.sum(d * d))
        den[i] += float(jnp.sum(r * r))
    return num / np.maximum(den, 1e-30)


def learn_clipping(model, tokens_or_text, base, calibration: Calibration | None = None, *, tokenizer=None,
                   smooth: str = "kv", context: int = 1024, windows: int | None = 2, queries: int = 256,
                   steps: int = 40, learning_rate: float = 0.01, min_clip: float = 0.3,
                   grid: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), name: str | None = None,
                   progress: bool = False, **static_kw) -> Calibration:
    """Learn a key and a value clip ratio per layer for ``base`` with optax.

    Objective per layer: the normalized squared error of the layer's attention output
    after its output projection (``mean((o - o_ref) @ Wo)^2 / mean((o_ref @ Wo)^2)``) for
    the last ``queries`` positions of each calibration window, with keys and values
    fake-quantized as a ``base`` cache (with this calibration's static scales when
    ``smooth``) stores them (`quant.fake_quantize`, straight-through rounding; the last
    ``base.residual`` tokens stay exact, as the cache's bf16 window). Start: the best
    point of ``grid`` (both ratios on it); then ``steps`` Adam steps, ratios kept in
    ``[min_clip, 1]``; the start is kept when Adam ends worse.

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      tokens_or_text: calibration tokens, or text with ``tokenizer``.
      base: the spec (preset name, canonical string or KVSpec) the ratios are for.
      calibration: a `Calibration` of this model (from `collect_stats`); required when
        ``smooth`` is not "" (its static scales are part of the objective).
      smooth: "kv", "k", "v" or "": which tensors also get static per-channel scales.
      context, windows: calibration windows; queries: scored positions per window.
      steps, learning_rate, min_clip, grid: the optimization.
      name: the entry's name in ``calibration.learned`` (default: ``str(base)``).
      static_kw: further arguments of `Calibration.static` (alphas, shifts).

    Returns:
      the calibration (a new one holding no statistics of its own when None was given
      and ``smooth`` is ""), with ``learned[name]`` = ``{"base", "smooth", "k_clip",
      "v_clip", "objective_before", "objective_after"}``; objective_before is the
      objective with plain dynamic scales (ratios 1, same static scales).
    """
    import optax

    _check_model(model)
    spec0 = KVSpec.parse(base)
    if not spec0.quantized:
        raise ValueError(f"base: {base!r} stores nothing quantized; there is nothing to clip")
    if smooth and calibration is None:
        raise ValueError("calibration: required when smooth is not '' (static scales are part of the objective)")
    if calibration is not None:
        calibration.check(model)
    if not isinstance(queries, int) or not 1 <= queries <= context:
        raise ValueError(f"queries: expected an int in [1, context={context}], got {queries!r}")
    if not 0.0 < float(min_clip) <= 1.0:
        raise ValueError(f"min_clip: expected a ratio in (0, 1], got {min_clip!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    grid = [float(g) for g in grid]
    if not grid or any(not min_clip <= g <= 1.0 for g in grid):
        raise ValueError(f"grid: expected ratios in [min_clip={min_clip}, 1], got {grid}")
    granule = spec0.token_group if spec0.channel_keys else 1
    wins = _windows(_tokens(tokens_or_text, tokenizer), context, windows, granule)
    L = model.num_layers
    if calibration is None:
        c = model.config
        calibration = Calibration(model_id=f"llama-{c.n_layers}L-d{c.d_model}-kv{c.n_kv_heads}x{c.head_dim}",
                                  stats={})
    blocks = _Blocks(model)
    opt = optax.adam(learning_rate)
    lo = float(min_clip)
    k_clip, v_clip, before, after = (np.ones(L), np.ones(L), np.zeros(L), np.zeros(L))

    spec_plain = dataclasses.replace(spec0, static=None)
    for i, q, k, v in blocks.walk(wins):
        chan = (None,) * 4
        if smooth:
            st = calibration.static(i, smooth, **static_kw)
            chan = tuple(None if a is None else jnp.asarray(a)
                         for a in (st.array("k_scale"), st.array("k_shift"), st.array("v_scale"),
                                   st.array("v_shift")))
        args = (q, k, v, _wo(model, i), chan)

        def loss(c):
            return float(_proxy_value(spec_plain, queries, jnp.asarray(c, jnp.float32), *args))

        before[i] = loss([1.0, 1.0])
        best, best_c = before[i], np.ones(2)
        for which in ((0,) if spec0.k.quantized else ()) + ((1,) if spec0.v.quantized else ()):
            start = best_c.copy()
            for g in grid:  # one ratio at a time on the grid, the other at its best so far
                c = start.copy()
                c[which] = g
                val = loss(c)
                if val < best:
                    best, best_c = val, c
        params = jnp.asarray(best_c, jnp.float32)
        state = opt.init(params)
        for _ in range(steps):
            val, g = _proxy_grad(spec_plain, queries, params, *args)
            if float(val) < best:
                best, best_c = float(val), np.asarray(params)
            upd, state = opt.update(g, state, params)
            params = jnp.clip(optax.apply_updates(params, upd), lo, 1.0)
        val = loss(params)
        if val < best:
            best, best_c = val, np.asarray(params)
        k_clip[i], v_clip[i] = float(best_c[0]), float(best_c[1])
        after[i] = best
        if progress:
            print(f"layer {i}: objective {before[i]:.3e} -> {after[i]:.3e} (k_clip {k_clip[i]:.3f}, "
                  f"v_clip {v_clip[i]:.3f})", file=sys.stderr, flush=True)
    key = name or _base_name(base)
    calibration.learned[key] = {"base": str(spec0), "smooth": smooth, "static_kw": dict(static_kw),
                                "k_clip": k_clip.astype(np.float32),
                                "v_clip": v_clip.astype(np.float32),
                                "objective_before": before.astype(np.float32),
                                "objective_after": after.astype(np.float32)}
    return calibration


# ----------------------------------------------------------------------------- sensitivity and policy


def _only(spec: KVSpec, which: str) -> KVSpec:
    """``spec`` with the other tensor stored bf16."""
    bf = TensorSpec()
    return dataclasses.replace(spec, v=bf) if which == "k" else dataclasses.replace(spec, k=bf)


def combine(kspec: KVSpec, vspec: KVSpec) -> KVSpec:
    """A layer spec with the keys of ``kspec`` and the values of ``vspec``.

    The two must agree on everything else (token_group, residual, sinks, rotate,
    scale_dtype, static); raises ValueError naming the field otherwise.
    """
    for f in ("token_group", "residual", "sinks", "rotate", "scale_dtype", "static"):
        if getattr(kspec, f) != getattr(vspec, f):
            raise ValueError(f"formats: candidate formats must share {f} to combine keys of one with values "
                             f"of another; got {getattr(kspec, f)!r} and {getattr(vspec, f)!r}")
    return dataclasses.replace(kspec, v=vspec.v)


def tensor_bits(spec: KVSpec, which: str, head_dim: int) -> float:
    """Stored bits per element of the keys (``which`` = "k") or values of ``spec``'s body, scales included."""
    if which not in ("k", "v"):
        raise ValueError(f"which: expected 'k' or 'v', got {which!r}")
    only = _only(KVSpec.parse(spec), which)
    total = bytes_per_token(only, 1, 1, head_dim) * 8
    return (total - 16 * head_dim) / head_dim


def _formats(formats) -> dict[str, KVSpec]:
    if not isinstance(formats, Mapping):
        if isinstance(formats, (str, KVSpec)) or not isinstance(formats, Sequence):
            raise ValueError("formats: expected a mapping {name: spec} or a sequence of specs")
        formats = {str(KVSpec.parse(f)): f for f in formats}
    out = {str(n): KVSpec.parse(s) for n, s in formats.items()}
    if len(out) < 1:
        raise ValueError("formats: expected at least one candidate format")
    names = list(out)
    for a in names[1:]:
        combine(out[names[0]], out[a])  # raises when they cannot be combined
    return out


@dataclasses.dataclass
class Sensitivity:
    """Measured per-layer loss of each candidate format, keys and values separately.

    Attributes:
      formats: ``{name: KVSpec}`` candidates (keys of one combine with values of another).
      kl_k, kl_v: ``f64[L, F]``: mean KL(p_bf16 || p) in nats per scored token when only
        layer i's keys (values) are stored in format f and everything else is bf16.
      head_dim: D of the model (for bit counts).
      tokens: scored tokens per measurement.
    """

    formats: dict
    kl_k: np.ndarray
    kl_v: np.ndarray
    head_dim: int
    tokens: int = 0

    @property
    def num_layers(self) -> int:
        return int(self.kl_k.shape[0])

    def bits(self, which: str) -> np.ndarray:
        """``f64[F]`` bits per element of the keys (or values) of each format."""
        return np.array([tensor_bits(s, which, self.head_dim) for s in self.formats.values()])

    def to_json(self) -> dict:
        return {"formats": {n: str(s) for n, s in self.formats.items()}, "kl_k": self.kl_k.tolist(),
                "kl_v": self.kl_v.tolist(), "head_dim": self.head_dim, "tokens": self.tokens,
                "bits_k": self.bits("k").tolist(), "bits_v": self.bits("v").tolist()}


def sensitivity(model, tokens_or_text, formats=None, *, tokenizer=None, context: int = 1024,
                windows: int | None = 1, impl: str = "auto", progress: bool = False) -> Sensitivity:
    """Per-layer KL contribution of each candidate format, keys and values separately.

    Per window: the first half is prefilled into bf16 caches (every layer) and the second
    half appended and attended through them in one chunk; its next-token log-probs are
    the reference. Then for each layer i, format f and tensor (keys or values): layer i
    gets a cache storing only that tensor in format f (the other in bf16), is prefilled
    and run on the chunk again, the later layers reuse their bf16 prompt caches, and the
    mean KL(p_ref || p) over the chunk's tokens is recorded.

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      tokens_or_text: calibration tokens, or text with ``tokenizer``.
      formats: ``{name: KVSpec}`` or a sequence of specs (default `DEFAULT_FORMATS`); all
        must share token_group, residual, sinks, rotate, scale_dtype and static.
      context: tokens per window (half prompt, half scored chunk); windows: how many.
      impl: attention implementation over the caches.
      progress: print one line per layer to stderr.

    Returns:
      a `Sensitivity`.
    """
    _check_model(model)
    fmts = _formats(DEFAULT_FORMATS if formats is None else formats)
    wins = _windows(_tokens(tokens_or_text, tokenizer), context, windows)
    blocks = _Blocks(model)
    L, H, D = model.num_layers, model.num_kv_heads, model.head_dim
    F = len(fmts)
    kl = {"k": np.zeros((L, F)), "v": np.zeros((L, F))}
    W, C = wins.shape
    P = C // 2
    gd, sts = blocks.graphdef, blocks.states
    hgd, hst = blocks.head
    for w in range(W):
        t0 = time.perf_counter()
        tok = wins[w:w + 1]
        pos_p = jnp.arange(P, dtype=jnp.int32)[None]
        pos_c = P + jnp.arange(C - P, dtype=jnp.int32)[None]
        xp, xc = blocks.embed(tok[:, :P]), blocks.embed(tok[:, P:])
        xp_in, xc_in, prompt_caches = [], [], []
        for j in range(L):
            cache = init_cache(KVSpec(), 1, C, H, D)
            xp_in.append(xp)
            xp, cache = _block_cached(gd, sts[j], xp, pos_p, cache, True, impl)
            prompt_caches.append(cache)
            xc_in.append(xc)
            xc, _ = _block_cached(gd, sts[j], xc, pos_c, cache, False, impl)
        ref = _head_logp(hgd, hst, xc)
        for i in range(L):
            for fi, spec in enumerate(fmts.values()):
                for which in ("k", "v"):
                    s = _only(spec, which)
                    if not getattr(s, which).quantized:
                        continue
                    cache = init_cache(s, 1, C, H, D)
                    _, cache = _block_cached(gd, sts[i], xp_in[i], pos_p, cache, True, impl)
                    x, _ = _block_cached(gd, sts[i], xc_in[i], pos_c, cache, False, impl)
                    for j in range(i + 1, L):
                        x, _ = _block_cached(gd, sts[j], x, pos_c, prompt_caches[j], False, impl)
                    kl[which][i, fi] += float(_head_kl(hgd, hst, x, ref)) / W
            if progress:
                print(f"window {w} layer {i}: KL k " + " ".join(f"{n}={kl['k'][i, f]:.2e}" for f, n in enumerate(fmts))
                      + " | v " + " ".join(f"{n}={kl['v'][i, f]:.2e}" for f, n in enumerate(fmts)),
                      file=sys.stderr, flush=True)
        del ref
        if progress:
            print(f"window {w}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return Sensitivity(formats=fmts, kl_k=kl["k"], kl_v=kl["v"], head_dim=D, tokens=int(W * (C - P)))


def choose(sens: Sensitivity, budget_bits: float, *, name: str | None = None) -> Policy:
    """The per-layer (key format, value format) with the least summed measured KL whose
    average bits per element (over layers, keys and values) is at most ``budget_bits``.

    Exact: a multiple-choice knapsack over the 2L tensors (each takes one format), costs
    in exact bits per (token, head), solved by dynamic programming. Ties go to fewer bits.

    Returns:
      a `Policy` named "mixed<=<budget>b" (or ``name``).
    """
    if not isinstance(sens, Sensitivity):
        raise TypeError(f"sens: expected a Sensitivity, got {type(sens).__name__}")
    if not isinstance(budget_bits, (int, float)) or not math.isfinite(budget_bits) or budget_bits <= 0:
        raise ValueError(f"budget_bits: expected a positive number, got {budget_bits!r}")
    L, D = sens.num_layers, sens.head_dim
    specs = list(sens.formats.values())
    items = []  # (costs int[F], losses f64[F]) per tensor, layer-major: k0, v0, k1, v1, ...
    cost = {w: np.rint(sens.bits(w) * D).astype(np.int64) for w in "kv"}
    unit = int(np.gcd.reduce(np.concatenate([cost["k"], cost["v"]])))
    for i in range(L):
        items.append((cost["k"] // unit, sens.kl_k[i]))
        items.append((cost["v"] // unit, sens.kl_v[i]))
    cap = int(math.floor(budget_bits * D * 2 * L / unit + 1e-9))
    min_cost = sum(int(c.min()) for c, _ in items)
    if min_cost > cap:
        lowest = min_cost * unit / (D * 2 * L)
        raise ValueError(f"budget_bits: {budget_bits} is below the cheapest policy of these formats "
                         f"({lowest:.3f} bits per element)")
    INF = np.inf
    dp = np.full(cap + 1, INF)
    dp[0] = 0.0
    choice = []
    for c, loss in items:
        new = np.full(cap + 1, INF)
        arg = np.full(cap + 1, -1, np.int64)
        for f in range(len(c)):
            cf = int(c[f])
            if cf > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[cf:] = dp[:cap + 1 - cf] + loss[f]
            better = cand < new
            new[better], arg[better] = cand[better], f
        dp = new
        choice.append(arg)
    best = float(np.min(dp))
    end = int(np.flatnonzero(dp <= best + 1e-15 * max(1.0, abs(best)))[0])  # fewest bits among the best
    picks = []
    for (c, _), arg in zip(reversed(items), reversed(choice)):
        f = int(arg[end])
        picks.append(f)
        end -= int(c[f])
    picks = picks[::-1]
    out = [combine(specs[picks[2 * i]], specs[picks[2 * i + 1]]) for i in range(L)]
    names = list(sens.formats)
    policy = Policy(out, name or f"mixed<={budget_bits:g}b")
    policy.choices = [(names[picks[2 * i]], names[picks[2 * i + 1]]) for i in range(L)]
    policy.predicted_kl = best
    return policy


def policy(model, tokens_or_text, budget_bits: float, candidates=None, *, tokenizer=None,
           sens: Sensitivity | None = None, **sensitivity_kw) -> Policy:
    """Per-layer formats (keys and values separately) meeting ``budget_bits`` with the least measured loss.

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      tokens_or_text: calibration tokens, or text with ``tokenizer``.
      budget_bits: the average stored bits per K/V element allowed (scales included).
      candidates: formats as `sensitivity` takes them (default `DEFAULT_FORMATS`).
      sens: a `Sensitivity` already measured (then nothing runs).
      sensitivity_kw: arguments of `sensitivity` (context, windows, impl, progress).

    Returns:
      a `Policy` (tuple of KVSpec, one per layer) with ``choices`` (key, value format
      names per layer) and ``predicted_kl`` (the summed measured KL), usable as ``kv=``.
    """
    if sens is None:
        sens = sensitivity(model, tokens_or_text, candidates, tokenizer=tokenizer, **sensitivity_kw)
    return choose(sens, budget_bits)


# ----------------------------------------------------------------------------- CLI


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``kvq-jax calibrate`` arguments."""
    p = parser or argparse.ArgumentParser(
        prog="kvq-jax calibrate",
        description="Collect per-channel K/V statistics (and learned clip ratios) into a calibration file.")
    p.add_argument("--text", required=True, help="UTF-8 calibration text")
    p.add_argument("--out", required=True, help="the calibration file to write (.npz)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face directory")
    p.add_argument("--context", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--windows", type=int, default=4, help="calibration windows")
    p.add_argument("--percentile", type=float, default=99.9)
    p.add_argument("--learn", default="", help="comma-separated specs to learn clip ratios for (';' with '=')")
    p.add_argument("--smooth", default="kv", choices=("kv", "k", "v", "none"),
                   help="static per-channel scales in the learned entries")
    p.add_argument("--steps", type=int, default=40, help="Adam steps per layer")
    p.add_argument("--sensitivity", default=None, help="also measure per-layer sensitivity, write it here (JSON)")
    p.add_argument("--budget-bits", type=float, default=None, help="with --sensitivity: print the policy")
    return p


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> Calibration:
    """``kvq-jax calibrate``: write a calibration file (statistics, learned clip ratios)."""
    from kvq_jax.eval.perplexity import split_presets

    args = build_parser().parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if model is None:
        from kvq_jax.models.model import load_model

        model, tokenizer = load_model(args.model)
    model_id = args.model
    source = text if tokenizer is not None else np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    t0 = time.perf_counter()
    cal = collect_stats(model, source, tokenizer=tokenizer, context=args.context, windows=args.windows,
                        percentile=args.percentile, model_id=model_id)
    cal.info["text"] = args.text
    print(f"statistics: {cal.tokens} tokens, {time.perf_counter() - t0:.1f} s", flush=True)
    smooth = "" if args.smooth == "none" else args.smooth
    for base in (split_presets(args.learn) if args.learn else []):
        t1 = time.perf_counter()
        ctx = min(args.context, 1024)
        learn_clipping(model, source, base, cal, tokenizer=tokenizer, smooth=smooth, steps=args.steps,
                       context=ctx, queries=min(256, ctx))
        e = cal.learned[_base_name(base)]
        print(f"learned {base}: objective {np.mean(e['objective_before']):.3e} -> "
              f"{np.mean(e['objective_after']):.3e} (mean over layers), {time.perf_counter() - t1:.1f} s",
              flush=True)
    cal.save(args.out)
    print(f"wrote {args.out} (digest {cal.digest})")
    if args.sensitivity:
        sens = sensitivity(model, source, tokenizer=tokenizer, context=min(args.context, 2048))
        with open(args.sensitivity, "w", encoding="utf-8") as f:
            json.dump(sens.to_json(), f, indent=2)
        print(f"wrote {args.sensitivity}")
        if args.budget_bits:
            pol = choose(sens, args.budget_bits)
            print(f"policy <= {args.budget_bits} bits: {pol.bits_per_element(model.head_dim):.3f} bits/element, "
                  f"predicted KL {pol.predicted_kl:.3e}")
            for i, (kf, vf) in enumerate(pol.choices):
                print(f"  layer {i:2d}: k {kf:<6} v {vf}")
    return cal


__all__ = [
    "Calibration", "DEFAULT_FORMATS", "Policy", "Sensitivity", "attention_error", "choose", "collect_stats",
    "combine", "learn_clipping", "load", "policy", "sensitivity", "tensor_bits",
]
