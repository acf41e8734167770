"""A multi-turn chat whose KV cache is kept across turns and grows past 4K tokens.

    python examples/long_context_chat.py                         # SmolLM2-135M, int4-kivi cache
    python examples/long_context_chat.py --text pride_and_prejudice.txt --kv int8
    python examples/long_context_chat.py --random-weights --max-turns 2   # quick, no download

Every turn sends the next chunk of a long text and asks for a one-sentence summary.
Turn 1 is prefilled on full-precision K/V and quantized into the cache; later turns are
appended and attended through the existing cache (nothing is recomputed), so the
conversation's memory is only its quantized KV. After each turn the script prints the
tokens held and the KV bytes they take, next to what a bf16 cache would take.

Without --text the chunks are copies of the demo's Pride and Prejudice passage.

Speed: on a GPU, attention over the cache runs in the fused-dequant Pallas kernel. On a
CPU it runs in XLA over the cache's whole capacity (8K slots by default), so a 1K-token
turn takes a minute or two on 2 cores (five turns, past 4K tokens: ~10 minutes); use
--random-weights, --max-turns or a smaller --max-len for a quick look.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

import kvq_jax as kvq
from kvq_jax.capacity import session_bytes
from kvq_jax.cli import DEMO_PASSAGE, random_model


def chunks(text: str, tokenizer, chunk_tokens: int):
    """Yield successive pieces of ``text`` of about ``chunk_tokens`` tokens, cut at paragraph ends."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    piece, n = [], 0
    for p in paras:
        piece.append(p)
        n += len(tokenizer.encode(p))
        if n >= chunk_tokens:
            yield "\n\n".join(piece)
            piece, n = [], 0
    if piece:
        yield "\n\n".join(piece)


def kv_bytes(caches, tokens_held: int) -> int:
    """Bytes the held tokens take in these caches (quantized body + bf16 windows), all layers."""
    return sum(session_bytes(c.spec, tokens_held, 1, c.num_kv_heads, c.head_dim) for c in caches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true", help="small random model, byte tokenizer")
    ap.add_argument("--kv", default="int4-kivi", help="cache preset (default int4-kivi)")
    ap.add_argument("--text", type=pathlib.Path, help="a long plain-text file to discuss (default: a passage, repeated)")
    ap.add_argument("--chunk-tokens", type=int, default=900, help="tokens of text per turn")
    ap.add_argument("--max-turns", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=8192, help="cache capacity in tokens")
    args = ap.parse_args(argv)

    if args.random_weights:
        model, tok, desc = random_model()
    else:
        model, tok = kvq.models.load(args.model)
        desc = args.model
    text = args.text.read_text() if args.text else "\n\n".join([DEMO_PASSAGE] * 64)
    eos = tok.eos_id
    bf16_per_token = kvq.bytes_per_token("bf16", model.num_layers, model.num_kv_heads, model.head_dim)
    print(f"{desc}; cache {args.kv}, capacity {args.max_len} tokens")
    print(f"{'turn':>4} {'prompt':>7} {'answer':>7} {'held':>7} {'KV bytes':>10} {'bf16 would be':>14} "
          f"{'alloc':>10} {'s':>6}")

    caches, last = None, None
    for turn, chunk in enumerate(chunks(text, tok, args.chunk_tokens), start=1):
        if turn > args.max_turns:
            break
        message = f"Here is part {turn} of a text.\n\n{chunk}\n\nSummarize this part in one sentence."
        if caches is None:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": message}]))
        else:
            # the last answer token is not in the cache yet; close the answer if it did not end with eos
            close = "" if last == eos else "<|im_end|>"
            ids = [last] + tok.encode(f"{close}\n<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
        held = 0 if caches is None else int(caches[0].lengths[0])
        if held + len(ids) + args.max_new_tokens > args.max_len:
            print(f"turn {turn}: the cache is full ({held} of {args.max_len} tokens); stopping")
            break
        t0 = time.perf_counter()
        out = kvq.generate(model, np.asarray([ids], np.int32), args.max_new_tokens, kv=args.kv, caches=caches,
                           max_len=args.max_len if caches is None else None)
        wall = time.perf_counter() - t0
        n = int(out.lengths[0])
        answer = np.asarray(out.tokens[0, :n]).tolist()
        caches, last = out.caches, answer[-1]
        held = int(caches[0].lengths[0])
        print(f"{turn:>4} {len(ids):>7} {n:>7} {held:>7} {kv_bytes(caches, held) / 1e6:>8.2f}MB "
              f"{held * bf16_per_token / 1e6:>12.2f}MB {sum(c.nbytes for c in caches) / 1e6:>8.2f}MB "
              f"{wall:>6.1f}")
        print(f"     > {tok.decode(answer, skip_special_tokens=True).strip()[:200]!r}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
