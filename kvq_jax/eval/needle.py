"""Needle in a haystack: can greedy generation through a quantized cache retrieve a fact?

    from kvq_jax.eval import needle
    res = needle.run(model, tok, long_text, ["bf16", "int4-kivi"], contexts=(1024, 2048), depths=(0, 50, 100))
    needle.plot_needle(res, "needle.png")

Each cell (context length C, depth d%) builds one prompt of exactly C tokens: a
haystack of long text with the needle sentence (" The secret passcode is 48213.")
inserted at the sentence boundary nearest d% of the haystack, followed by a question
whose answer the model is to complete ("... Answer: The secret passcode is"). The
model then generates greedily with `kvq.generate` through each preset's cache; the
cell counts as retrieved when the first number in the generated text is the key.

The prompt's prefill does not depend on the cache format (full-precision attention
over the prompt, then quantize-append), so by default it runs once per cell, in a
bf16 cache; each preset's cache is then built by appending that cache's bf16 K/V (the
very values the prefill would have quantized), and the answer is decoded with
`kvq.generate(..., caches=...)`: identical to ``kvq.generate(model, prompt, kv=preset)``
at a fraction of the cost (``shared_prefill=False`` runs exactly that instead).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvq_jax.cache import append, init_cache
from kvq_jax.generate import generate
from kvq_jax.nn import resolve_policy

NEEDLE = " The secret passcode is {key}."
QUESTION = "What is the secret passcode mentioned in the text above?"
ANSWER_PREFIX = "The secret passcode is"
FORMATS = ("plain", "chat")
DEFAULT_CONTEXTS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_PRESETS = ("bf16", "int8", "int4-kivi", "int2-kivi")


class ByteTokenizer:
    """UTF-8 bytes as token ids: a stand-in tokenizer for models with random weights."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def _encode(tok, text: str) -> list[int]:
    try:
        ids = tok.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tok.encode(text)
    return list(getattr(ids, "ids", ids))


def prompt_parts(tokenizer, fmt: str = "plain") -> tuple[str, str]:
    """(text before the haystack, text after it) of the retrieval prompt.

    ``plain``: a completion prompt, ``haystack + "\\n\\nQuestion: ...\\nAnswer: The secret passcode is"``.
    ``chat``: the haystack and question as one user turn of the tokenizer's chat
    template, the assistant's answer started with "The secret passcode is".
    """
    if fmt == "plain":
        return "", f"\n\nQuestion: {QUESTION}\nAnswer: {ANSWER_PREFIX}"
    if fmt == "chat":
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("fmt: 'chat' needs a tokenizer with apply_chat_template")
        mark = "\x00HAYSTACK\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark + f"\n\n{QUESTION}"}],
                                             add_generation_prompt=True)
        before, after = text.split(mark)
        return before, after + ANSWER_PREFIX
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")


def _boundaries(tokenizer, hay_ids: np.ndarray) -> np.ndarray:
    """Token indices i such that token i - 1 ends a sentence (its text ends with '.', '!', '?', or a newline)."""
    ends = []
    for i, t in enumerate(hay_ids):
        s = tokenizer.decode([int(t)])
        if s.rstrip(" ").endswith((".", "!", "?", "\n", '."', '!"', '?"')):
            ends.append(i + 1)
    return np.asarray([0] + ends, np.int64)


