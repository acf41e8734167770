"""Every jax-version difference of the kernels, in one place.

Since jax 0.9 a ``pallas_call`` without compiler parameters goes to Mosaic GPU;
passing ``jax.experimental.pallas.triton.CompilerParams`` selects the Triton
lowering, which these kernels are written for. The Triton lowering is
deprecated in jax 0.11 (still present in 0.12): this is the one file to change
when it moves.
"""

from __future__ import annotations

import warnings

import jax
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


def on_gpu() -> bool:
    """True when the default backend is a GPU."""
    return jax.default_backend() == "gpu"
