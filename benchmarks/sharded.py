"""Decode throughput and long-context capacity on 1..N GPUs with `kvq.sharding`.

For each model shape and each mesh size N in ``--gpus``: random bf16 weights created
directly split over the mesh (Megatron: column-parallel q/k/v and gate/up, row-parallel
o and down), caches created split (sequences over "data" = 1, KV heads over "model" = N):

* sessions: the most ``--context``-token sessions whose caches (all layers) can be
  allocated beside the weights, found by allocating them one after another until the
  device memory is full;
* decode: tokens/s of one jitted decode step (all layers, append + attention through
  the caches with the Pallas kernel per shard, logits) at ``--batch`` sequences of
  ``--decode-context`` tokens. Lengths are set directly (the stored values do not
  change the work), so no prefill is needed.

Per-GPU throughput at N GPUs is reported against N = 1 (the target is >= 85 %).

    python benchmarks/sharded.py --models 8b,70b --gpus 1,2 --out sharded.json   # GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharded.py --small

A shape whose weights do not fit on N devices is reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kvq_jax as kvq  # noqa: E402
from _common import SHAPES as MODEL_SHAPES  # noqa: E402  (benchmarks/_common.py)
from _common import is_oom, random_model, time_steps  # noqa: E402
from kvq_jax.models import LlamaConfig  # noqa: E402

SHAPES = {**MODEL_SHAPES, "small": dict(vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=64,
                                         ffn_dim=256, rope_theta=500000.0)}


def make_caches(model, preset, batch, max_len, mesh, lengths=0):
    caches = kvq.sharding.init_caches(preset, batch, max_len, model.num_kv_heads, model.head_dim, mesh=mesh,
                                      num_layers=model.num_layers)
    if lengths:  # one buffer per layer (the caches are donated)
        caches = tuple(dataclasses.replace(c, lengths=kvq.sharding.global_array(
            np.full((batch,), lengths, np.int32), mesh, P(kvq.sharding.DATA))) for c in caches)
    return caches


def sessions_that_fit(model, preset, context, mesh, limit):
    """Most ``context``-token sessions whose caches (all layers) can be held next to the weights.

    Sessions are added a few at a time (``data``-axis size per allocation, each one a
    separate set of caches, as a server adds them) until an allocation fails: the first
    out-of-memory error ends the search. (Searching by bisection over whole batches instead
    repeats failed allocations, and on 2 GPUs with jax 0.11.2 the memory of a failed
    multi-device allocation was not returned: every later attempt failed.)
    Returns ``(sessions, bytes of their caches)``.
    """
    step = mesh.shape[kvq.sharding.DATA]
    held, nbytes = [], 0
    try:
        while len(held) * step < limit:
            caches = make_caches(model, preset, step, context, mesh)
            jax.block_until_ready(caches)
            held.append(caches)
            nbytes += sum(x.nbytes for x in jax.tree.leaves(caches))
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
    n = len(held) * step
    del held
    gc.collect()
    return n, nbytes


def decode_speed(model, preset, batch, context, mesh, steps, impl):
    """Seconds per decode step (`time_steps`: median of 3 timed batches of ``steps`` chained steps) and compile time."""
    graphdef, state = nnx.split(model)
    caches = make_caches(model, preset, batch, context + 4 * steps + 8, mesh, lengths=context)  # time_steps: 1 + 4 batches
    tokens = kvq.sharding.global_array(np.ones((batch, 1), np.int32), mesh, P(kvq.sharding.DATA, None))

    def one_step(state, caches, tokens):  # greedy: the next token feeds the next step
        m = nnx.merge(graphdef, state)
        with kvq.sharding.use_mesh(mesh):  # attention per shard while tracing
            logits, caches = m(tokens, caches=caches, impl=impl)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        return nxt, kvq.sharding.constrain_caches(caches, mesh)

    step = jax.jit(one_step, donate_argnums=(1,))

    def advance(i):
        nonlocal tokens, caches
        tokens, caches = step(state, caches, tokens)
        return tokens

    step_s, compile_s = time_steps(advance, steps)
    del caches
    gc.collect()
    return step_s, compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a small model and contexts (CPU smoke run)")
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--gpus", default="1,2", help="mesh sizes of the 'model' axis")
    ap.add_argument("--presets", default="bf16,int8,int4")
    ap.add_argument("--context", type=int, default=None, help="tokens per session (default 131072)")
    ap.add_argument("--batch", type=int, default=16, help="decode batch")
    ap.add_argument("--decode-context", type=int, default=None, help="tokens per decoding sequence (default 32768)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-sessions", type=int, default=512)
    ap.add_argument("--skip", default="", help="comma-separated: sessions, decode")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    models = ["small"] if a.small else a.models.split(",")
    context = a.context or (1024 if a.small else 131072)
    dctx = a.decode_context or (256 if a.small else 32768)
    batch = 2 if a.small else a.batch
    skip = set(a.skip.split(",")) - {""}
    devices = jax.devices()
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
    res = dict(device=devices[0].device_kind, jax=jax.__version__, context=context, decode_batch=batch,
               decode_context=dctx, runs=[])
    for name in models:
        config = LlamaConfig(**SHAPES[name], rope_style="half", tie_embeddings=False, eos_token_ids=())
        for n in (int(x) for x in a.gpus.split(",")):
            if n > len(devices):
                print(f"{name}: {n} devices requested, {len(devices)} present; skipped", flush=True)
                continue
            mesh = kvq.sharding.make_mesh(data=1, model=n, devices=devices[:n])
            try:
                model = random_model(config, mesh)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                print(f"{name} on {n} device(s): the weights do not fit", flush=True)
                res["runs"].append(dict(model=name, gpus=n, weights_fit=False))
                gc.collect()
                continue
            wbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
            for preset in a.presets.split(","):
                r = dict(model=name, gpus=n, preset=preset, weights_fit=True, weights_bytes=wbytes)
                if "sessions" not in skip:
                    r["sessions"], r["kv_bytes"] = sessions_that_fit(model, preset, context, mesh, a.max_sessions)
                if "decode" not in skip:
                    try:
                        t, c = decode_speed(model, preset, batch, dctx, mesh, a.steps, a.impl)
                        r.update(step_ms=t * 1e3, tokens_per_s=batch / t, per_gpu_tokens_per_s=batch / t / n,
                                 compile_s=c)
                    except Exception as e:  # noqa: BLE001
                        if not is_oom(e):
                            raise
                        r["decode"] = "out of memory"
                print(name, n, preset, {k: v for k, v in r.items() if k not in ("model", "gpus", "preset")},
                      flush=True)
                res["runs"].append(r)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(res, f, indent=1)
            del model
            gc.collect()

    print(f"\n{'model':6s} {'GPUs':>4s} {'preset':7s} {'sessions':>8s} {'tok/s':>8s} {'per GPU':>8s} "
          f"{'vs 1 GPU':>8s} {'step ms':>8s}")
    base = {(r["model"], r["preset"]): r.get("per_gpu_tokens_per_s") for r in res["runs"] if r.get("gpus") == 1}
    for r in res["runs"]:
        if not r.get("weights_fit"):
            print(f"{r['model']:6s} {r['gpus']:4d} weights do not fit")
            continue
        pg = r.get("per_gpu_tokens_per_s")
        b = base.get((r["model"], r["preset"]))
        rel = f"{pg / b:8.2f}" if (pg and b) else f"{'':8s}"
        print(f"{r['model']:6s} {r['gpus']:4d} {r['preset']:7s} {r.get('sessions', ''):>8} "
              f"{r.get('tokens_per_s', 0):8.1f} {pg or 0:8.1f} {rel} {r.get('step_ms', 0):8.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
