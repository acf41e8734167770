"""Perplexity and KL divergence of quantized KV caches against the bf16 cache, on real text.

    from kvq_jax.eval import perplexity
    model, tok = kvq.models.load("smollm2-135m")
    res = perplexity.evaluate(model, tok, text, ["int8", "int4-kivi"], context=2048, windows=4)
    res["int4-kivi"]["delta_ppl_pct"], res["int4-kivi"]["kl_mean"]

Protocol, per window of ``context`` tokens (windows do not overlap):

1. The first half is the prompt: it is prefilled into the preset's cache exactly as
   `kvq.generate` does it (attention on the prompt's own full-precision K/V, then the
   K/V are quantize-appended).
2. The second half is scored token by token through the cache (teacher forcing): each
   step runs the model on one true token with the cache, which appends its K/V and then
   attends through the quantized cache, as generate's decode loop does. All steps of a
   window run in one jit, a ``lax.scan`` over the steps.
3. The same windows go through the bf16 cache; its next-token log-probabilities are the
   reference for KL(p_bf16 || p_preset) and top-1 agreement.

The first scored token is predicted from the prefill (identical for every cache); the
other ``context/2 - 1`` from the decode steps. Windows are batched (``batch_size`` per
jit call): on a CPU one weight read then serves several tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvq_jax.nn import init_caches, resolve_policy
from kvq_jax.spec import KVSpec

DEFAULT_PRESETS = ("bf16", "int8", "int4", "int4-kivi", "int2-kivi")
METRIC_KEYS = ("ppl", "delta_ppl_pct", "kl_mean", "kl_p99", "top1", "bits_per_element", "windows", "tokens")


# ----------------------------------------------------------------------------- windows


def tokenize(tokenizer_or_tokens, text: str | None = None) -> np.ndarray:
    """Token ids ``int32[N]`` of ``text`` (with a tokenizer), or the given ids as they are.

    Args:
      tokenizer_or_tokens: an object with ``encode(text, add_special_tokens=...)`` (a
        `kvq_jax.models.Tokenizer` or a Hugging Face tokenizer), or a 1-D int sequence.
      text: the text, when a tokenizer is given.
    """
    if hasattr(tokenizer_or_tokens, "encode"):
        if text is None:
            raise ValueError("text: required when a tokenizer is given")
        try:
            ids = tokenizer_or_tokens.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer_or_tokens.encode(text)
        ids = getattr(ids, "ids", ids)
    else:
        ids = tokenizer_or_tokens
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"tokens: expected a 1-D int sequence, got {ids.dtype}{list(ids.shape)}")
    return ids.astype(np.int32)


def make_windows(tokens: np.ndarray, context: int, windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``int32[W, context]`` of ``tokens``.

    With ``windows=None``, every whole window from the start. Otherwise ``windows``
    windows spread evenly over the text: window i starts at ``i * (N // windows)``.

    Raises:
      ValueError: when the text holds fewer than ``windows`` windows of ``context`` tokens.
    """
    tokens = np.asarray(tokens, np.int32)
    n = tokens.shape[0]
    if context < 2:
        raise ValueError(f"context: expected >= 2, got {context}")
    fit = n // context
    if windows is None:
        windows = fit
    if windows < 1 or windows > fit:
        raise ValueError(f"windows: the text has {n} tokens: room for {fit} windows of {context} tokens, "
                         f"asked for {windows}")
    stride = n // windows
    return np.stack([tokens[i * stride: i * stride + context] for i in range(windows)])


# ----------------------------------------------------------------------------- the compiled scorer


def _runner(model, caches, scan_layers):
    if scan_layers and hasattr(model, "scanned"):
        runner = model.scanned([c.spec for c in caches])
        return runner, runner.stack_caches(caches)
    return model, caches


