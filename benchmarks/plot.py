"""Draw the committed H200 results (benchmarks/results/*.json) as the figures of BENCHMARKS.md.

    python benchmarks/plot.py                 # writes benchmarks/results/plots/*.png

* ``decode-attention.png``: one decode step at B=8, S=32K per implementation (run D), with
  the peers of the same run (torch SDPA, cuDNN, XLA dequantize + einsum).
* ``decode-unpack.png``: the same step per preset for each way of unpacking the stored
  bytes (run H: 32-bit words split by byte, stored bytes with ``astype``, inline PTX).
* ``chunk-attention.png``: one 1024-token prefill chunk over a 64K quantized past, XLA vs
  the kernel per row tile.
* ``serving.png``: engine decode tokens/s (16 x 32K; 2026-11-30, same machine) and 128K sessions
  per preset, 1 and 2 GPUs.
* ``qk-dot-and-all-reduce.png``: the paged kernel with the int8 q·k dot and the 16-bit path
  (run M), and one tensor-parallel decode all-reduce's latency per NCCL protocol on 2 GPUs.
* ``one-warp.png``: the paged kernel with one-warp programs (the default for sub-byte values)
  against the earlier 4-warp config, same run; engine decode tokens/s per preset by tree (run N).
* ``page-size.png``: the paged kernel's default config per page size, and engine decode
  tokens/s at pages of 64 and 256 (run O).
* ``lazy-rescale.png``: the paged kernel with lazy rescaling and with value tiles scaled in
  registers, against the default (run P; both dropped).
* ``heads-per-program.png``: the paged kernel with one and two KV heads per program, and engine
  decode tokens/s before and after (run Q).
* ``value-pairs.png``: the paged kernel per value layout (token-major, tokens-minor, tokens-minor
  in pairs), and engine decode tokens/s before and after (run R).
* ``key-scales.png``: the paged kernel of two KV heads per program with the per-row key scales
  selected before and after the products, and engine decode tokens/s of both trees, alternated in
  one call (run S).
* ``write-kernel.png``: engine decode tokens/s with one XLA scatter per pool leaf and with the
  write kernel (trees alternated in one call), and the device time per step outside attention
  and matmuls by tree (run T).
* ``quantized-append.png``: engine decode tokens/s with the new key and value quantized by XLA
  before the write kernel and inside it (trees alternated), and the device time per step outside
  attention and matmuls (run U).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _load(name):
    with open(os.path.join(HERE, name)) as f:
        return json.load(f)


def _save(fig, out, name):
    """Write ``fig`` as ``out/name.png`` and free it."""
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)
    plt.close(fig)


def _grouped_bars(ax, names, series, ylabel, title, headroom=1.0, fmt=".0f"):
    """Bars of ``series`` (``[(label, values per name)]``) side by side per name, each labelled
    with its value (format ``fmt``)."""
    w = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        x = [j + (i - (len(series) - 1) / 2) * w for j in range(len(names))]
        ax.bar(x, vals, w, label=label)
        for xj, v in zip(x, vals):
            ax.text(xj, v, format(v, fmt), ha="center", va="bottom", fontsize=8 if len(series) < 3 else 7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, headroom * ax.get_ylim()[1])
    ax.legend(fontsize=8)


def _engine_bars(ax, presets, runs, title="Engine, 8B shape, 16 x 32K, one H200"):
    """Engine decode tokens/s per preset for each ``(label, serve.py result)`` of ``runs``."""
    _grouped_bars(ax, presets, [(label, [res["presets"][n]["tokens_per_s"] for n in presets]) for label, res in runs],
                  "decode tokens/s (higher is better)", title, headroom=1.3)


def decode_attention(out):
    d = _load("decode-h200-runD-2026-11-29.json")
    rows = [r for r in d["rows"] if r["B"] == 8 and r["S"] == 32768
            and not r["impl"].endswith(("-body", "-paged256"))]
    rows.sort(key=lambda r: r["t"])
    torch_us = next(r["t"] for r in rows if r["impl"] == "torch-sdpa-bf16") * 1e6
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["impl"] for r in rows]
    us = [r["t"] * 1e6 for r in rows]
    colors = ["tab:blue" if n.startswith("kvq") else "tab:gray" for n in names]
    ax.barh(names, us, color=colors)
    ax.axvline(torch_us, color="k", lw=0.8, ls="--", label=f"torch SDPA bf16 ({torch_us:.0f} us)")
    for y, (u, r) in enumerate(zip(us, rows)):
        ax.text(u, y, f" {u:.0f} us, {r['tbs']:.2f} TB/s", va="center", fontsize=8)
    ax.set_xlabel("time per decode step (us), lower is better")
    ax.set_title(f"Decode attention, B=8 S=32K Hq=32 Hkv=8 D=128 (H200, jax {d['jax']}, run D)")
    ax.set_xlim(0, max(us) * 1.45)
    ax.legend(loc="lower right")
    _save(fig, out, "decode-attention")


def decode_unpack(out):
    d = _load("decode-h200-runH-2026-11-30.json")
    rows = [r for r in d["rows"] if r["B"] == 8 and r["S"] == 32768 and r.get("cfg")]
    torch_us = next(r["t"] for r in d["rows"] if r["impl"] == "torch-sdpa-bf16") * 1e6
    presets = ["int8", "int4", "int2", "k8v4", "int4-kivi"]
    unpacks = ["split", "bytes", "asm"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.27
    for i, u in enumerate(unpacks):  # best of the value-tile modes timed for each unpacking
        vals = [min(r["t"] for r in rows if r["impl"] == f"kvq-{p}" and f"unpack='{u}'" in r["cfg"]) * 1e6
                for p in presets]
        ax.bar([j + (i - 1) * w for j in range(len(presets))], vals, w, label=f'unpack="{u}"')
    ax.axhline(torch_us, color="k", lw=0.8, ls="--", label=f"torch SDPA bf16 ({torch_us:.0f} us)")
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("us per decode step, lower is better")
    ax.set_title(f"Decode attention by unpacking, B=8 S=32K (H200, jax {d['jax']}, run H)")
    ax.legend()
    _save(fig, out, "decode-unpack")


def chunk_attention(out):
    d = _load("chunk-h200-2026-11-29.json")
    rt = _load("chunk-rowtile-h200-2026-11-29.json")
    presets = list(d["presets"])
    impls = ["xla", "pallas rt32", "pallas rt64", "pallas rt128"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.2
    for i, impl in enumerate(impls):
        vals = [(d["presets"][p].get(impl) or rt["presets"].get(p, {}).get(impl) or {}).get("ms") for p in presets]
        xs = [j + (i - 1.5) * w for j, v in enumerate(vals) if v is not None]
        ax.bar(xs, [v for v in vals if v is not None], w, label=impl.replace("pallas rt", "kernel, row tile "))
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("ms per layer, lower is better")
    ax.set_title(f"Prefill chunk of {d['chunk']} over a past of {d['past']} tokens (H200, jax {d['jax']})")
    ax.legend()
    _save(fig, out, "chunk-attention")


def paged_kernel(out):
    """Run I: the kernel through page tables (B=16, S=32K, page 256) before and after each
    split's page ids were held in registers, with the int8 q·k dot off and on."""
    before = _load("decode-h200-runI-qk-2026-11-30.json")["rows"]
    after = _load("decode-h200-runI-splitpages-2026-11-30.json")["rows"]
    presets = ["int8", "int4", "int2", "k8v4"]

    def t(rows, name, qk):
        return next(r["t"] * 1e6 for r in rows if r["impl"] == f"kvq-{name}-paged256"
                    and f"qk_int8={qk}" in r["cfg"] and "block_k=64" in r["cfg"])

    fig, ax = plt.subplots(figsize=(8, 4))
    bars = [("page table read per block, 16-bit q·k", before, False),
            ("page table read per block, int8 q·k", before, True),
            ("page ids in registers, 16-bit q·k", after, False),
            ("page ids in registers, int8 q·k", after, True)]
    for i, (label, rows, qk) in enumerate(bars):
        ax.bar([j + (i - 1.5) * 0.2 for j in range(len(presets))], [t(rows, p, qk) for p in presets], 0.2, label=label)
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("us per call (lower is better)")
    ax.set_title("Decode kernel through page tables, B=16 S=32K page 256 (H200, jax 0.11.2)")
    ax.legend(fontsize=8)
    _save(fig, out, "paged-kernel")


