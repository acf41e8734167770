"""Shared by the benchmarks: model shapes, random models, capacity by allocation, and timing
of chained jitted steps."""

from __future__ import annotations

import gc
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp


# Llama-3-shaped models (random bf16 weights in the benchmarks) and a small CPU smoke shape
SHAPES = {
    "8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
               ffn_dim=14336, rope_theta=500000.0),
    "70b": dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                ffn_dim=28672, rope_theta=500000.0),
}


def is_oom(e: Exception) -> bool:
    """True for a device out-of-memory error."""
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def device_bytes_in_use() -> int:
    """Bytes in use on all local devices (0 where the backend does not say)."""
    return sum((d.memory_stats() or {}).get("bytes_in_use", 0) for d in jax.local_devices())


def most_that_fit(allocate, limit: int) -> tuple[int, int, bool]:
    """Largest n in [0, limit] for which ``allocate(n)`` succeeds (doubling, then bisection).

    ``allocate(n)`` allocates n sessions, returns their bytes and frees them; an
    out-of-memory error means n does not fit (other errors propagate). After a failed
    attempt the device memory in use must be back where it was (with jax 0.11.2 a failed
    multi-device allocation was seen to keep its partial outputs alive, which would make
    every later attempt fail); if it is not, the search stops there.
    Returns ``(n, bytes of n sessions, exact)``: ``exact`` False when the search stopped
    early, n then being a lower bound.
    """
    leaked = []

    def fits(n):
        before = device_bytes_in_use()
        try:
            return allocate(n)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
        finally:
            gc.collect()
        if device_bytes_in_use() > before + (64 << 20):  # the failed attempt kept memory
            leaked.append(n)
        return None

    lo, lo_bytes, hi, n = 0, 0, None, 1
    while hi is None:
        b = fits(n)
        if b is None:
            hi = n
        else:
            lo, lo_bytes = n, b
            if n >= limit:
                return lo, lo_bytes, True
            n = min(2 * n, limit)
    while hi - lo > 1 and not leaked:
        mid = (lo + hi) // 2
        b = fits(mid)
        if b is None:
            hi = mid
        else:
            lo, lo_bytes = mid, b
    return lo, lo_bytes, not leaked


def time_steps(advance, steps: int, reps: int = 3) -> tuple[float, float]:
    """Seconds per step of ``advance`` and the seconds of its first (compiling) call.

    ``advance(i)`` runs step i (each step consuming the previous one's output) and returns
    an array to wait on. Call 0 compiles; one untimed batch of ``steps`` chained calls warms
    up (a second input layout, lazy set-up: a first 2-GPU measurement once ran 1.6-1.8x slow
    for a whole process's first preset); then ``reps`` batches of ``steps`` chained calls,
    one sync per batch; the median batch gives the time per step.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(advance(0))
    compile_s = time.perf_counter() - t0
    times = []
    for rep in range(-1, reps):
        t0 = time.perf_counter()
        for i in range(steps):
            out = advance(1 + (rep + 1) * steps + i)
        jax.block_until_ready(out)
        if rep >= 0:
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), compile_s


def random_model(config, mesh=None):
    """A `LlamaModel` with random bf16 weights; with a mesh, created already split over it
    (Megatron, `kvq.sharding.param_sharding`), so a model larger than one device fits."""
    from flax import nnx

    import kvq_jax as kvq
    from kvq_jax.models import LlamaModel

    def build():
        return LlamaModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    if mesh is None:
        return build()
    abstract = nnx.eval_shape(build)
    shardings = kvq.sharding.param_sharding(abstract, mesh)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(nnx.graphdef(abstract), state)


# kernel-name patterns of the profile summary's classes, first match wins
KERNEL_CLASSES = (("attention", ("kvq_decode",)),
                  ("matmul", ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul", "dot")),
                  ("collective", ("nccl", "all-reduce", "all_reduce", "allreduce", "all-gather")),
                  ("copy", ("memcpy", "memset", "copy")))


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pats in KERNEL_CLASSES:
        if any(p in low for p in pats):
            return cls
    return "other"


def kernel_kind(name: str) -> str:
    """A kernel's name without XLA's numeric and rematerialization suffixes
    (``input_scatter_fusion_63_remat2`` -> ``input_scatter_fusion``)."""
    return re.sub(r"(_(remat)?\d+)+$", "", name)


def profile_steps(advance, steps: int, log_dir: str, top: int = 25) -> dict:
    """Device time per step of ``advance`` (see `time_steps`), by kernel, from a JAX profile.

    Runs ``steps`` chained calls under ``jax.profiler.trace(log_dir, create_perfetto_trace=True)``
    and reads the trace back: every event on a ``Stream`` line of a ``/device:...`` process is a
    kernel (or copy) on that device (every event of the process where it has no such lines); the
    trace is kept as ``log_dir/trace.json.gz``. Returns ``{"devices": {process: {"busy_ms", "by_class": {class: ms}, "top":
    [[name, ms, calls], ...]}}}``, all per step (the trace's total over ``steps``); classes by
    `KERNEL_CLASSES`; ``"by_kind"``: ``{kind: [ms, calls]}`` per step, by the kernel's name without
    its numeric suffixes (`kernel_kind`: every ``input_scatter_fusion_N`` together). Device lanes that overlap (several streams) are summed, so busy_ms can
    exceed the step's wall time.
    """
    import glob
    import gzip
    import json
    import shutil
    from collections import defaultdict

    os.makedirs(log_dir, exist_ok=True)
    jax.block_until_ready(advance(0))  # compiled outside the trace
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for i in range(steps):
            out = advance(1 + i)
        jax.block_until_ready(out)
    path = max(glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True), key=os.path.getmtime)
    path = shutil.copy(path, os.path.join(log_dir, "trace.json.gz"))  # beside the profiler's nested folders
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    lines = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    # a GPU's process also holds derived lines (XLA Modules, XLA Ops, ...) over its streams' kernels
    streams = {k for k, v in lines.items() if procs.get(k[0], "").startswith("/device:") and v.startswith("Stream")}
    per = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in events:
        name = procs.get(e.get("pid"), "")
        lane = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and name.startswith("/device:") and (lane in streams or not streams):
            acc = per[name][e["name"]]
            acc[0] += e["dur"] / 1e3 / steps
            acc[1] += 1
    out = {}
    for proc, kernels in sorted(per.items()):
        by_class = defaultdict(float)
        by_kind = defaultdict(lambda: [0.0, 0])
        for kname, (ms, n) in kernels.items():
            by_class[kernel_class(kname)] += ms
            by_kind[kernel_kind(kname)][0] += ms
            by_kind[kernel_kind(kname)][1] += n // steps
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
        out[proc] = dict(busy_ms=sum(ms for ms, _ in kernels.values()), by_class=dict(by_class),
                         by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1][0])),
                         top=[[k, ms, n // steps] for k, (ms, n) in ranked])
    return dict(steps=steps, trace=path, devices=out)