@partial(jax.jit, static_argnames=("graphdef", "impl", "scan_layers", "return_logp"))
def _score_jit(graphdef, state, caches, prompt, targets, ref_logp, *, impl, scan_layers, return_logp):
    """Prefill ``prompt [B, P]``, then teacher-force ``targets [B, N]`` through the caches.

    Returns per scored token, each ``[N, B]``: nll (f32), argmax (int32), and when
    ``ref_logp [N, B, V]`` is given, KL(ref || p) and ``argmax == argmax(ref)``; with
    ``return_logp`` also the log-probs ``f32[N, B, V]``.
    """
    model = nnx.merge(graphdef, state)
    model, caches = _runner(model, caches, scan_layers)
    B, P = prompt.shape
    N = targets.shape[1]
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None, :], (B, P))
    h, caches = model.hidden(prompt, positions, caches, prefill=True, impl=impl)
    logits0 = model.logits(h[:, -1])  # [B, V]: predicts targets[:, 0]

    def stats(logits, target, ref):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        out = {"nll": -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0],
               "argmax": jnp.argmax(logp, axis=-1).astype(jnp.int32)}
        if ref is not None:
            out["kl"] = jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1)
            out["agree"] = out["argmax"] == jnp.argmax(ref, axis=-1)
        if return_logp:
            out["logp"] = logp
        return out

    first = stats(logits0, targets[:, 0], None if ref_logp is None else ref_logp[0])

    def step(caches, xs):
        i, tok, target, ref = xs
        logits, caches = model(tok[:, None], (P + i) * jnp.ones((B, 1), jnp.int32), caches, impl=impl)
        return caches, stats(logits[:, 0], target, ref)

    xs = (jnp.arange(N - 1, dtype=jnp.int32), targets[:, :-1].T, targets[:, 1:].T,
          None if ref_logp is None else ref_logp[1:])
    _, rest = jax.lax.scan(step, caches, xs)
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def score(model, windows: np.ndarray, kv="bf16", ref_logp=None, *, return_logp: bool = False,
          impl: str = "auto", scan_layers: bool = False) -> dict:
    """Score the second half of each window through a ``kv`` cache (see the module docstring).

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      windows: ``int[B, C]`` token windows; the first ``C // 2`` are the prompt.
      kv: cache policy (preset name, KVSpec or per-layer policy).
      ref_logp: optional ``f32[N, B, V]`` reference log-probs (from ``return_logp``) for KL / top-1.

    Returns:
      numpy arrays ``[N, B]`` (N = C - C // 2): "nll", "argmax", and with ``ref_logp``
      "kl" and "agree"; with ``return_logp`` "logp" ``[N, B, V]`` as a jax array.
    """
    windows = np.asarray(windows, np.int32)
    B, C = windows.shape
    P = C // 2
    L, Hkv, D = model.num_layers, model.num_kv_heads, model.head_dim
    caches = init_caches(resolve_policy(kv, L), B, C, Hkv, D)
    graphdef, state = nnx.split(model)
    out = _score_jit(graphdef, state, caches, jnp.asarray(windows[:, :P]), jnp.asarray(windows[:, P:]),
                     ref_logp, impl=impl, scan_layers=bool(scan_layers), return_logp=bool(return_logp))
    return {k: (v if k == "logp" else np.asarray(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------- evaluate


def _name(kv) -> str:
    return kv if isinstance(kv, str) else str(kv)


def evaluate(model, tokenizer_or_tokens, text: str | None = None, presets: Sequence = DEFAULT_PRESETS,
             context: int = 2048, windows: int | None = None, progress: bool = True, *,
             batch_size: int = 4, impl: str = "auto", scan_layers: bool = False) -> dict:
    """Perplexity, KL and top-1 agreement of each cache preset against the bf16 cache.

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      tokenizer_or_tokens: a tokenizer (then ``text`` is tokenized, no special tokens)
        or the token ids ``int[N]`` themselves (``text`` ignored).
      text: the evaluation text.
      presets: preset names or KVSpecs (a per-layer policy works too: it is named by
        ``str``). The bf16 cache always runs as the reference; list "bf16" to report it.
      context: tokens per window; the first ``context // 2`` are prefilled, the rest scored.
      windows: number of non-overlapping windows, spread over the text (None: all).
      progress: a tqdm bar over (window batches) x (bf16 + presets).
      batch_size: windows per compiled call.
      impl: attention implementation over the caches.
      scan_layers: run the blocks under ``lax.scan`` (`LlamaModel.scanned`). Off by
        default: inside the decode scan, the scanned model slices and re-stacks every
        layer's cache at each step; on a CPU the unrolled model decodes 2.5-3x faster
        (SmolLM2, 2K context) for a longer compile (~10-20 s per preset).

    Returns:
      ``{name: {"ppl", "delta_ppl_pct", "kl_mean", "kl_p99", "top1", "bits_per_element",
      "windows", "tokens", "ppl_per_window", "seconds"}}`` in the order of ``presets``:
      ppl = exp(mean NLL of the scored tokens); delta_ppl_pct = 100 (ppl / ppl_bf16 - 1);
      kl_mean, kl_p99: mean and 99th percentile over scored tokens of
      KL(p_bf16 || p_preset) in nats; top1: fraction of scored tokens whose argmax equals
      the bf16 cache's; bits_per_element: `KVSpec.bits_per_element(head_dim)` (the mean
      over layers for a per-layer policy); tokens: scored tokens; seconds: wall time of this preset.
    """
    tokens = tokenize(tokenizer_or_tokens, text)
    wins = make_windows(tokens, context, windows)
    W = wins.shape[0]
    batch_size = max(1, min(int(batch_size), W))
    batches = [wins[i:i + batch_size] for i in range(0, W, batch_size)]
    names = [_name(p) for p in presets]
    if len(set(names)) != len(names):
        raise ValueError(f"presets: duplicate names in {names}")
    others = [(n, p) for n, p in zip(names, presets) if n != "bf16"]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=W * (1 + len(others)), desc="eval", unit="win", file=sys.stderr)

    acc = {n: {"nll": [], "kl": [], "agree": [], "seconds": 0.0} for n in ["bf16"] + [n for n, _ in others]}
    for wb in batches:
        if bar is not None:
            bar.set_postfix_str("bf16")
        t0 = time.perf_counter()
        ref = score(model, wb, "bf16", return_logp=True, impl=impl, scan_layers=scan_layers)
        ref_logp = ref.pop("logp")
        ref_logp.block_until_ready()
        acc["bf16"]["seconds"] += time.perf_counter() - t0
        acc["bf16"]["nll"].append(ref["nll"])
        acc["bf16"]["kl"].append(np.zeros_like(ref["nll"]))
        acc["bf16"]["agree"].append(np.ones_like(ref["nll"], bool))
        if bar is not None:
            bar.update(len(wb))
        for n, p in others:
            if bar is not None:
                bar.set_postfix_str(n)
            t0 = time.perf_counter()
            r = score(model, wb, p, ref_logp, impl=impl, scan_layers=scan_layers)
            acc[n]["seconds"] += time.perf_counter() - t0
            for k in ("nll", "kl", "agree"):
                acc[n][k].append(r[k])
            if bar is not None:
                bar.update(len(wb))
        del ref_logp
    if bar is not None:
        bar.close()

    def summary(n, p):
        a = acc[n]
        nll = np.concatenate(a["nll"], axis=1)  # [N, W]
        kl = np.concatenate(a["kl"], axis=1)
        agree = np.concatenate(a["agree"], axis=1)
        specs = resolve_policy(p, model.num_layers)  # a preset, a KVSpec or one spec per layer
        bpe = float(np.mean([s.bits_per_element(model.head_dim) for s in specs]))
        return {"ppl": float(np.exp(nll.mean(dtype=np.float64))), "kl_mean": float(kl.mean(dtype=np.float64)),
                "kl_p99": float(np.percentile(kl, 99)), "top1": float(agree.mean()), "bits_per_element": bpe,
                "windows": int(W), "tokens": int(nll.size),
                "ppl_per_window": [float(x) for x in np.exp(nll.mean(axis=0, dtype=np.float64))],
                "seconds": round(a["seconds"], 2)}

    base = summary("bf16", "bf16")
    out = {}
    for n, p in zip(names, presets):
        s = base if n == "bf16" else summary(n, p)
        s["delta_ppl_pct"] = 100.0 * (s["ppl"] / base["ppl"] - 1.0)
        out[n] = {k: s[k] for k in METRIC_KEYS + ("ppl_per_window", "seconds")}
    return out


# ----------------------------------------------------------------------------- table and CLI


def format_table(results: dict) -> str:
    """A fixed-width text table of `evaluate`'s results."""
    head = f"{'preset':<12} {'bits/el':>7} {'ppl':>9} {'Δppl %':>8} {'KL mean':>9} {'KL p99':>9} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    for n, r in results.items():
        bpe = "-" if r["bits_per_element"] is None else f"{r['bits_per_element']:.2f}"
        lines.append(f"{n:<12} {bpe:>7} {r['ppl']:>9.4f} {r['delta_ppl_pct']:>+8.3f} {r['kl_mean']:>9.2e} "
                     f"{r['kl_p99']:>9.2e} {r['top1']:>7.4f}")
    any_r = next(iter(results.values()), None)
    if any_r is not None:
        lines.append(f"({any_r['windows']} windows, {any_r['tokens']} scored tokens per preset)")
    return "\n".join(lines)


def plot_quality(results: dict, path: str, title: str | None = None) -> str:
    """Bar charts of Δppl (%), mean KL and top-1 disagreement per preset (`evaluate`'s results), as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "bf16"] or list(results)
    x = np.arange(len(names))
    bits = [results[n]["bits_per_element"] for n in names]
    labels = [n if b is None else f"{n}\n{b:.2f} b/el" for n, b in zip(names, bits)]
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 0.62 * len(names) * 3 + 1.0), 4.0))
    panels = [("delta_ppl_pct", "Δ perplexity vs bf16 cache (%)", "linear"),
              ("kl_mean", "mean KL(p_bf16 || p) (nats)", "log"),
              ("top1", "top-1 disagreement with bf16 (%)", "log")]
    for ax, (key, label, scale) in zip(axes, panels):
        vals = np.asarray([results[n][key] for n in names], float)
        if key == "top1":
            vals = 100.0 * (1.0 - vals)
        raw = vals
        if scale == "log":
            vals = np.maximum(vals, 1e-2 if key == "top1" else 1e-7)
        bars = ax.bar(x, vals, color=["#4477aa" if v >= 0 else "#cc6677" for v in vals])
        ax.set_yscale("symlog" if key == "delta_ppl_pct" else scale,
                      **({"linthresh": 1.0} if key == "delta_ppl_pct" else {}))
        if key == "kl_mean":
            p99 = np.maximum([results[n]["kl_p99"] for n in names], 1e-7)
            ax.scatter(x, p99, marker="_", s=200, color="k", label="p99", zorder=3)
            ax.legend(fontsize=7)
        long = max(len(n) for n in names) > 10  # long names (policies, calibrated variants): slanted labels
        ax.set_xticks(x, labels, fontsize=7, rotation=30 if long else 0, ha="right" if long else "center")
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        for b, v, r in zip(bars, vals, raw):
            ax.annotate(f"{r:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
    r0 = results[names[0]]
    fig.suptitle(title or f"KV cache quality against the bf16 cache ({r0['windows']} windows, "
                 f"{r0['tokens']} scored tokens per preset)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``kvq-jax eval`` arguments (pass a subparser to fill it)."""
    p = parser or argparse.ArgumentParser(prog="kvq-jax eval",
                                          description="Perplexity / KL of quantized KV caches against bf16.")
    p.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    p.add_argument("--kv", default=",".join(DEFAULT_PRESETS),
                   help="comma-separated presets (or canonical spec strings separated by ';')")
    p.add_argument("--context", type=int, default=2048, help="tokens per window (half prefilled, half scored)")
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all that fit)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per compiled call")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="write bar charts of Δppl / KL / top-1 here (needs matplotlib)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face directory")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M shapes with random weights; the text's UTF-8 bytes are the tokens")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--scan-layers", action="store_true", help="scan the blocks (faster compile, slower steps)")
    p.add_argument("--no-progress", action="store_true")
    return p


