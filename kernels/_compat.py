"""Every jax-version difference of the kernels, in one place.

Since jax 0.9 a ``pallas_call`` without compiler parameters goes to Mosaic GPU;
passing ``jax.experimental.pallas.triton.CompilerParams`` selects the Triton
lowering, which these kernels are written for. The Triton lowering is
deprecated in jax 0.11 (still present in 0.12): this is the one file to change
when it moves.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl  # noqa: F401  (re-exported)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as pltriton

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())


def dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """2-D dot inside a Triton kernel, f32 accumulate (``pl.dot`` is deprecated in jax 0.11)."""
    return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b)


def triton_params(num_warps: int, num_stages: int):
    """Compiler parameters that select the Triton lowering."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def f32_asm(op: str):
    """One-operand f32 PTX instruction ``op`` (e.g. ``"rcp.rn.f32"``) as an elementwise function of an
    f32 tile inside a Triton kernel."""
    def f(x):
        [out] = pltriton.elementwise_inline_asm(f"{op} $0, $1;", args=[x], constraints="=f,f", pack=1,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
        return out

    return f


def on_gpu() -> bool:
    """True when the default backend is a GPU."""
    return jax.default_backend() == "gpu"


def _patch_offset_width():
    """Address arrays of 2**31 to 2**32 one-byte elements with 64-bit offsets.

    The Pallas Triton lowering (jax 0.10-0.11, ``_compute_offsets_from_indices``) computes a
    ref's element offsets in 32 bits unless the array holds more than 2**32 *bytes*; Triton's
    pointer arithmetic takes 32-bit offsets as signed, so in a one-byte array of more than 2**31
    elements (a serving pool of 2-4 GiB of int8 or packed bytes) offsets past 2**31 turn negative
    and the kernel reads or writes outside the array (an illegal address on the GPU). This wraps
    the function so that such arrays take the 64-bit path (their element type is described as
    8 bytes wide to the size test only: strides and pointers are unchanged). A no-op where the
    lowering already decides by elements.
    """
    from jax._src.pallas.triton import lowering

    orig = lowering._compute_offsets_from_indices
    if getattr(orig, "_kvq_offset_width", False):
        return

    def compute_offsets(block_info, nd_indexer):
        sd = block_info.full_shape_dtype
        n = math.prod(sd.shape)
        if n > 2**31 - 1 and n * jnp.dtype(sd.dtype).itemsize <= 2**32:
            block_info = dataclasses.replace(block_info, full_shape_dtype=jax.ShapeDtypeStruct(sd.shape, jnp.int64))
        return orig(block_info, nd_indexer)

    compute_offsets._kvq_offset_width = True
    lowering._compute_offsets_from_indices = compute_offsets


_patch_offset_width()
