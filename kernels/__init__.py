"""Pallas GPU kernels of kvq_jax (shipped as ``kvq_jax.kernels``)."""
