"""Launch the decode kernel a few times on one shape, for a profiler to attach to.

    ncu --clock-control none --kernel-name regex:kvq_decode --launch-skip 2 --launch-count 1 \\
        python benchmarks/profile_decode.py --preset int4 --unpack join

Builds a B x S cache of random keys/values in the preset's format and runs
``kvq.attend(impl="pallas")`` ``--launches`` times (the first compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import kvq_jax as kvq  # noqa: E402
from decode import build_cache  # noqa: E402
from kvq_jax.kernels import decode  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="int4")
    ap.add_argument("--unpack", default=None, help="Config.unpack; default choose_config's")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--launches", type=int, default=4)
    a = ap.parse_args(argv)
    spec = kvq.KVSpec.parse(a.preset)
    key = jax.random.key(0)
    cache = build_cache(spec, a.batch, a.seq, 8, 128, key)
    cfg = decode.choose_config(cache, 16)
    if a.unpack:
        cfg = dataclasses.replace(cfg, unpack=a.unpack)
    q = jax.random.normal(key, (a.batch, 1, 32, 128), jnp.bfloat16)
    f = jax.jit(lambda q, c: kvq.attend(q, c, impl="pallas", config=cfg))
    for _ in range(a.launches):
        jax.block_until_ready(f(q, cache))
    print(f"{a.preset} {cfg}: {a.launches} launches done")


if __name__ == "__main__":
    main()
