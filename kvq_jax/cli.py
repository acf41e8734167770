"""The ``kvq-jax`` command: demo | generate | plan | eval | needle | calibrate | bench.

    kvq-jax demo                      # SmolLM2-135M, one question, bf16/int8/int4/int2 caches compared
    kvq-jax demo --random-weights     # the same on a small random model, no download
    kvq-jax generate --kv int4-kivi --prompt "Why is the sky blue?"
    kvq-jax plan --layers 32 --kv-heads 8 --head-dim 128 --context 131072 --gpu-mem 141GB --weights 16GB
    kvq-jax calibrate --text emma.txt --out smollm2.kvcal.npz --learn int2-kivi
    kvq-jax bench                     # GPU only: points at benchmarks/decode.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

DEMO_PRESETS = ("bf16", "int8", "int4-kivi", "int2-kivi")

# The opening of Pride and Prejudice (Jane Austen, 1813; public domain).
DEMO_PASSAGE = "\n\n".join([
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.",
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"',
    "Mr. Bennet replied that he had not.",
    '"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."',
    "Mr. Bennet made no answer.",
    '"Do you not want to know who has taken it?" cried his wife impatiently.',
    '"You want to tell me, and I have no objection to hearing it."',
    "This was invitation enough.",
    '"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large '
    "fortune from the north of England; that he came down on Monday in a chaise and four to see the "
    "place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is "
    "to take possession before Michaelmas, and some of his servants are to be in the house by the end "
    'of next week."',
    '"What is his name?"',
    '"Bingley."',
    '"Is he married or single?"',
    '"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. '
    'What a fine thing for our girls!"',
    '"How so? How can it affect them?"',
    '"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I am '
    'thinking of his marrying one of them."',
])
DEMO_QUESTION = "Who has taken Netherfield Park, and why is Mrs. Bennet so pleased about it?"


# ----------------------------------------------------------------------------- a random model


class ByteTokenizer:
    """A byte-level stand-in tokenizer for random-weight models: ids 0-255 are bytes,
    256 = <|im_start|>, 257 = <|im_end|> (eos), 258 = <|endoftext|>, 259 = padding."""

    SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<pad>")
    vocab_size = 260
    bos_id = None
    eos_id = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; the special strings above map to their ids."""
        ids, i = [], 0
        while i < len(text):
            for k, s in enumerate(self.SPECIALS):
                if text.startswith(s, i):
                    ids.append(256 + k)
                    i += len(s)
                    break
            else:
                j = i
                while j < len(text) and not any(text.startswith(s, j) for s in self.SPECIALS):
                    j += 1
                ids.extend(text[i:j].encode("utf-8"))
                i = j
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text (invalid UTF-8 replaced)."""
        out, buf = [], bytearray()
        for t in (int(i) for i in ids):
            if t < 256:
                buf.append(t)
                continue
            out.append(buf.decode("utf-8", "replace"))
            buf = bytearray()
            if not skip_special_tokens and t - 256 < len(self.SPECIALS):
                out.append(self.SPECIALS[t - 256])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML, as SmolLM2-Instruct."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def random_model(seed: int = 0, n_layers: int = 2, dtype=None):
    """A small random Llama (byte vocabulary, head_dim 64, GQA 4/2, untied lm_head) and a `ByteTokenizer`.

    (With tied embeddings a random model only repeats its input token, whatever the
    cache holds; an untied head makes the answer depend on attention.)

    Returns:
      ``(model, tokenizer, description)``.
    """
    import jax.numpy as jnp

    from kvq_jax.models import LlamaConfig, LlamaModel, init_random_params

    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, d_model=128, n_layers=n_layers, n_heads=4,
                         n_kv_heads=2, head_dim=64, ffn_dim=256, rope_theta=10000.0, rope_style="interleaved",
                         tie_embeddings=False, eos_token_ids=(ByteTokenizer.eos_id,), max_position=8192)
    model = LlamaModel.from_params(config, init_random_params(config, seed), dtype=dtype or jnp.float32)
    return model, ByteTokenizer(), f"random Llama ({n_layers} layers, d 128, 2 KV heads x 64, byte vocabulary)"


def _load(args):
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if getattr(args, "random_weights", False):
        return random_model(seed=args.seed, dtype=dtype)
    from kvq_jax.models import load_model

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tok = load_model(args.model, dtype=dtype)
    c = model.config
    name = "SmolLM2-135M-Instruct" if str(args.model).lower().startswith("smollm2") else str(args.model)
    return model, tok, f"{name} ({c.n_layers} layers, d {c.d_model}, {c.n_kv_heads} KV heads x {c.head_dim})"


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- demo


def demo_metrics(ref_logits, logits, n: int) -> tuple[float, float]:
    """Top-1 agreement and mean KL(ref || other) over the first n next-token distributions.

    Args:
      ref_logits, logits: ``[N, V]`` f32 (one sequence).
      n: positions to score.

    Returns:
      ``(top1_match_rate, mean_kl)`` (nats).
    """
    import jax
    import jax.numpy as jnp

    p = jax.nn.log_softmax(ref_logits[:n].astype(jnp.float32), -1)
    q = jax.nn.log_softmax(logits[:n].astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(p) * (p - q), -1)
    top1 = jnp.mean((jnp.argmax(p, -1) == jnp.argmax(q, -1)).astype(jnp.float32))
    return float(top1), max(float(jnp.mean(kl)), 0.0)


def run_demo(model, tokenizer, description: str, presets=DEMO_PRESETS, max_new_tokens: int = 48,
             question: str = DEMO_QUESTION, passage: str = DEMO_PASSAGE, out=None) -> dict:
    """Generate one answer under each cache preset and compare each to bf16.

    The prompt (a chat-templated question about ``passage``) is prefilled on full-precision
    K/V and stored in each preset's cache; the answer is decoded greedily through it.
    Agreement: the bf16 answer is teacher-forced step by step through every cache, and
    the next-token distributions are compared with bf16's (top-1 match, mean KL).

    Returns:
      ``{preset: {"text", "tokens", "kv_bytes_per_token", "kv_bytes_held", "kv_bytes_allocated",
      "tokens_per_s", "compile_s", "top1", "kl"}}``.
    """
    import jax
    import numpy as np

    import kvq_jax as kvq
    from kvq_jax.capacity import session_bytes
    from kvq_jax.nn import policy_bytes_per_token, resolve_policy

    out = sys.stdout if out is None else out
    content = f"{passage}\n\n{question}" if passage else question
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    tokens = np.asarray([prompt], np.int32)
    L, H, D = model.num_layers, model.num_kv_heads, model.head_dim
    print(f"model: {description}; {jax.default_backend().upper()}, {jax.device_count()} device(s)", file=out)
    print(f"prompt: {len(prompt)} tokens (chat template; a passage of Pride and Prejudice and a question); "
          f"greedy, max_new_tokens={max_new_tokens}", file=out)
    print(f"question: {question}\n", file=out, flush=True)

    results = {}
    for preset in presets:
        t0 = time.perf_counter()
        res = kvq.generate(model, tokens, max_new_tokens, kv=preset)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = kvq.generate(model, tokens, max_new_tokens, kv=preset)
        wall = time.perf_counter() - t0
        n = int(res.lengths[0])
        ids = np.asarray(res.tokens[0, :n]).tolist()
        policy = resolve_policy(preset, L)
        held = int(res.caches[0].lengths[0])
        results[preset] = dict(
            tokens=ids, text=tokenizer.decode(ids, skip_special_tokens=True),
            kv_bytes_per_token=policy_bytes_per_token(policy, H, D),
            kv_bytes_held=sum(session_bytes(s, held, 1, H, D) for s in policy),
            kv_bytes_allocated=sum(c.nbytes for c in res.caches),
            tokens_per_s=n / wall, compile_s=max(compile_s - wall, 0.0), held_tokens=held)
        shown = results[preset]["text"].strip() or f"(ids {ids})"
        print(f"[{preset}] {shown}\n", file=out, flush=True)

    # agreement with bf16: teacher-force the bf16 answer through every cache
    base = "bf16" if "bf16" in results else presets[0]
    ref_ids = results[base]["tokens"]
    n = len(ref_ids)
    targets = np.asarray([ref_ids], np.int32)
    ref_logits, _ = kvq.teacher_force(model, tokens, targets, kv=base)
    for preset in presets:
        if preset == base:
            results[preset].update(top1=1.0, kl=0.0)
            continue
        logits, _ = kvq.teacher_force(model, tokens, targets, kv=preset)
        top1, kl = demo_metrics(ref_logits[0], logits[0], n)
        results[preset].update(top1=top1, kl=kl)

    print(f"KV cache of the {len(prompt)}-token prompt + answer; agreement = the {base} answer "
          f"({n} tokens) teacher-forced through each cache", file=out)
    head = (f"{'preset':<10} {'KV B/token':>10} {'KV held':>10} {'KV alloc':>10} {'tok/s':>7} "
            f"{'compile s':>9} {'top-1 vs ' + base:>13} {'KL vs ' + base:>11}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for preset, r in results.items():
        print(f"{preset:<10} {r['kv_bytes_per_token']:>10,} {_fmt_bytes(r['kv_bytes_held']):>10} "
              f"{_fmt_bytes(r['kv_bytes_allocated']):>10} {r['tokens_per_s']:>7.1f} {r['compile_s']:>9.1f} "
              f"{100 * r['top1']:>12.1f}% {r['kl']:>11.2e}", file=out)
    print("KV B/token: bytes of one token across all layers (scales included); KV held: the tokens held, "
          "bf16 residual/sink windows included; KV alloc: the caches' allocated bytes; tok/s: a warm "
          "generate call (prefill + decode) on this machine.", file=out, flush=True)
    return results


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    model, tok, desc = _load(args)
    presets = tuple(p.strip() for p in args.kv.split(",") if p.strip())
    passage = DEMO_PASSAGE
    if args.random_weights:  # a byte vocabulary makes ~4x more tokens: keep the first paragraphs
        passage = "\n\n".join(DEMO_PASSAGE.split("\n\n")[:2])  # 472 tokens: bucket 512
    results = run_demo(model, tok, desc, presets=presets, max_new_tokens=args.max_new_tokens,
                       question=args.question, passage=passage)
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


# ----------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    import numpy as np

    import kvq_jax as kvq

    model, tok, desc = _load(args)
    text = args.prompt
    if not args.raw and hasattr(tok, "apply_chat_template"):
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    ids = tok.encode(text)
    sampler = None
    if args.temperature > 0:
        sampler = kvq.Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    printed = {"ids": [], "text": ""}

    def stream(step, tokens, active):
        if not active[0]:
            return
        printed["ids"].append(int(tokens[0]))
        full = tok.decode(printed["ids"], skip_special_tokens=True)
        sys.stdout.write(full[len(printed["text"]):])
        sys.stdout.flush()
        printed["text"] = full

    print(f"[{desc}; kv={args.kv}; {len(ids)} prompt tokens]", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = kvq.generate(model, np.asarray([ids], np.int32), args.max_new_tokens, kv=args.kv, sampler=sampler,
                       rng=args.seed, stream=stream)
    wall = time.perf_counter() - t0
    n = int(out.lengths[0])
    final = tok.decode(np.asarray(out.tokens[0, :n]).tolist(), skip_special_tokens=True)
    if final != printed["text"]:  # the stream missed something: print the rest
        sys.stdout.write(final[len(printed["text"]):] if final.startswith(printed["text"]) else "\n" + final)
    print()
    held = int(out.caches[0].lengths[0])
    kvb = sum(c.nbytes for c in out.caches)
    print(f"[{n} tokens in {wall:.2f} s (compile included); cache holds {held} tokens, "
          f"{_fmt_bytes(kvb)} allocated]", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- plan


def cmd_plan(args) -> int:
    from kvq_jax.capacity import parse_bytes, plan
    from kvq_jax.spec import PRESETS

    presets = [p.strip() for p in args.presets.split(",")] if args.presets else list(PRESETS)
    mem, weights = parse_bytes(args.gpu_mem), parse_bytes(args.weights)
    table = plan(presets, num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                 context=args.context, memory=mem, weights=weights)
    print(f"{args.layers} layers x {args.kv_heads} KV heads x {args.head_dim}; context {args.context:,} tokens; "
          f"{_fmt_bytes(mem - weights)} for KV ({_fmt_bytes(mem)} - {_fmt_bytes(weights)} weights)")
    base = table.get("bf16", {}).get("bytes_per_token")
    head = f"{'preset':<10} {'bytes/token':>12} {'vs bf16':>8} {'per session':>12} {'sessions':>9}"
    print(head)
    print("-" * len(head))
    for name, r in table.items():
        ratio = f"{base / r['bytes_per_token']:.2f}x" if base else "-"
        print(f"{name:<10} {r['bytes_per_token']:>12,} {ratio:>8} {_fmt_bytes(r['session_bytes']):>12} "
              f"{r['sessions']:>9,}")
    print("per session: the quantized body plus the bf16 residual window and sinks of one sequence.")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {k: {"bytes_per_token": v["bytes_per_token"], "sessions": v["sessions"],
                 "session_bytes": v["session_bytes"]} for k, v in table.items()}, indent=2))
    return 0


# ----------------------------------------------------------------------------- bench


def _find_benchmark() -> pathlib.Path | None:
    here = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "decode.py"
    cwd = pathlib.Path.cwd() / "benchmarks" / "decode.py"
    for p in (cwd, here):
        if p.is_file():
            return p
    return None


def cmd_bench(args) -> int:
    import jax

    script = _find_benchmark()
    where = str(script) if script else "benchmarks/decode.py of a source checkout (github: kvq-jax)"
    if jax.default_backend() != "gpu":
        print(f"kvq-jax bench times the fused-dequant decode kernels against peers and needs a GPU "
              f"(this machine runs jax on {jax.default_backend().upper()}).\n"
              f"On a GPU machine run:  python {where} [--quick] [--out DIR]", file=sys.stderr)
        return 2
    if script is None:
        print(f"benchmark script not found; run {where}", file=sys.stderr)
        return 2
    import runpy

    sys.argv = [str(script)] + list(args.rest)
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ----------------------------------------------------------------------------- main


def _add_model_args(p, default_tokens):
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file or a HF directory")
    p.add_argument("--random-weights", "--demo-random", dest="random_weights", action="store_true",
                   help="a small random model and a byte tokenizer instead (no download)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-new-tokens", type=int, default=default_tokens)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``kvq-jax``."""
    parser = argparse.ArgumentParser(prog="kvq-jax", description="Quantized KV caches for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compare bf16/int8/int4/int2 caches on one question")
    _add_model_args(p, 48)
    p.add_argument("--kv", default=",".join(DEMO_PRESETS), help="comma-separated presets (first compared: bf16)")
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate from a prompt with a quantized cache")
    _add_model_args(p, 128)
    p.add_argument("--kv", default="int8", help="cache preset or canonical spec (default int8)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="bytes per token and sessions that fit, per preset")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--context", type=int, required=True, help="tokens per session")
    p.add_argument("--gpu-mem", default="141GB", help="device memory, e.g. 141GB, 80GiB")
    p.add_argument("--weights", default="0", help="memory taken by weights, e.g. 16GB")
    p.add_argument("--presets", default=None, help="comma-separated (default: all presets)")
    p.add_argument("--json", metavar="OUT", help='write {preset: {"bytes_per_token", "sessions"}}')
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="perplexity / KL / top-1 of each preset against the bf16 cache",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="see `kvq-jax eval --help`")
    p.set_defaults(func=lambda a: _delegate("kvq_jax.eval.perplexity", a.rest))

    p = sub.add_parser("needle", help="needle-in-a-haystack retrieval grid per preset", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="see `kvq-jax needle --help`")
    p.set_defaults(func=lambda a: _delegate("kvq_jax.eval.needle", a.rest))

    p = sub.add_parser("calibrate", help="per-channel K/V statistics and learned clip ratios into a calibration file",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="see `kvq-jax calibrate --help`")
    p.set_defaults(func=lambda a: _delegate("kvq_jax.calibrate", a.rest))

    p = sub.add_parser("bench", help="GPU decode benchmark (benchmarks/decode.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/decode.py")
    p.set_defaults(func=cmd_bench)
    return parser


def _delegate(module: str, argv: list[str]) -> int:
    """Run ``module.main(argv)`` (the eval tools parse their own arguments)."""
    import importlib

    importlib.import_module(module).main(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvq-jax`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tools = {"eval": "kvq_jax.eval.perplexity", "needle": "kvq_jax.eval.needle", "calibrate": "kvq_jax.calibrate"}
    if argv and argv[0] in tools:  # these parse their own arguments
        return _delegate(tools[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