class PromptBuilder:
    """Builds retrieval prompts of an exact token length from one tokenized haystack.

    Args:
      tokenizer: encodes/decodes text (`kvq_jax.models.Tokenizer` or `ByteTokenizer`).
      haystack: long text; the first tokens of it fill each prompt.
      fmt: "plain" or "chat" (see `prompt_parts`).
      max_context: longest prompt that will be asked for (tokens).
    """

    def __init__(self, tokenizer, haystack: str, fmt: str = "plain", max_context: int = 8192):
        self.tokenizer = tokenizer
        before, after = prompt_parts(tokenizer, fmt)
        self.prefix = np.asarray(_encode(tokenizer, before), np.int32)
        self.suffix = np.asarray(_encode(tokenizer, after), np.int32)
        hay = np.asarray(_encode(tokenizer, haystack), np.int32)
        if hay.shape[0] < max_context:
            raise ValueError(f"haystack: {hay.shape[0]} tokens, need at least {max_context}")
        self.hay = hay[:max_context]
        self.bounds = _boundaries(tokenizer, self.hay)

    def build(self, context: int, depth: float, key: str) -> tuple[np.ndarray, int]:
        """(prompt ``int32[context]``, token index where the needle starts) for depth in [0, 1]."""
        needle = np.asarray(_encode(self.tokenizer, NEEDLE.format(key=key)), np.int32)
        n_hay = context - len(self.prefix) - len(needle) - len(self.suffix)
        if n_hay < 1:
            raise ValueError(f"context: {context} tokens cannot hold the needle and the question")
        b = self.bounds[self.bounds <= n_hay]
        at = int(b[np.argmin(np.abs(b - depth * n_hay))])
        ids = np.concatenate([self.prefix, self.hay[:at], needle, self.hay[at:n_hay], self.suffix])
        assert ids.shape[0] == context
        return ids.astype(np.int32), len(self.prefix) + at


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (None if there is none)."""
    m = re.search(r"\d+", text)
    return None if m is None else m.group(0)


_append_jit = jax.jit(append)


def requantize(caches, kv, max_len: int):
    """Caches of policy ``kv`` holding the same tokens as the bf16 ``caches`` (one sequence each, no sinks).

    Appends each layer's stored bf16 K/V to an empty cache of the new spec: the values
    and the math of a prefill's quantize-append.
    """
    specs = resolve_policy(kv, len(caches))
    out = []
    for c, spec in zip(caches, specs):
        if c.spec.quantized or c.spec.sinks:
            raise ValueError("caches: expected plain bf16 caches")
        n = int(np.max(np.asarray(c.lengths)))
        k = jnp.swapaxes(c.k[:, :, :n], 1, 2)  # [B, n, Hkv, D]
        v = jnp.swapaxes(c.v[:, :, :n], 1, 2)
        empty = init_cache(spec, c.batch, max_len, c.num_kv_heads, c.head_dim, c.res_k.dtype)
        out.append(_append_jit(empty, k, v, c.lengths))
    return tuple(out)


def _answer(tokenizer, first: int, rest) -> str:
    return tokenizer.decode([int(first)] + [int(t) for t in np.asarray(rest).reshape(-1)])


def run(model, tokenizer, haystack: str, presets: Sequence = DEFAULT_PRESETS,
        contexts: Sequence[int] = DEFAULT_CONTEXTS, depths: Sequence[float] = DEFAULT_DEPTHS, *,
        trials: int = 1, fmt: str = "plain", max_new_tokens: int = 8, seed: int = 0,
        shared_prefill: bool = True, progress: bool = True, impl: str = "auto",
        max_len: int | None = None) -> dict:
    """Needle retrieval accuracy on a grid of depth x context, per cache preset.

    Args:
      model: a `kvq_jax.models.LlamaModel`.
      tokenizer: its tokenizer (`ByteTokenizer` for random-weight models).
      haystack: long text (at least ``max(contexts)`` tokens).
      presets: cache presets (names or KVSpecs).
      contexts: prompt lengths in tokens (needle and question included).
      depths: needle depths in percent of the haystack (0 = start, 100 = end).
      trials: prompts per cell, each with its own random 5-digit key.
      fmt: "plain" (completion) or "chat" (the tokenizer's chat template).
      max_new_tokens: tokens generated for the answer.
      shared_prefill: prefill once per prompt in bf16 and requantize (see the module docstring).
      max_len: cache capacity of every run (default ``max(contexts) + max_new_tokens``: one
        size for all contexts, so each preset's decode compiles once).

    Returns:
      ``{"contexts", "depths", "presets", "format", "trials", "accuracy":
      {preset: [[acc of depth i at context j]]} (rows: depths, columns: contexts),
      "cells": [{"context", "depth", "trial", "key", "needle_at", "answers": {preset: text},
      "correct": {preset: bool}}], "seconds"}``.
    """
    names = [p if isinstance(p, str) else str(p) for p in presets]
    contexts = [int(c) for c in contexts]
    depths = [float(d) for d in depths]
    builder = PromptBuilder(tokenizer, haystack, fmt, max(contexts))
    rng = np.random.default_rng(seed)
    hits = {n: np.zeros((len(depths), len(contexts))) for n in names}
    cells = []
    total = len(contexts) * len(depths) * trials
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total * len(names), desc="needle", unit="gen", file=sys.stderr)
    t0 = time.perf_counter()
    max_len = max(contexts) + max_new_tokens if max_len is None else int(max_len)
    for j, C in enumerate(contexts):
        for i, d in enumerate(depths):
            for t in range(trials):
                key = str(int(rng.integers(10000, 100000)))
                ids, at = builder.build(C, d / 100.0, key)
                answers = {}
                if shared_prefill:
                    out = generate(model, ids[None], 1, kv="bf16", max_len=max_len, bucket=C, eos_id=(),
                                   impl=impl)
                    first = int(np.asarray(out.tokens)[0, 0])
                    base = out.caches
                for n, p in zip(names, presets):
                    if bar is not None:
                        bar.set_postfix_str(f"{C} tok, {d:g}%, {n}")
                    if shared_prefill:
                        if max_new_tokens == 1:
                            rest = np.zeros((1, 0), np.int32)
                        else:
                            caches = (jax.tree.map(jnp.copy, base) if n == "bf16"
                                      else requantize(base, p, max_len))
                            o = generate(model, np.asarray([[first]], np.int32), max_new_tokens - 1,
                                         caches=caches, eos_id=(), impl=impl)
                            rest = o.tokens
                        answers[n] = _answer(tokenizer, first, rest)
                    else:
                        o = generate(model, ids[None], max_new_tokens, kv=p, max_len=max_len, bucket=C,
                                     eos_id=(), impl=impl)
                        toks = np.asarray(o.tokens)[0]
                        answers[n] = _answer(tokenizer, toks[0], toks[1:])
                    if bar is not None:
                        bar.update(1)
                correct = {n: first_number(a) == key for n, a in answers.items()}
                for n in names:
                    hits[n][i, j] += correct[n]
                cells.append({"context": C, "depth": d, "trial": t, "key": key, "needle_at": at,
                              "answers": answers, "correct": correct})
    if bar is not None:
        bar.close()
    return {"contexts": contexts, "depths": depths, "presets": names, "format": fmt, "trials": trials,
            "max_new_tokens": max_new_tokens,
            "accuracy": {n: (hits[n] / trials).tolist() for n in names}, "cells": cells,
            "seconds": round(time.perf_counter() - t0, 1)}


def format_grid(results: dict) -> str:
    """Text grids of accuracy (rows: depth %, columns: context tokens), one per preset."""
    lines = []
    ctx = results["contexts"]
    for n in results["presets"]:
        acc = results["accuracy"][n]
        lines.append(f"{n}: depth % \\ context " + " ".join(f"{c:>6}" for c in ctx))
        for d, row in zip(results["depths"], acc):
            lines.append(f"  {d:>6g}" + " " * 14 + " ".join(f"{a:>6.2f}" for a in row))
    return "\n".join(lines)


def plot_needle(results: dict, path: str) -> str:
    """Heatmaps of retrieval accuracy (depth x context), one panel per preset, written as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = results["presets"]
    ctx, dep = results["contexts"], results["depths"]
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    w = max(2.6, 0.75 * len(ctx) + 1.2)
    h = max(2.2, 0.42 * len(dep) + 1.3)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol + 1.0, h * nrow + 0.6), squeeze=False,
                             constrained_layout=True)
    im = None
    for k, (ax, n) in enumerate(zip(axes.flat, names)):
        acc = np.asarray(results["accuracy"][n], float)
        im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(n, fontsize=10)
        ax.set_xticks(range(len(ctx)), [str(c) for c in ctx], fontsize=8)
        ax.set_yticks(range(len(dep)), [f"{d:g}%" for d in dep], fontsize=8)
        ax.set_xlabel("context (tokens)", fontsize=8)
        if k % ncol == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        for (r, c), a in np.ndenumerate(acc):
            ax.text(c, r, f"{a:.2g}", ha="center", va="center", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="retrieval accuracy")
    fig.suptitle(f"needle in a haystack: greedy retrieval through each KV cache ({results.get('format', 'plain')} "
                 f"prompt, {results.get('trials', 1)} key(s) per cell)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``kvq-jax needle`` arguments (pass a subparser to fill it)."""
    p = parser or argparse.ArgumentParser(prog="kvq-jax needle",
                                          description="Needle-in-a-haystack retrieval through quantized KV caches.")
    p.add_argument("--text", required=True, help="UTF-8 haystack text file (long enough for the largest context)")
    p.add_argument("--kv", default=",".join(DEFAULT_PRESETS), help="comma-separated presets")
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)), help="prompt lengths in tokens")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)), help="needle depths in percent")
    p.add_argument("--trials", type=int, default=1, help="prompts (random keys) per cell")
    p.add_argument("--format", default="plain", choices=FORMATS)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shared-prefill", action="store_true",
                   help="run kvq.generate from scratch for every preset (slower, same answers)")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M shapes with random weights and a byte tokenizer (a smoke test)")
    p.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> dict:
    """``kvq-jax needle``: print the grids, write JSON and/or a PNG of heatmaps.

    ``model`` / ``tokenizer`` may be given directly (tests, notebooks).
    """
    from kvq_jax.eval.perplexity import load_for_cli, split_presets

    args = build_parser().parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if model is None:
        model, tokenizer = load_for_cli(args.model, args.random_weights)
    if tokenizer is None:
        tokenizer = ByteTokenizer()
    res = run(model, tokenizer, text, split_presets(args.kv), _ints(args.contexts), _floats(args.depths),
              trials=args.trials, fmt=args.format, max_new_tokens=args.max_new_tokens, seed=args.seed,
              shared_prefill=not args.no_shared_prefill, progress=not args.no_progress, impl=args.impl)
    res["model"] = "random-weights" if args.random_weights else args.model
    res["text"] = args.text
    print(format_grid(res))
    print(f"wall time {res['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")
    if args.png:
        plot_needle(res, args.png)
        print(f"wrote {args.png}")
    return res


if __name__ == "__main__":  # pragma: no cover
    main()