def serving(out):
    """Engine decode per GPU on 1 GPU, 2 GPUs tensor-parallel and 2 GPUs data-parallel (run J),
    and capacity."""
    one = _load("serve-h200-runJ-final-2026-11-30.json")["presets"]
    tp = dict(_load("serve-h200x2-runJ-final-2026-11-30.json")["presets"])
    tp["bf16"] = _load("serve-h200x2-runJ-order-2026-11-30.json")["presets"]["bf16"]  # see BENCHMARKS.md, run J
    dp = _load("serve-h200x2-runJ-replicas-2026-11-30.json")["presets"]
    runs = _load("sharded-h200x2-8b-2026-11-29b.json")["runs"]
    presets = ["bf16", "int8", "int4"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, src, n) in enumerate((("1 GPU", one, 1), ("2 GPUs tensor-parallel", tp, 2),
                                         ("2 GPUs data-parallel", dp, 2))):
        vals = [src[p]["tokens_per_s"] / n for p in presets]
        a1.bar([j + (i - 1) * 0.27 for j in range(3)], vals, 0.27, label=f"{label} (per GPU)")
    a1.set_xticks(range(3), presets)
    a1.set_ylabel("decode tokens/s per GPU")
    a1.set_title("Engine decode, 16 x 32K per engine, Llama-3-8B shape")
    a1.legend(fontsize=8)
    for i, n in enumerate((1, 2)):
        vals = [next(r["sessions"] for r in runs if r["gpus"] == n and r["preset"] == p) for p in presets]
        a2.bar([j + (i - 0.5) * 0.4 for j in range(3)], vals, 0.4, label=f"{n} GPU" + ("s" if n > 1 else ""))
        for j, v in enumerate(vals):
            a2.text(j + (i - 0.5) * 0.4, v, str(v), ha="center", va="bottom", fontsize=8)
    a2.set_xticks(range(3), presets)
    a2.set_ylabel("concurrent 128K-token sessions")
    a2.set_title("Capacity beside the 16 GB of weights")
    a2.legend()
    _save(fig, out, "serving")


