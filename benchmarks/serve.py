"""Serving capacity and decode speed of the paged engine per cache preset.

Llama-3-8B-shaped model with random bf16 weights (32 layers, Hq 32, Hkv 8, D 128,
d 4096, ffn 14336) on one GPU, or with ``--gpus N`` tensor-parallel on N
(``Engine(mesh=make_mesh(data=1, model=N))``; ``--model 70b`` for the 70B shape), or with
``--replicas N`` data parallel (`kvq.serve.ReplicatedEngine`: an engine and a copy of the weights
per GPU; decode and ``--loop`` only):

* sessions: the most concurrent ``--context``-token sessions whose pages can be
  allocated next to the weights, found by allocating: an `Engine` with ``max_batch=n``
  and exactly the pages n sessions need is built (its pools allocated and zeroed) for
  growing n until the device runs out of memory;
* decode: tokens/s of the engine's jitted decode step (all layers, append through the
  page tables, attention over the paged cache, logits, sampling) at ``--batch`` sequences of
  ``--decode-context`` tokens each. Pages are assigned and lengths set directly (the
  stored values do not change the work), so no prefill is needed;
* loop (``--loop``): generated tokens/s of ``Engine.run`` end to end (``ReplicatedEngine.run``
  with ``--replicas``): ``--batch`` requests per engine, prefill and host loop included.

    python benchmarks/serve.py --out serve.json           # on the H200
    python benchmarks/serve.py --small                    # CPU smoke run
    python benchmarks/serve.py --gpus 2 --model 70b --batch 8 --skip prefix   # 2 GPUs
    python benchmarks/serve.py --replicas 2 --skip sessions,prefix --loop     # data parallel, 2 GPUs

Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import kvq_jax as kvq  # noqa: E402
from _common import SHAPES, most_that_fit, profile_steps, random_model, time_steps  # noqa: E402  (benchmarks/_common.py)
from kvq_jax.models import LlamaConfig  # noqa: E402
from kvq_jax.serve import engine as engine_mod  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x

SMALL = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=256,
             rope_theta=500000.0)


def sessions_that_fit(model, preset, context, page_size, limit, mesh=None):
    """Largest n for which an engine holding n sessions of ``context`` tokens can be allocated:
    ``(n, their cache bytes, exact)`` (`most_that_fit`)."""
    def allocate(n):
        eng = kvq.serve.Engine(model, kv=preset, max_batch=n, page_size=page_size, max_len=context, mesh=mesh)
        jax.block_until_ready(eng._kv)
        nbytes = eng.kv_bytes
        del eng
        return nbytes

    return most_that_fit(allocate, limit)


def decode_speed(model, preset, batch, context, page_size, steps, impl, mesh=None, devices=None, profile_dir=None,
                 shuffle=False):
    """Seconds per step of the engine's jitted decode step (all layers, append through the page
    tables, attention, logits, greedy sampling) at ``batch`` sequences of ``context`` tokens,
    each step fed the previous step's ids on the device.

    ``model`` runs on ``mesh`` if given; with ``devices``, data parallel: a
    `kvq.serve.ReplicatedEngine` over them (an engine and a weight copy per device, each with
    its own ``batch`` sequences); a step dispatches every replica's step in turn, and the time
    per step covers them all.
    ``profile_dir``: also profile 5 more steps there (`profile_steps`: device time per kernel).
    ``shuffle``: the sequences' pages in a random order of the pool (as an allocator hands them
    out after requests have come and gone) instead of each sequence's pages in a row."""
    kw = dict(kv=preset, max_batch=batch, page_size=page_size, max_len=context + 4 * steps + 1, impl=impl)
    if devices:
        engines = kvq.serve.ReplicatedEngine(model, devices=devices, **kw).engines
    else:
        engines = [kvq.serve.Engine(model, mesh=mesh, **kw)]
    per = engines[0].max_pages
    order = np.arange(batch * per, dtype=np.int32)
    if shuffle:
        order = np.random.default_rng(1).permutation(order).astype(np.int32)
    reps = []
    for eng in engines:
        # the step's inputs where the engine puts them (`Engine._put`): on its device, or replicated over the mesh
        put = eng._put
        # engine._decode_step's slot rows: each step appends at position `context` (the stored
        # values do not change the work) and takes its token from the previous step's ids
        slots = np.zeros((batch, 7), np.int32)
        slots[:, 1], slots[:, 2], slots[:, 6] = context, 1, 1
        reps.append(dict(
            kv=eng._kv, weights=eng._weights, key=eng._key, slots=put(slots),
            table=put(order.reshape(batch, per)),
            tokens=put(np.random.default_rng(0).integers(0, model.config.vocab_size, batch).astype(np.int32)),
            kw=eng._static(None)))
        eng._kv = None
    del engines
    greedy = (kvq.Sampler(temperature=0.0),)

    def advance(i):
        for r in reps:  # dispatched one after another; the devices run them concurrently
            r["tokens"], r["kv"], _ = engine_mod._decode_step(r["weights"], r["kv"], r["slots"], r["tokens"], r["table"],
                                                              r["key"], samplers=greedy, **r["kw"])
        return [r["tokens"] for r in reps]

    step_s, compile_s = time_steps(advance, steps)
    ran_on = sorted({str(d) for r in reps for d in r["tokens"].devices()})
    prof = profile_steps(advance, 5, profile_dir) if profile_dir else None
    del reps
    gc.collect()
    n = len(devices) if devices else 1
    out = dict(step_ms=step_s * 1e3, tokens_per_s=n * batch / step_s, compile_s=compile_s, replicas=n, devices=ran_on)
    if prof:
        out["profile"] = prof
    return out


