"""Latency of the all-reduces a tensor-parallel decode step makes, on N devices.

A Megatron decode step all-reduces the layer's activations twice per layer (after the
attention's output projection and after the MLP's down projection): at batch B and model
width d each is a ``[B, d]`` sum over the "model" axis. This times ``--count`` such
all-reduces chained inside one jitted ``shard_map`` (each one's input depends on the previous
result, as in the model), in each dtype of ``--dtypes``, and reports microseconds per
all-reduce (median of 5 timed runs after a compile run). Run it under different NCCL
settings (e.g. ``NCCL_PROTO=LL``) to compare them in the same session.

    NCCL_NVLS_ENABLE=0 python benchmarks/collectives.py --gpus 2 --shape 16x4096 --count 64
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/collectives.py --gpus 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def chained_all_reduces(mesh: Mesh, shape: tuple[int, int], dtype, count: int):
    """A jitted function of one ``[N, *shape]`` array (a row per device) that runs ``count``
    dependent all-reduces over the mesh's "model" axis and returns the last result."""

    def local(x):
        def body(_, y):
            return jax.lax.psum(y * jnp.asarray(0.5, dtype), "model")
        return jax.lax.fori_loop(0, count, body, x[0])[None]

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("model"), out_specs=P("model"), check_vma=False))


def time_run(fn, x, reps: int = 5) -> float:
    """Seconds per call of ``fn(x)``: one compile run, then the median of ``reps`` timed runs."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2, help="devices on the 'model' axis")
    ap.add_argument("--shape", default="16x4096", help="B x d of each all-reduced activation")
    ap.add_argument("--count", type=int, default=64, help="chained all-reduces per run (2 per layer)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--label", default=os.environ.get("NCCL_PROTO", "default"), help="name of this setting in the output")
    ap.add_argument("--out", default=None, help="append a JSON line per dtype to this file")
    a = ap.parse_args(argv)
    devices = jax.devices()
    if len(devices) < a.gpus:
        raise SystemExit(f"--gpus: {a.gpus} devices asked for, {len(devices)} present")
    mesh = Mesh(np.array(devices[:a.gpus]), ("model",))
    shape = tuple(int(v) for v in a.shape.split("x"))
    for name in a.dtypes.split(","):
        dtype = jnp.dtype(name)
        x = jax.device_put(jnp.ones((a.gpus, *shape), dtype), jax.sharding.NamedSharding(mesh, P("model")))
        one = time_run(chained_all_reduces(mesh, shape, dtype, 1), x)
        many = time_run(chained_all_reduces(mesh, shape, dtype, a.count), x)
        per = (many - one) / (a.count - 1)
        row = dict(label=a.label, devices=a.gpus, shape=list(shape), dtype=name, count=a.count,
                   us_per_all_reduce=per * 1e6, run_of_one_us=one * 1e6, bytes=int(np.prod(shape)) * dtype.itemsize,
                   jax=jax.__version__, device=str(devices[0].device_kind), date=time.strftime("%Y-%m-%d"))
        print(f"{a.label:10s} {a.gpus} devices {name:9s} {a.shape}: {row['us_per_all_reduce']:7.2f} us per all-reduce "
              f"({row['bytes'] / 1024:.0f} KiB; a run of one: {row['run_of_one_us']:.1f} us)", flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
