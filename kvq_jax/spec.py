"""KVSpec: how the keys and values of one attention layer are stored.

A spec is a frozen, hashable dataclass, so it can be a ``jax.jit`` static
argument and a pytree's static metadata. ``KVSpec.parse`` accepts a preset name
("int8", "int4-kivi", ...) or the canonical string ``str(spec)`` prints for a
spec that is not a preset.

Canonical string grammar (comma-separated, order free)::

    k=<fmt>[:<axis>][:g<group>][:asym]     key tensor  (axis t=token, c=channel)
    v=<fmt>[:<axis>][:g<group>][:asym]     value tensor
    tg=<n>     token group of per-channel scales      (default 32)
    res=<n>    most recent tokens kept in bf16         (default 0)
    sinks=<n>  first tokens kept in bf16               (default 0)
    rot        Hadamard rotation on head_dim
    scale=bf16|f32                                     (default f32)

e.g. ``k=int4:c:asym,v=int4:t:g32:asym,tg=32,res=128``.

A spec may also carry `StaticScales` (calibrated per-channel scales, shifts and
clip ratios, made by `kvq_jax.calibrate`). They are numbers, not grammar: such a
spec prints as ``<spec>+<tag>`` and is rebuilt from its calibration file, not parsed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

FORMATS = ("bf16", "fp8", "int8", "int4", "int2")
BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}
AXES = ("token", "channel")
SCALE_DTYPES = ("bf16", "f32")

Format = Literal["bf16", "fp8", "int8", "int4", "int2"]
Axis = Literal["token", "channel"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Storage of one tensor (keys or values) of the cache.

    Attributes:
      format: "bf16" (no scales), "fp8" (e4m3, symmetric), "int8", "int4", "int2".
      axis: "token": one scale per (token, head, group of ``group`` channels);
        "channel": one scale per (channel, head, group of ``token_group`` tokens),
        KIVI-style, keys only.
      group: channels per scale along head_dim for per-token scales; None = the
        whole head_dim (one scale per token and head).
      symmetric: symmetric (scale only) or asymmetric (scale and zero point).
    """

    format: Format = "bf16"
    axis: Axis = "token"
    group: int | None = None
    symmetric: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
        if self.format == "bf16":  # no scales: normalize the fields that do not apply
            object.__setattr__(self, "axis", "token")
            object.__setattr__(self, "group", None)
            object.__setattr__(self, "symmetric", True)
        if self.axis not in AXES:
            raise ValueError(f"axis: expected one of {AXES}, got {self.axis!r}")
        if self.group is not None and (not isinstance(self.group, int) or self.group <= 0):
            raise ValueError(f"group: expected a positive int or None, got {self.group!r}")
        if self.format == "fp8" and not self.symmetric:
            raise ValueError("symmetric: fp8 (e4m3) is symmetric only")
        if self.format == "fp8" and self.axis == "channel":
            raise ValueError("axis: fp8 supports per-token scales only")

    @property
    def bits(self) -> int:
        return BITS[self.format]

    @property
    def quantized(self) -> bool:
        return self.format != "bf16"

    @property
    def is_int(self) -> bool:
        return self.format in ("int8", "int4", "int2")

    def group_size(self, head_dim: int) -> int:
        """Channels per per-token scale for this head_dim."""
        return head_dim if self.group is None else self.group

    def _short(self) -> str:
        parts = [self.format]
        if self.quantized:
            if self.axis == "channel":
                parts.append("c")
            if self.group is not None:
                parts.append(f"g{self.group}")
            if not self.symmetric:
                parts.append("asym")
        return ":".join(parts)