def loop_speed(model, preset, batch, prompt_len, new_tokens, page_size, impl, mesh=None, devices=None):
    """End-to-end generated tokens/s of ``Engine.run`` (``ReplicatedEngine.run`` with ``devices``):
    ``batch`` requests per engine of ``prompt_len`` random tokens and ``new_tokens`` greedy
    tokens each, prefill included, host loop included. A first identical round compiles."""
    kw = dict(kv=preset, max_batch=batch, page_size=page_size, max_len=prompt_len + new_tokens, impl=impl,
              prefill_chunk=-(-prompt_len // page_size) * page_size)
    eng = (kvq.serve.ReplicatedEngine(model, devices=devices, **kw) if devices
           else kvq.serve.Engine(model, mesh=mesh, **kw))
    n = batch * (len(devices) if devices else 1)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, prompt_len) for _ in range(n)]
    out = {}
    for _ in range(2):  # the first round compiles
        for p in prompts:
            eng.submit(p, new_tokens)
        t0 = time.perf_counter()
        done = eng.run()
        dt = time.perf_counter() - t0
        out = dict(loop_s=dt, loop_requests=n, loop_tokens=sum(map(len, done.values())))
    out["loop_tokens_per_s"] = out["loop_tokens"] / out["loop_s"]
    del eng
    gc.collect()
    return out


