"""Quality cost of the decode kernel's int8 dots (`Config.qk_int8`, `Config.pv_int8`) on a real model.

Scores the same windows of a text through each preset's cache several ways and reports KL to
the bf16 cache, perplexity and top-1 agreement (`kvq_jax.eval.perplexity.evaluate`):

* ``pallas-16bit``: the Pallas kernel with 16-bit q·k and p @ v dots everywhere;
* ``pallas-qk-int8``: the int8 q·k dot wherever the keys can take it (p @ v 16-bit);
* ``pallas-pv-int8``: the int8 p @ v dot wherever the values can take it (q·k 16-bit);
* ``pallas-int8-dots``: both int8 dots wherever they can run;
* ``xla``: the XLA path (f32 math on the same quantized cache).

The kernel's defaults (`kernels.decode.default_qk_int8`, `default_pv_int8`) are replaced for
each run (`_common.kernel_modes`, which clears jax's caches so each run traces anew). Off a
GPU the kernel runs in Pallas interpret mode (slow: ~6 minutes per run for SmolLM2 at the
defaults on 2 cores).

    python benchmarks/qk_int8_quality.py --text emma.txt --out int8_dots_quality.json --png int8_dots_quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from _common import kernel_modes  # benchmarks/_common.py
from kvq_jax.eval import perplexity
from kvq_jax.models.model import load_model

RUNS = {"pallas-16bit": ("pallas", {"qk8": False, "pv8": False}),
        "pallas-qk-int8": ("pallas", {"qk8": True, "pv8": False}),
        "pallas-pv-int8": ("pallas", {"qk8": False, "pv8": True}),
        "pallas-int8-dots": ("pallas", {"qk8": True, "pv8": True}),
        "xla": ("xla", {})}


def run(model, tokenizer, text, presets, context, windows, runs=tuple(RUNS)):
    out = {}
    for label in runs:
        impl, modes = RUNS[label]
        with kernel_modes(modes):
            t0 = time.perf_counter()
            out[label] = perplexity.evaluate(model, tokenizer, text, presets, context=context, windows=windows,
                                             progress=False, batch_size=windows, impl=impl)
        print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
        print(perplexity.format_table(out[label]), flush=True)
    return out


def plot(results, presets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(results)
    for i, label in enumerate(results):
        vals = [results[label][p]["kl_mean"] for p in presets]
        ax.bar([j + (i - (len(results) - 1) / 2) * w for j in range(len(presets))], vals, w, label=label)
    ax.set_xticks(range(len(presets)), presets)
    ax.set_yscale("log")
    ax.set_ylabel("mean KL to the bf16 cache (nats, log scale)")
    ax.set_title("Decode kernel's int8 dots (q·k, p @ v) vs 16-bit vs XLA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--presets", default="int8,k8v4,int4,int4-rot,int2")
    ap.add_argument("--context", type=int, default=512, help="tokens per window (half prefilled, half scored)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--out", default="int8_dots_quality.json")
    ap.add_argument("--png", default=None)
    a = ap.parse_args(argv)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    model, tokenizer = load_model(a.model)
    presets = a.presets.split(",")
    runs = a.runs.split(",")
    if unknown := set(runs) - set(RUNS):
        raise SystemExit(f"--runs: unknown {sorted(unknown)}; expected some of {', '.join(RUNS)}")
    results = run(model, tokenizer, text, presets, a.context, a.windows, runs)
    doc = {"model": a.model, "text": os.path.basename(a.text), "context": a.context, "windows": a.windows,
           "jax": jax.__version__, "backend": jax.default_backend(), "kl": "KL(p_bf16 || p_preset), nats, per scored token",
           "runs": results}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {a.out}")
    if a.png:
        plot(results, presets, a.png)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