def qk_dot_and_all_reduce(out):
    """Run M: the kernel through page tables with the int8 q·k dot (the default) and the 16-bit
    path, same run; and the latency of one tensor-parallel decode all-reduce on 2 GPUs per NCCL
    protocol."""
    rows = _load("decode-h200-runM-qk-final-2026-11-30.json")["rows"]
    presets = ["int8", "int4", "int2"]

    def t(name, qk):
        return next(r["t"] * 1e6 for r in rows if r["impl"] == f"kvq-{name}-paged256-vT" and f"qk_int8={qk}," in r["cfg"])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _grouped_bars(a1, presets, [(label, [t(p, qk) for p in presets])
                                for label, qk in (("int8 q·k (default)", None), ("16-bit q·k", False))],
                  "us per call (lower is better)", "Decode kernel, paged B=16 S=32K (H200, run M)")
    with open(os.path.join(HERE, "collectives-h200x2-runM-2026-11-30.jsonl")) as f:
        coll = [json.loads(line) for line in f if line.strip()]
    coll = [r for r in coll if r["shape"] == [16, 4096]]
    labels = list(dict.fromkeys(r["label"] for r in coll))
    for i, dt in enumerate(("float32", "bfloat16")):
        vals = [next(r["us_per_all_reduce"] for r in coll if r["label"] == lb and r["dtype"] == dt) for lb in labels]
        a2.bar([j + (i - 0.5) * 0.4 for j in range(len(labels))], vals, 0.4, label=f"[16, 4096] {dt}")
    a2.set_xticks(range(len(labels)), labels)
    a2.set_xlabel("NCCL_PROTO")
    a2.set_ylabel("us per all-reduce (64 chained)")
    a2.set_title("Tensor-parallel all-reduce, 2 x H200 (run M)")
    a2.legend(fontsize=8)
    _save(fig, out, "qk-dot-and-all-reduce")


