"""Quality cost of the decode kernel's int8 q·k dot (`Config.qk_int8`) on a real model.

Scores the same windows of a text through each preset's cache three ways and reports KL to
the bf16 cache, perplexity and top-1 agreement (`kvq_jax.eval.perplexity.evaluate`):

* ``pallas-qk-int8``: the Pallas kernel with the int8 q·k dot wherever the keys can take it;
* ``pallas-16bit-qk``: the Pallas kernel with the 16-bit q·k path everywhere;
* ``xla``: the XLA path (f32 math on the same quantized cache).

The kernel's default (`kernels.decode.default_qk_int8`) is replaced for each run, and jax's
caches are cleared between runs so each traces anew. Off a GPU the kernel runs in Pallas
interpret mode (slow: ~6 minutes per run for SmolLM2 at the defaults on 2 cores).

    python benchmarks/qk_int8_quality.py --text emma.txt --out qk_int8_quality.json --png qk_int8_quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from kvq_jax.eval import perplexity
from kvq_jax.kernels import decode
from kvq_jax.models.model import load_model

RUNS = (("pallas-qk-int8", "pallas", True), ("pallas-16bit-qk", "pallas", False), ("xla", "xla", None))


def run(model, tokenizer, text, presets, context, windows):
    out = {}
    default = decode.default_qk_int8
    try:
        for label, impl, qk in RUNS:
            if qk is not None:
                decode.default_qk_int8 = (lambda spec, kl: decode.qk_int8_supported(spec, kl)) if qk else (
                    lambda spec, kl: False)
            jax.clear_caches()
            t0 = time.perf_counter()
            out[label] = perplexity.evaluate(model, tokenizer, text, presets, context=context, windows=windows,
                                             progress=False, batch_size=windows, impl=impl)
            print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
            print(perplexity.format_table(out[label]), flush=True)
    finally:
        decode.default_qk_int8 = default
    return out


def plot(results, presets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, label in enumerate(results):
        vals = [results[label][p]["kl_mean"] for p in presets]
        ax.bar([j + (i - 1) * 0.27 for j in range(len(presets))], vals, 0.27, label=label)
    ax.set_xticks(range(len(presets)), presets)
    ax.set_yscale("log")
    ax.set_ylabel("mean KL to the bf16 cache (nats, log scale)")
    ax.set_title("Decode kernel's q·k path: int8 dot vs 16-bit vs XLA")
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
    ap.add_argument("--out", default="qk_int8_quality.json")
    ap.add_argument("--png", default=None)
    a = ap.parse_args(argv)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    model, tokenizer = load_model(a.model)
    presets = a.presets.split(",")
    results = run(model, tokenizer, text, presets, a.context, a.windows)
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