def prefix_saving(model, preset, prompt_len, page_size, impl, question_len=64, new_tokens=4, mesh=None):
    """A second request sharing a ``prompt_len``-token system prompt, with and without the prefix cache.

    Each engine first serves request A (system prompt + question a), then request B
    (same system prompt + question b); B's prompt tokens computed and wall time are
    compared. Same tokens either way (checked).
    """
    rng = np.random.default_rng(1)
    system = rng.integers(0, model.config.vocab_size, prompt_len).tolist()
    qa, qb = (rng.integers(0, model.config.vocab_size, question_len).tolist() for _ in range(2))
    out = {}
    for cached in (False, True):
        eng = kvq.serve.Engine(model, kv=preset, max_batch=1, page_size=page_size, prefix_cache=cached, impl=impl,
                               max_len=prompt_len + question_len + new_tokens, prefill_chunk=page_size * 2, mesh=mesh)
        eng.submit(system + qa, new_tokens)
        eng.run()  # request A (also compiles)
        eng.submit(system + qb, new_tokens)
        eng.run()  # request B once, to compile B's shapes
        before = dict(eng.stats)
        t0 = time.perf_counter()
        rid = eng.submit(system + qb, new_tokens)
        toks = eng.run()[rid]
        dt = time.perf_counter() - t0
        out["cached" if cached else "uncached"] = dict(
            seconds=dt, prefill_tokens=eng.stats["prefill_tokens"] - before["prefill_tokens"],
            prefix_hit_tokens=eng.stats["prefix_hit_tokens"] - before["prefix_hit_tokens"], tokens=toks)
        del eng
        gc.collect()
    if out["cached"]["tokens"] != out["uncached"]["tokens"]:
        raise AssertionError("prefix cache changed the generated tokens")
    for v in out.values():
        del v["tokens"]
    out["speedup"] = out["uncached"]["seconds"] / out["cached"]["seconds"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a small model and contexts (CPU smoke run)")
    ap.add_argument("--presets", default="bf16,int8,int4")
    ap.add_argument("--context", type=int, default=None, help="tokens per session (default 131072)")
    ap.add_argument("--batch", type=int, default=16, help="decode batch")
    ap.add_argument("--decode-context", type=int, default=None, help="tokens per decoding sequence (default 32768)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page (the Engine's default)")
    ap.add_argument("--page-order", default="sequential", choices=("sequential", "shuffled"),
                    help="decode: each sequence's pages in a row, or in a random order of the pool")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per batch (default 20)")
    ap.add_argument("--max-sessions", type=int, default=256)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sessions, decode, prefix")
    ap.add_argument("--prefix-len", type=int, default=2048, help="system prompt tokens of the prefix-cache measurement")
    ap.add_argument("--gpus", type=int, default=1, help="tensor-parallel over this many devices (Engine(mesh=))")
    ap.add_argument("--replicas", type=int, default=1,
                    help="decode only: data parallel, one engine per device on this many devices, each with "
                         "--batch sequences (tokens/s counts them all)")
    ap.add_argument("--loop", action="store_true",
                    help="also time Engine.run end to end (ReplicatedEngine.run with --replicas): --batch requests "
                         "per engine of --loop-prompt tokens and --loop-new new tokens")
    ap.add_argument("--loop-prompt", type=int, default=None, help="prompt tokens per --loop request (default 1024)")
    ap.add_argument("--loop-new", type=int, default=None, help="new tokens per --loop request (default 256)")
    ap.add_argument("--model", default="8b", choices=tuple(SHAPES))
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="decode: also profile 5 steps per preset under DIR/PRESET (device ms per kernel class)")
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args(argv)
    shape = SMALL if a.small else SHAPES[a.model]
    mesh = None if a.gpus == 1 else kvq.sharding.make_mesh(data=1, model=a.gpus, devices=jax.devices()[:a.gpus])
    context = a.context or (2048 if a.small else 131072)
    dctx = a.decode_context or (512 if a.small else 32768)
    batch = 4 if a.small and a.batch == 16 else a.batch
    steps = a.steps or (3 if a.small else 20)
    max_sessions = 8 if a.small else a.max_sessions
    config = LlamaConfig(**shape, rope_style="half", tie_embeddings=False, eos_token_ids=())
    skip = set(a.skip.split(",")) - {""}
    if a.replicas > 1 and (a.gpus > 1 or not skip >= {"sessions", "prefix"}):
        raise SystemExit("--replicas: measures decode and --loop only (with --gpus 1 and --skip sessions,prefix)")
    devices = jax.devices()[:a.replicas] if a.replicas > 1 else None
    if devices and len(devices) < a.replicas:
        raise SystemExit(f"--replicas {a.replicas}: only {len(devices)} devices")
    model = random_model(config, mesh)  # replicas (--replicas) copy it to their devices
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    dev = jax.devices()[0]
    print(f"{a.gpus} x {dev.device_kind}, {a.replicas} replica(s), jax {jax.__version__}, "
          f"weights {weights / 2**30:.2f} GiB, model {shape}")
    res = dict(device=dev.device_kind, gpus=a.gpus, replicas=a.replicas, jax=jax.__version__,
               python=platform.python_version(), shape=shape,
               context=context, decode_batch=batch, decode_context=dctx, page_size=a.page_size,
               page_order=a.page_order, presets={})
    res["weights_bytes"] = weights
    presets = a.presets.split(",")
    for preset in presets:
        res["presets"][preset] = {}

    def save():
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=2)

    # decode and prefix first: after a failed allocation of the sessions search, memory
    # may not come back (`most_that_fit`), which would starve any later measurement
    loop_prompt = a.loop_prompt or (64 if a.small else 1024)
    loop_new = a.loop_new or (8 if a.small else 256)
    for part in ("decode", "loop", "prefix", "sessions"):
        if part in skip or (part == "loop" and not a.loop):
            continue
        for preset in tqdm(presets, desc=part):
            r = res["presets"][preset]
            if part == "decode":
                r.update(decode_speed(model, preset, batch, dctx, a.page_size, steps, a.impl, mesh, devices,
                                     a.profile and os.path.join(a.profile, preset), a.page_order == "shuffled"))
            elif part == "loop":
                r.update(loop_speed(model, preset, batch, loop_prompt, loop_new, a.page_size, a.impl, mesh, devices))
            elif part == "prefix":
                r["prefix"] = prefix_saving(model, preset, a.prefix_len, a.page_size, a.impl, mesh=mesh)
            elif part == "sessions":
                n, nbytes, exact = sessions_that_fit(model, preset, context, a.page_size, max_sessions, mesh)
                r.update(sessions=n, kv_bytes=nbytes, sessions_exact=exact)
                if not exact:
                    print(f"{preset}: memory was not returned after a failed allocation; {n} sessions is a lower bound")
            print(part, preset, {k: v for k, v in r.items() if k != "profile"}, flush=True)
            save()
    base = res["presets"].get("bf16")
    print(f"\n{'preset':<8} {'sessions':>9} {'vs bf16':>8} {'decode tok/s':>13} {'vs bf16':>8} {'step ms':>8} "
          f"{'run() tok/s':>12}")
    for p, r in res["presets"].items():
        def ratio(key):
            return f"{r[key] / base[key]:8.2f}" if base and base.get(key) and key in r else f"{'-':>8}"

        def num(key, fmt):
            return format(r[key], fmt) if key in r else "-"

        print(f"{p:<8} {r.get('sessions', '-'):>9} {ratio('sessions')} {num('tokens_per_s', '.1f'):>13} "
              f"{ratio('tokens_per_s')} {num('step_ms', '.2f'):>8} {num('loop_tokens_per_s', '.1f'):>12}")
    for p, r in res["presets"].items():
        for proc, d in r.get("profile", {}).get("devices", {}).items():
            cls = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["by_class"].items(), key=lambda kv: -kv[1]))
            print(f"{p:<8} {proc}: device ms per step {d['busy_ms']:.2f} ({cls})")
            kinds = list(d.get("by_kind", {}).items())[:12]
            print("         " + ", ".join(f"{k} {ms:.3f} ({n})" for k, (ms, n) in kinds))
    for p, r in res["presets"].items():
        if "prefix" in r:
            c, u = r["prefix"]["cached"], r["prefix"]["uncached"]
            print(f"{p:<8} prefix cache, 2nd request with a {a.prefix_len}-token system prompt: "
                  f"{u['prefill_tokens']} -> {c['prefill_tokens']} prompt tokens computed, "
                  f"{u['seconds']:.3f} -> {c['seconds']:.3f} s ({r['prefix']['speedup']:.2f}x)")
    if a.out:
        save()
        print("wrote", a.out)


if __name__ == "__main__":
    main()