def _nested(x, name):
    """None, or an array-like ``[Hkv, D]`` -> a tuple of Hkv tuples of D floats (hashable)."""
    if x is None:
        return None
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name}: expected shape [num_kv_heads, head_dim], got {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or Inf")
    return tuple(tuple(float(v) for v in row) for row in a)


@dataclasses.dataclass(frozen=True)
class StaticScales:
    """Calibrated, static parameters of one layer's cache (see `kvq_jax.calibrate`).

    Before the dynamic quantizer runs, every key and value is shifted and divided per
    (KV head, channel): ``x' = (x - shift) / scale``; ``x'`` is then quantized as the
    TensorSpec says (per-token or per-channel dynamic scales), with the dynamic range
    of each scale group shrunk by the clip ratio (``absmax * clip``; asymmetric: the
    group's [min, max] shrunk by ``clip`` around its midpoint; values beyond are
    clipped). Attention folds the inverse in, outside the kernel, as it does the
    rotation: ``q' = q * k_scale``, the body's log-sum-exp gains ``softmax_scale *
    q . k_shift`` (the same for every key, so exact), and the body's output becomes
    ``o' * v_scale + v_shift``. Residual and sink tokens are stored as they come.
    With ``rotate`` the Hadamard rotation applies after the shift and division.

    The values are plain floats so that a KVSpec stays hashable (a jit static
    argument); they are constants of the compiled program, not cache leaves, and
    cost no bytes per token.

    Attributes:
      k_scale, k_shift, v_scale, v_shift: None (identity) or ``[Hkv][D]`` nested
        tuples of floats; scales must be positive. Array-likes are converted.
      k_clip, v_clip: clip ratios in (0, 1]; 1 keeps the plain absmax / min-max.
      tag: a short name shown by ``str(spec)`` (e.g. "cal-1a2b3c4d"): letters,
        digits, '-', '_' and '.'.
    """

    k_scale: tuple | None = None
    k_shift: tuple | None = None
    v_scale: tuple | None = None
    v_shift: tuple | None = None
    k_clip: float = 1.0
    v_clip: float = 1.0
    tag: str = "static"

    def __post_init__(self):
        for name in ("k_scale", "k_shift", "v_scale", "v_shift"):
            object.__setattr__(self, name, _nested(getattr(self, name), name))
        for name in ("k_scale", "v_scale"):
            val = getattr(self, name)
            if val is not None and min(min(r) for r in val) <= 0:
                raise ValueError(f"{name}: scales must be positive")
        shapes = {(len(a), len(a[0])) for a in (self.k_scale, self.k_shift, self.v_scale, self.v_shift)
                  if a is not None}
        if len(shapes) > 1:
            raise ValueError(f"k_scale: scales and shifts must share one [Hkv, D] shape, got {sorted(shapes)}")
        for name in ("k_clip", "v_clip"):
            val = getattr(self, name)
            if not isinstance(val, (int, float, np.floating)) or not 0.0 < float(val) <= 1.0:
                raise ValueError(f"{name}: expected a ratio in (0, 1], got {val!r}")
            object.__setattr__(self, name, float(val))
        if not isinstance(self.tag, str) or not self.tag or any(
                not (c.isalnum() or c in "-_.") for c in self.tag):
            raise ValueError(f"tag: expected letters, digits, '-', '_' or '.', got {self.tag!r}")

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(Hkv, D)`` of the per-channel arrays, or None when there are none."""
        for a in (self.k_scale, self.k_shift, self.v_scale, self.v_shift):
            if a is not None:
                return len(a), len(a[0])
        return None

    def array(self, name: str) -> np.ndarray | None:
        """``f32[Hkv, D]`` of "k_scale", "k_shift", "v_scale" or "v_shift" (None when unset)."""
        if name not in ("k_scale", "k_shift", "v_scale", "v_shift"):
            raise ValueError(f"name: expected k_scale, k_shift, v_scale or v_shift, got {name!r}")
        val = getattr(self, name)
        return None if val is None else np.asarray(val, np.float32)

    def check(self, num_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError unless the per-channel arrays are ``[num_kv_heads, head_dim]``."""
        shp = self.shape
        if shp is not None and shp != (int(num_kv_heads), int(head_dim)):
            raise ValueError(f"spec.static: per-channel arrays are {list(shp)}, the cache has "
                             f"[{num_kv_heads}, {head_dim}] (num_kv_heads, head_dim)")


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """How one layer's KV cache is stored.

    Attributes:
      k, v: TensorSpec of keys and values.
      token_group: tokens per per-channel scale (keys with axis="channel").
      residual: the most recent ``residual`` tokens stay bf16 (KIVI). With
        per-channel keys, up to ``residual + token_group - 1`` tokens are bf16:
        a token group is quantized only once it is complete and all of it has
        left the window.
      sinks: the first ``sinks`` tokens of every sequence stay bf16.
      rotate: multiply K and V by an orthonormal Hadamard matrix on head_dim
        before quantizing (q by the same before attention, the output by its
        transpose after).
      scale_dtype: "bf16" or "f32", dtype of scales and zero points.
      static: optional `StaticScales` (calibrated per-channel scales, shifts and clip
        ratios); None: plain dynamic scales.
    """

    k: TensorSpec = TensorSpec()
    v: TensorSpec = TensorSpec()
    token_group: int = 32
    residual: int = 0
    sinks: int = 0
    rotate: bool = False
    scale_dtype: Literal["bf16", "f32"] = "f32"
    static: StaticScales | None = None

    def __post_init__(self):
        if self.static is not None:
            if not isinstance(self.static, StaticScales):
                raise TypeError(f"static: expected a StaticScales or None, got {type(self.static).__name__}")
            if not (self.k.quantized or self.v.quantized):
                raise ValueError("static: static scales need a quantized k or v format")
        if not isinstance(self.k, TensorSpec) or not isinstance(self.v, TensorSpec):
            raise TypeError("k, v: expected TensorSpec instances")
        if self.v.axis == "channel":
            raise ValueError("v.axis: per-channel scales are supported for keys only; use 'token' for values")
        for name in ("token_group", "residual", "sinks"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
        if self.token_group < 1:
            raise ValueError(f"token_group: expected >= 1, got {self.token_group}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype: expected one of {SCALE_DTYPES}, got {self.scale_dtype!r}")

    # -- derived -----------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True when either tensor is stored in a low-precision format."""
        return self.k.quantized or self.v.quantized

    @property
    def channel_keys(self) -> bool:
        return self.k.quantized and self.k.axis == "channel"

    @property
    def body_granule(self) -> int:
        """Tokens enter the quantized body in multiples of this many."""
        return self.token_group if self.channel_keys else 1

    def validate_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if this spec cannot store vectors of ``head_dim``."""
        if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0:
            raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
        head_dim = int(head_dim)
        for name, t in (("k", self.k), ("v", self.v)):
            if not t.quantized:
                continue
            if t.axis == "token":
                g = t.group_size(head_dim)
                if head_dim % g:
                    raise ValueError(f"head_dim: {head_dim} is not divisible by {name}.group={g}")
            if t.format == "int4" and head_dim % 2:
                raise ValueError(f"head_dim: int4 packing needs an even head_dim, got {head_dim}")
            if t.format == "int2" and head_dim % 4:
                raise ValueError(f"head_dim: int2 packing needs head_dim divisible by 4, got {head_dim}")
        if self.rotate and head_dim & (head_dim - 1):
            raise ValueError(f"head_dim: rotate=True needs a power-of-two head_dim, got {head_dim}")
        if self.static is not None and self.static.shape is not None and self.static.shape[1] != head_dim:
            raise ValueError(f"head_dim: {head_dim}, the spec's static scales are for head_dim "
                             f"{self.static.shape[1]}")

    def bits_per_element(self, head_dim: int) -> float:
        """Average stored bits per K/V element of the quantized body, scales and zero points included."""
        return 8.0 * bytes_per_token(self, 1, 1, head_dim) / (2 * head_dim)

    # -- naming ------------------------------------------------------------
    def __str__(self) -> str:
        if self.static is not None:
            return f"{dataclasses.replace(self, static=None)}+{self.static.tag}"
        for name, spec in PRESETS.items():
            if spec == self:
                return name
        parts = [f"k={self.k._short()}", f"v={self.v._short()}"]
        if self.token_group != 32:
            parts.append(f"tg={self.token_group}")
        if self.residual:
            parts.append(f"res={self.residual}")
        if self.sinks:
            parts.append(f"sinks={self.sinks}")
        if self.rotate:
            parts.append("rot")
        if self.scale_dtype != "f32":
            parts.append(f"scale={self.scale_dtype}")
        return ",".join(parts)

    @classmethod
    def parse(cls, name: "str | KVSpec") -> "KVSpec":
        """A preset name or a canonical spec string (see module docstring) -> KVSpec."""
        if isinstance(name, KVSpec):
            return name
        if not isinstance(name, str):
            raise TypeError(f"name: expected a preset name or KVSpec, got {type(name).__name__}")
        key = name.strip().lower()
        if "+" in key:
            raise ValueError(f"name: {name!r} names a spec with static (calibrated) scales; those are "
                             "numbers, not grammar: rebuild it with kvq_jax.calibrate.load(path).spec(...)")
        if key in PRESETS:
            return PRESETS[key]
        if "=" not in key:
            raise ValueError(f"name: unknown KV preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return _parse_canonical(name, key)


def _parse_tensor(text: str, what: str) -> TensorSpec:
    fields = text.split(":")
    fmt, rest = fields[0], fields[1:]
    axis, group, symmetric = "token", None, True
    for f in rest:
        if f in ("t", "token"):
            axis = "token"
        elif f in ("c", "channel"):
            axis = "channel"
        elif f == "asym":
            symmetric = False
        elif f == "sym":
            symmetric = True
        elif f.startswith("g") and f[1:].isdigit():
            group = int(f[1:])
        else:
            raise ValueError(f"name: bad {what} field {f!r} in {text!r}")
    return TensorSpec(fmt, axis, group, symmetric)


def _parse_canonical(name: str, key: str) -> KVSpec:
    kw: dict = {}
    for item in key.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "rot":
            kw["rotate"] = True
            continue
        if "=" not in item:
            raise ValueError(f"name: cannot parse {item!r} in {name!r}; valid presets: {', '.join(PRESETS)}")
        k, v = (x.strip() for x in item.split("=", 1))
        try:
            if k == "k":
                kw["k"] = _parse_tensor(v, "k")
            elif k == "v":
                kw["v"] = _parse_tensor(v, "v")
            elif k == "tg":
                kw["token_group"] = int(v)
            elif k == "res":
                kw["residual"] = int(v)
            elif k == "sinks":
                kw["sinks"] = int(v)
            elif k == "scale":
                kw["scale_dtype"] = v
            else:
                raise ValueError(f"name: unknown field {k!r} in {name!r}")
        except ValueError as e:
            if str(e).startswith("name:") or ":" in str(e).split(" ")[0]:
                raise
            raise ValueError(f"name: bad value in {item!r} of {name!r}: {e}") from None
    return KVSpec(**kw)


def _sym(fmt, group=None):
    return TensorSpec(fmt, "token", group, True)


# Presets store scales and zero points in bf16 (scale rounded up, zero down: the
# |x - x̂| <= scale / 2 bound holds for the stored values); explicit specs default to f32.
_BF = dict(scale_dtype="bf16")
PRESETS: dict[str, KVSpec] = {
    "bf16": KVSpec(),
    "fp8": KVSpec(k=_sym("fp8"), v=_sym("fp8"), **_BF),
    "int8": KVSpec(k=_sym("int8"), v=_sym("int8"), **_BF),
    # per-token symmetric int4 with groups of 32 channels (the plain baseline)
    "int4": KVSpec(k=_sym("int4", 32), v=_sym("int4", 32), **_BF),
    "int4-kivi": KVSpec(
        k=TensorSpec("int4", "channel", None, False),
        v=TensorSpec("int4", "token", 32, False),
        token_group=32,
        residual=128,
        **_BF,
    ),
    "int2-kivi": KVSpec(
        k=TensorSpec("int2", "channel", None, False),
        v=TensorSpec("int2", "token", 32, False),
        token_group=32,
        residual=128,
        **_BF,
    ),
    "int4-rot": KVSpec(
        k=TensorSpec("int4", "token", 32, False),
        v=TensorSpec("int4", "token", 32, False),
        rotate=True,
        **_BF,
    ),
    # per-token int8 after a Hadamard rotation of head_dim (spreads outlier channels)
    "int8-rot": KVSpec(k=_sym("int8"), v=_sym("int8"), rotate=True, **_BF),
    "k8v4": KVSpec(k=_sym("int8"), v=TensorSpec("int4", "token", 32, False), **_BF),
    "int2": KVSpec(k=TensorSpec("int2", "token", 32, False), v=TensorSpec("int2", "token", 32, False), **_BF),
}


def bytes_per_token(spec: KVSpec | str, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Exact bytes one token of the quantized body occupies across all layers.

    Counts K and V data, scales and zero points (per-channel key scales are
    amortized over their ``token_group`` tokens; the result is exact when that
    divides evenly, else rounded up). The bf16 ``residual`` and ``sinks``
    windows are a fixed per-sequence cost, not per-token, and are not counted:
    ``KVCache.nbytes`` includes them.
    """
    spec = KVSpec.parse(spec)
    spec.validate_head_dim(head_dim)
    head_dim = int(head_dim)
    num = 0  # bytes per (layer, head) times token_group
    tg = spec.token_group
    scale_bytes = 2 if spec.scale_dtype == "bf16" else 4
    for t in (spec.k, spec.v):
        data = head_dim * t.bits // 8
        if not t.quantized:
            num += data * tg
            continue
        nparams = 1 if t.symmetric else 2
        if t.axis == "token":
            ngroups = head_dim // t.group_size(head_dim)
            num += (data + nparams * ngroups * scale_bytes) * tg
        else:  # one scale (and zero) per channel per token group
            num += data * tg + nparams * head_dim * scale_bytes
    per_head = -(-num // tg)
    return int(per_head * num_layers * num_kv_heads)