def one_warp(out):
    """Run N: one-warp programs against the 4-warp config they replaced (same run, paged), and
    the engine's decode tokens/s before (run M's final tree) and after."""
    rows = _load("decode-h200-runN-default-2026-11-30.json")["rows"]
    presets = ["int4", "k8v4", "int2"]

    def t(name, warps):
        return next(r["t"] * 1e6 for r in rows
                    if r["impl"] == f"kvq-{name}-paged256-vT" and f"num_warps={warps}," in r["cfg"])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    configs = (("4 warps (before)", 4), ("1 warp, 32-token blocks (default)", 1))
    _grouped_bars(a1, presets, [(label, [t(p, warps) for p in presets]) for label, warps in configs],
                  "us per call (lower is better)", "Decode kernel, paged B=16 S=32K (H200, run N)", headroom=1.25)
    trees = (("run M final (4ed71a1)", _load("serve-h200-runM-2026-11-30.json")["runs"]["4ed71a1"]),
             ("one warp (598b022)", _load("serve-h200-runN-2026-11-30.json")),
             ("and p once (adce19d; x2 host)", _load("serve-h200x2-runN-1gpu-2026-11-30.json")))
    names = ["bf16", "int8", "int4"]
    _engine_bars(a2, names, trees)
    _save(fig, out, "one-warp")


def page_size(out):
    """Run O: the paged kernel's default config per page size (B=16, S=32K, shuffled pages; at
    pages of 16 and 32 the two-warp programs now picked for bf16 and int8), and the engine's
    decode tokens/s at pages of 64 and 256 (same call)."""
    pages = [16, 32, 64, 256]
    presets = ["bf16", "int8", "int4"]

    def t(name, ps):  # the default config now: 2 warps at pages 16 / 32 but for int4's one warp
        rows = [r for r in _load(f"decode-h200-runO-page{ps}-2026-11-30.json")["rows"]
                if r["impl"] == f"kvq-{name}-paged{ps}-vT"]
        if ps > 32:
            return rows[0]["t"] * 1e6  # the run's default config (variants follow it)
        warps = 1 if name == "int4" else 2
        return next(r["t"] * 1e6 for r in rows if f"num_warps={warps}," in r["cfg"])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _grouped_bars(a1, presets, [(f"page {ps}", [t(n, ps) for n in presets]) for ps in pages],
                  "us per call (lower is better)", "Decode kernel through pages, B=16 S=32K (H200, run O)",
                  headroom=1.2)
    runs = (("page 256", _load("serve-h200-runO-page256-2026-11-30.json")),
            ("page 64", _load("serve-h200-runO-page64-2026-11-30.json")),
            ("page 64, shuffled pages", _load("serve-h200-runO-page64-shuffled-2026-11-30.json")))
    _engine_bars(a2, presets, runs, "Engine, 8B shape, 16 x 32K, one H200 (run O)")
    _save(fig, out, "page-size")