def split_presets(s: str) -> list[str]:
    """"int8,int4-kivi" -> ["int8", "int4-kivi"]; canonical specs (which contain commas) are separated by ';'."""
    if ";" in s or "=" in s:
        return [x.strip() for x in s.split(";") if x.strip()]
    return [x.strip() for x in s.split(",") if x.strip()]


def load_for_cli(name: str, random_weights: bool):
    """(model, tokenizer or None) for the CLI; with random weights there is no tokenizer."""
    if random_weights:
        from kvq_jax.models.config import SMOLLM2_135M
        from kvq_jax.models.model import LlamaModel
        from kvq_jax.models.params import init_random_params

        return LlamaModel.from_params(SMOLLM2_135M, init_random_params(SMOLLM2_135M, seed=0)), None
    from kvq_jax.models.model import load_model

    return load_model(name)


def byte_tokens(text: str, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes of ``text`` as token ids (for random-weight models without a tokenizer)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) % vocab_size


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> dict:
    """``kvq-jax eval``: print the quality table and write it as JSON.

    ``model`` / ``tokenizer`` may be given directly (tests, notebooks); then ``--model``
    and ``--random-weights`` are ignored, and without a tokenizer the text's bytes are the tokens.
    """
    args = build_parser().parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_for_cli(args.model, args.random_weights)
    source = tokenizer if tokenizer is not None else byte_tokens(text, model.config.vocab_size)
    presets = split_presets(args.kv)
    for p in presets:
        KVSpec.parse(p)  # fail early on a bad name
    results = evaluate(model, source, text, presets, context=args.context, windows=args.windows,
                       progress=not args.no_progress, batch_size=args.batch_size, impl=args.impl,
                       scan_layers=args.scan_layers)
    wall = time.perf_counter() - t0
    print(format_table(results))
    print(f"wall time {wall:.1f} s")
    if args.json:
        doc = {
            "model": "random-weights" if args.random_weights else args.model,
            "text": args.text, "context": args.context, "prompt_tokens": args.context // 2,
            "scored_tokens_per_window": args.context - args.context // 2,
            "kl": "KL(p_bf16 || p_preset), nats, per scored token",
            "jax": jax.__version__, "backend": jax.default_backend(), "wall_s": round(wall, 1),
            "results": results,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    if args.png:
        plot_quality(results, args.png)
        print(f"wrote {args.png}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
