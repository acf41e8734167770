"""KVSpec: presets, parse / str round trip, hashability (jit static argument), errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvq_jax as kvq
from kvq_jax import KVSpec, TensorSpec

PRESET_NAMES = ["bf16", "fp8", "int8", "int4", "int4-kivi", "int2-kivi", "int4-rot", "k8v4", "int2"]


def test_presets_exist_and_are_exported():
    assert set(PRESET_NAMES) <= set(kvq.PRESETS)
    for name in PRESET_NAMES:
        assert isinstance(KVSpec.parse(name), KVSpec)


def test_preset_contents():
    p = {n: KVSpec.parse(n) for n in PRESET_NAMES}
    assert not p["bf16"].quantized
    assert p["fp8"].k.format == p["fp8"].v.format == "fp8"
    assert p["int8"].k == p["int8"].v == TensorSpec("int8", "token", None, True)
    kivi = p["int4-kivi"]
    assert kivi.k == TensorSpec("int4", "channel", None, False)
    assert kivi.v == TensorSpec("int4", "token", 32, False)
    assert (kivi.token_group, kivi.residual, kivi.channel_keys) == (32, 128, True)
    assert p["int2-kivi"].k.format == "int2" and p["int2-kivi"].residual == 128
    assert p["int4-rot"].rotate and p["int4-rot"].k.format == "int4"
    assert p["k8v4"].k.format == "int8" and p["k8v4"].v.format == "int4"
    for n in PRESET_NAMES:  # presets keep bf16 scales; explicit specs default to f32
        assert p[n].scale_dtype == ("f32" if n == "bf16" else "bf16")
    assert KVSpec.parse("k=int8,v=int8").scale_dtype == "f32"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_str_round_trips_presets(name):
    spec = KVSpec.parse(name)
    assert str(spec) == name
    assert KVSpec.parse(str(spec)) == spec
    assert KVSpec.parse(name.upper()) == spec  # case-insensitive
    assert KVSpec.parse(spec) is spec  # a KVSpec passes through


@pytest.mark.parametrize("text", [
    "k=int8,v=int8,sinks=4,res=16",
    "k=int4:c:asym,v=int4:g32:asym,tg=16,res=64",
    "k=int4:c:asym,v=int4:g32:asym,res=64,scale=bf16",
    "k=int8,v=int4:g32:asym,rot",
    "k=fp8:g16,v=int2:g8:asym,sinks=2",
    "k=int8:c,v=bf16,tg=8",
    "k=bf16,v=int8",
])
def test_str_round_trips_canonical_strings(text):
    spec = KVSpec.parse(text)
    assert str(spec) not in kvq.PRESETS  # these are not presets
    assert KVSpec.parse(str(spec)) == spec
    assert str(KVSpec.parse(str(spec))) == str(spec)


def test_canonical_string_of_a_preset_prints_the_preset_name():
    assert str(KVSpec.parse("k=int8,v=int8,scale=bf16")) == "int8"
    assert str(KVSpec.parse("k=int8,v=int8")) == "k=int8,v=int8"  # f32 scales: not the preset
    assert str(KVSpec.parse("k=int4:c:asym,v=int4:g32:asym,res=128,scale=bf16")) == "int4-kivi"
    assert KVSpec.parse("k=int8, v=int8 ,sinks=4") == KVSpec(
        k=TensorSpec("int8"), v=TensorSpec("int8"), sinks=4)


FMTS = ["fp8", "int8", "int4", "int2", "bf16"]


@st.composite
def specs(draw):
    def tensor(keys):
        fmt = draw(st.sampled_from(FMTS))
        if fmt == "bf16":
            return TensorSpec("bf16")
        axis = "channel" if keys and fmt != "fp8" and draw(st.booleans()) else "token"
        group = None if axis == "channel" else draw(st.sampled_from([None, 8, 16, 32]))
        sym = True if fmt == "fp8" else draw(st.booleans())
        return TensorSpec(fmt, axis, group, sym)

    return KVSpec(
        k=tensor(True), v=tensor(False),
        token_group=draw(st.sampled_from([1, 8, 32, 64])),
        residual=draw(st.sampled_from([0, 16, 128])),
        sinks=draw(st.sampled_from([0, 1, 4])),
        rotate=draw(st.booleans()),
        scale_dtype=draw(st.sampled_from(["f32", "bf16"])),
    )


@settings(max_examples=40, deadline=None, database=None)
@given(specs())
def test_str_round_trips_any_valid_spec(spec):
    assert KVSpec.parse(str(spec)) == spec
    assert hash(KVSpec.parse(str(spec))) == hash(spec)


def test_str_round_trips_bf16_tensor_with_ignored_fields():
    # A bf16 tensor has no scales, so axis/group/symmetric mean nothing for it, yet they
    # take part in equality and hashing while str() drops them. The round trip (and so
    # jit's static-argument cache key) then breaks for a spec a user can build.
    spec = KVSpec(k=TensorSpec("bf16", group=32), v=TensorSpec("int8"))
    assert KVSpec.parse(str(spec)) == spec


def test_frozen_and_hashable():
    spec = KVSpec.parse("int4-kivi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.residual = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.k.format = "int8"  # type: ignore[misc]
    assert hash(spec) == hash(KVSpec.parse(str(spec)))
    assert len({KVSpec.parse(n) for n in PRESET_NAMES}) == len(PRESET_NAMES)
    assert {spec: 1}[KVSpec.parse("int4-kivi")] == 1


def test_spec_is_a_jit_static_argument():
    traces = []

    def f(x, spec):
        traces.append(spec)
        return x * spec.k.bits

    g = jax.jit(f, static_argnums=1)
    x = jnp.ones(3)
    assert float(g(x, KVSpec.parse("int8"))[0]) == 8.0
    assert float(g(x, KVSpec.parse("k=int8,v=int8,scale=bf16"))[0]) == 8.0  # equal spec: cache hit
    assert float(g(x, KVSpec.parse("int4"))[0]) == 4.0
    assert len(traces) == 2


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        KVSpec.parse("int3-kivi")
    msg = str(e.value)
    assert "name" in msg and "int3-kivi" in msg
    for n in PRESET_NAMES:
        assert n in msg


@pytest.mark.parametrize("text, word", [
    ("k=int9,v=int8", "format"),
    ("k=int8:z,v=int8", "name"),
    ("k=int8,v=int8,foo=3", "name"),
    ("k=int8,v=int8,tg=abc", "name"),
    ("k=int8,v=int8,tg=0", "token_group"),
    ("k=int8,v=int8,res=-1", "residual"),
    ("k=int8,v=int8,scale=f16", "scale_dtype"),
    ("k=fp8:asym,v=int8", "symmetric"),
    ("k=fp8:c,v=int8", "axis"),
    ("k=int8,v=int4:c", "axis"),
    ("k=int8:g0,v=int8", "group"),
    ("k=int8,v=int8,bogus", "name"),
    ("", "name"),
])
def test_bad_strings_raise_value_error_naming_the_field(text, word):
    with pytest.raises(ValueError, match=word):
        KVSpec.parse(text)


def test_bad_types():
    with pytest.raises(TypeError, match="name"):
        KVSpec.parse(8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k, v"):
        KVSpec(k="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format"):
        TensorSpec("int3")
    with pytest.raises(ValueError, match="sinks"):
        KVSpec(sinks=-2)


@pytest.mark.parametrize("spec, head_dim", [
    ("int4", 48),            # group 32 does not divide 48
    ("int8", 0),
    ("k=int8:g16,v=int8", 40),
    ("k=int4,v=int4", 63),   # odd head_dim cannot be packed as int4
    ("k=int2,v=int8", 66),   # int2 packs 4 per byte
    ("int4-rot", 96),        # Hadamard needs a power of two
    ("k=int4:c:asym,v=int4:g32:asym", 80),  # v group 32
])
def test_bad_head_dim_names_head_dim(spec, head_dim):
    s = KVSpec.parse(spec)
    with pytest.raises(ValueError, match="head_dim"):
        s.validate_head_dim(head_dim)
    with pytest.raises(ValueError, match="head_dim"):
        kvq.init_cache(s, 1, 16, 1, head_dim)
    with pytest.raises(ValueError, match="head_dim"):
        kvq.bytes_per_token(s, 1, 1, head_dim)


def test_good_head_dims_validate():
    for name in PRESET_NAMES:
        for d in (64, 128, 256):
            KVSpec.parse(name).validate_head_dim(d)
    KVSpec.parse("k=int4,v=int4").validate_head_dim(62)  # even, one group per token


def test_bits_per_element():
    assert KVSpec.parse("bf16").bits_per_element(128) == 16.0
    # int8 per token, bf16 scale: (128 + 2) bytes per vector
    assert KVSpec.parse("int8").bits_per_element(128) == pytest.approx(8 * 130 / 128)
    assert KVSpec.parse("k=int8,v=int8").bits_per_element(128) == pytest.approx(8 * 132 / 128)