def lazy_rescale(out):
    """Run P: the paged kernel with lazy rescaling and with value tiles scaled in registers (16-bit
    scaling for int4), both dropped (same call; the kernel of commit 7afc090)."""
    rows = [r for r in _load("decode-h200-runP-lazy-2026-11-30.json")["rows"] if "-paged64-" in r["impl"]]
    presets = ["bf16", "int8", "int4", "k8v4"]

    def t(name, vd, lazy, i=0):  # the i-th row of the config (the default ran twice: {} and lazy_rescale=0)
        return [r["t"] * 1e6 for r in rows if r["impl"] == f"kvq-{name}-paged64-vT"
                and f"v_dequant={vd}," in r["cfg"] and f"lazy_rescale={lazy})" in r["cfg"]][i]

    configs = (("default", None, False, 0), ("default again", None, False, 1), ("lazy rescale", None, True, 0),
               ("value tiles scaled", True, False, 0), ("both", True, True, 0))
    fig, ax = plt.subplots(figsize=(9, 4))
    _grouped_bars(ax, presets, [(label, [t(n, vd, lazy, i) for n in presets]) for label, vd, lazy, i in configs],
                  "us per call (lower is better)", "Decode kernel, paged B=16 S=32K, pages of 64 (H200, run P)",
                  headroom=1.25)
    _save(fig, out, "lazy-rescale")


def heads_per_program(out):
    """Run Q: the paged kernel (B=16 S=32K, pages of 64) with one and two KV heads per program (same
    call, the sweep's rows in --vary order), and engine decode tokens/s at run P's tree and run Q's."""
    rows = [r for r in _load("decode-h200-runQ-sweep-2026-11-30.json")["rows"] if "-paged64-" in r["impl"]]
    presets = ["int4", "int8"]

    def t(name, i):  # the i-th variant: {}, heads=1, heads=2 x 16 splits, heads=2 x 32 splits, ...
        return [r["t"] * 1e6 for r in rows if r["impl"] == f"kvq-{name}-paged64-vT"][i]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _grouped_bars(a1, presets, [(label, [t(n, i) for n in presets]) for label, i in
                                (("1 head per program", 1), ("2 heads, 16 splits", 2), ("2 heads, 32 splits", 3))],
                  "us per call (lower is better)", "Decode kernel, paged B=16 S=32K (H200, run Q)", headroom=1.25)
    engines = ("bf16", "int8", "int4")
    runs = (("run P (1 head per program)", _load("serve-h200-runP-2026-11-30.json")),
            ("run Q (2 heads: int8, int4)", _load("serve-h200-runQ-final-2026-11-30.json")))
    _engine_bars(a2, engines, runs)
    _save(fig, out, "heads-per-program")


def value_pairs(out):
    """Run R: the paged kernel (B=16 S=32K, pages of 64) per value layout (same call: token-major,
    tokens-minor, tokens-minor in pairs), and engine decode tokens/s at run Q's tree and run R's."""
    rows = [r for r in _load("decode-h200-runR-pairs-2026-12-01.json")["rows"] if "-paged64" in r["impl"]]
    presets = ["int4", "int4-rot", "k8v4", "int2"]

    def t(name, tag):
        return [r["t"] * 1e6 for r in rows if r["impl"] == f"kvq-{name}-paged64{tag}"][0]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _grouped_bars(a1, presets, [(label, [t(n, tag) for n in presets]) for label, tag in
                                (("values token-major", ""), ("tokens-minor", "-vT"), ("tokens-minor, in pairs", "-vP"))],
                  "us per call (lower is better)", "Decode kernel, paged B=16 S=32K (H200, run R)", headroom=1.25)
    engines = ("bf16", "int8", "int4")
    runs = (("run Q", _load("serve-h200-runQ-final-2026-11-30.json")),
            ("run R, pairs (32 splits)", _load("serve-h200-runR-pairs-2026-12-01.json")),
            ("run R, final tree", _load("serve-h200-runR-2026-12-01.json")))
    _engine_bars(a2, engines, runs)
    _save(fig, out, "value-pairs")


def key_scales(out):
    """Run S: the paged kernel (B=16 S=32K, pages of 64; int4 and int8 run two KV heads per program)
    with each row's key scales selected before the products (the earlier kernel) and after them
    (same call, interleaved), and the engine's decode tokens/s of both trees, run alternately in
    one call (old, new, old, new)."""
    rows = [r for r in _load("decode-h200-runS-scales-2026-12-01.json")["rows"] if "-paged64" in r["impl"]]
    presets = ["int4", "int8"]

    def t(name, after):
        return [r["t"] * 1e6 for r in rows if r["impl"].startswith(f"kvq-{name}-paged64")
                and ("scale_select=True" in r["cfg"]) == after][0]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _grouped_bars(a1, presets, [(label, [t(n, after) for n in presets]) for label, after in
                                (("scales selected, then multiplied", False), ("products selected", True))],
                  "us per call (lower is better)", "Decode kernel, paged B=16 S=32K (H200, run S)", headroom=1.25)
    runs = [(f"{label} ({i})", _load(f"serve-h200-runS-abab-{tree}-{i}-2026-12-01.json"))
            for i in (1, 2) for label, tree in (("before", "old"), ("after", "new"))]
    _engine_bars(a2, ("int8", "int4"), runs, title="Engine, 8B shape, 16 x 32K, one H200 (one call)")
    _save(fig, out, "key-scales")


def write_kernel(out):
    """Run T: the engine's decode tokens/s before (one XLA scatter per pool leaf) and after (one
    write kernel per layer; rematerialization off), both trees run alternately in one call, and
    the profiled device ms per step outside attention and the matmuls (call 1: before; call 4:
    after)."""
    presets = ("bf16", "int8", "int4")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [(f"{label} ({i})", _load(f"serve-h200-runT-abab-{tree}-{i}-2026-12-01.json"))
            for i in (1, 2) for label, tree in (("scatters", "old"), ("write kernel", "new"))]
    _engine_bars(a1, presets, runs, title="Engine, 8B shape, 16 x 32K, one H200 (one call)")

    def other(name):
        res = _load(name)["presets"]
        return [next(iter(res[p]["profile"]["devices"].values()))["by_class"]["other"] for p in presets]

    series = [("scatters (call 1)", other("serve-h200-runT-call1-profile-2026-12-01.json")),
              ("write kernel (call 4)", other("serve-h200-runT-abab-new-1-2026-12-01.json"))]
    _grouped_bars(a2, presets, series, "device ms per step (lower is better)", "Outside attention and matmuls (profiled)",
                  headroom=1.3, fmt=".2f")
    _save(fig, out, "write-kernel")


def quantized_append(out):
    """Run U: the engine's decode tokens/s with the new key and value quantized by XLA before the
    write kernel (run T's tree) and inside it, both trees run alternately (calls 2 and 3), and the
    profiled device ms per step outside attention and the matmuls (run T call 4; run U call 4)."""
    presets = ("int8", "int4")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [(f"{label} ({i})", _load(f"serve-h200-runU-call{c}-{tree}-{i}-2026-12-01.json"))
            for c, i in ((2, 1), (3, 2), (3, 3)) for label, tree in (("XLA quantizes", "old"), ("the kernel", "new"))]
    _engine_bars(a1, presets, runs, title="Engine, 8B shape, 16 x 32K, one H200 (alternated)")

    def other(name):
        res = _load(name)["presets"]
        return [next(iter(res[p]["profile"]["devices"].values()))["by_class"]["other"] for p in ("bf16",) + presets]

    series = [("XLA quantizes (run T)", other("serve-h200-runT-abab-new-1-2026-12-01.json")),
              ("the kernel (run U)", other("serve-h200-runU-call4-new-4-2026-12-01.json"))]
    _grouped_bars(a2, ("bf16",) + presets, series, "device ms per step (lower is better)",
                  "Outside attention and matmuls (profiled)", headroom=1.3, fmt=".2f")
    _save(fig, out, "quantized-append")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "plots"))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for fn in (decode_attention, decode_unpack, chunk_attention, paged_kernel, serving, qk_dot_and_all_reduce,
               one_warp, page_size, lazy_rescale, heads_per_program, value_pairs, key_scales, write_kernel,
               quantized_append):
        fn(a.out)
        print("wrote", os.path.join(a.out, fn.__name__.replace("_", "-") + ".png"))


if __name__ == "__main__":
    main()
