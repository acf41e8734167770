"""Generate on several devices: weights split Megatron style, KV caches split by sequence and KV head.

    python examples/sharded_generate.py                          # 8 forced CPU devices, tiny random model
    python examples/sharded_generate.py --data 2 --model 4 --kv int4-kivi --batch 8
    python examples/sharded_generate.py --random-weights smollm2-135m --model 4   # real shapes, random weights
    python examples/sharded_generate.py --checkpoint smollm2-135m --data 1        # real weights (downloads once)

The mesh has axes ("data", "model"): prompts and cache sequences are split over "data",
KV heads and weights over "model" (KV heads are replicated across "model" when there are
fewer of them than devices on it). Attention through the caches runs per device
(``jax.shard_map``), on the Pallas kernel on GPUs; the caches are never gathered.

Devices: whatever jax finds. On a machine without accelerators, ``--cpu-devices N``
(default 8) makes the CPU look like N devices (XLA_FLAGS
--xla_force_host_platform_device_count, set before jax starts); on a GPU host the
flag changes nothing and the GPUs are used.

Several hosts: start the same command on every host with ``--distributed`` (it calls
``jax.distributed.initialize()``, which reads the coordinator address, process count
and id from the cluster environment or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); the mesh then spans every host's devices and process 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _force_cpu_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _shape(x) -> str:
    return "x".join(map(str, x.shape))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=int, help="size of the 'data' mesh axis (default: 2 when it fits, else 1)")
    ap.add_argument("--model", type=int, help="size of the 'model' mesh axis (default: devices / data)")
    ap.add_argument("--kv", default="int8", help="cache preset (default int8)")
    ap.add_argument("--batch", type=int, default=4, help="sequences (a multiple of --data; default 4)")
    ap.add_argument("--prompt-len", type=int, default=24, help="prompt tokens per sequence (default 24)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per sequence (default 16)")
    ap.add_argument("--random-weights", default="tiny", choices=("tiny", "smollm2-135m"),
                    help="shape of the random model when no --checkpoint is given (default tiny: runs offline)")
    ap.add_argument("--checkpoint", help="load real weights instead (e.g. smollm2-135m, a .gguf or HF directory)")
    ap.add_argument("--impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="attention over the caches (auto: Pallas on GPU, XLA elsewhere)")
    ap.add_argument("--cpu-devices", type=int, default=8, help="CPU devices to force when the CPU is used (default 8)")
    ap.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    _force_cpu_devices(args.cpu_devices)  # before jax starts
    import jax
    import numpy as np

    if args.distributed:
        jax.distributed.initialize()
    import kvq_jax as kvq
    from jax.experimental import multihost_utils
    from kvq_jax.models import SMOLLM2_135M, LlamaConfig, LlamaModel, init_random_params

    lead = jax.process_index() == 0

    def say(*a):
        if lead:
            print(*a, flush=True)

    n = len(jax.devices())
    data = args.data if args.data is not None else (2 if n % 2 == 0 and args.batch % 2 == 0 and
                                                      (args.model is None or n // args.model >= 2) else 1)
    mesh = kvq.sharding.make_mesh(data=data, model=args.model)
    say(f"devices: {n} x {jax.devices()[0].platform} ({jax.process_count()} process(es)); "
        f"mesh {dict(mesh.shape)}")

    tokenizer = None
    if args.checkpoint:
        from kvq_jax.models import load_model

        model, tokenizer = load_model(args.checkpoint)
        desc = args.checkpoint
    else:
        config = SMOLLM2_135M if args.random_weights == "smollm2-135m" else LlamaConfig(
            vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, ffn_dim=256,
            rope_theta=10000.0, rope_style="interleaved", tie_embeddings=False, eos_token_ids=())
        model = LlamaModel.from_params(config, init_random_params(config, args.seed))
        desc = f"random {args.random_weights}"
    c = model.config
    say(f"model: {desc} ({c.n_layers} layers, d {c.d_model}, {c.n_heads} query / {c.n_kv_heads} KV heads "
        f"x {c.head_dim}, vocab {c.vocab_size})")

    kvq.sharding.shard_params(model, mesh)  # once: generate then uses the placed weights as they are
    blk = model.layers[0]
    for name, var in (("q_proj", blk.attn.q_proj.kernel), ("k_proj", blk.attn.k_proj.kernel),
                      ("o_proj", blk.attn.o_proj.kernel), ("mlp.down", blk.mlp.down.kernel),
                      ("embed", model.embed.embedding)):
        x = var[...]
        say(f"  weight {name:<9} {_shape(x):>10}  {x.sharding.spec}")
    heads = "split over 'model'" if kvq.sharding.kv_heads_sharded(c.n_kv_heads, mesh) else \
        f"replicated across 'model' ({c.n_kv_heads} KV heads, {mesh.shape['model']} devices)"
    say(f"  KV heads: {heads}")

    if tokenizer is not None:
        ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. Once upon a time")
        prompts = np.tile(np.asarray(ids, np.int32)[None], (args.batch, 1))
    else:
        prompts = np.random.default_rng(args.seed).integers(0, c.vocab_size, (args.batch, args.prompt_len))
        prompts = prompts.astype(np.int32)

    def run():
        t0 = time.perf_counter()
        out = kvq.generate(model, prompts, args.new_tokens, kv=args.kv, eos_id=(), impl=args.impl, mesh=mesh)
        return out, time.perf_counter() - t0

    out, t_first = run()  # compiles
    out, t = run()
    cache = out.caches[0]
    for name in ("k", "k_scale", "res_k", "lengths"):
        x = getattr(cache, name)
        if x is not None and x.size:
            local = {_shape(s.data) for s in x.addressable_shards}
            say(f"  cache {name:<8} {_shape(x):>14}  {x.sharding.spec}  per device {', '.join(sorted(local))}")
    held = sum(s.data.nbytes for cc in out.caches for leaf in jax.tree.leaves(cc)
               for s in leaf.addressable_shards if s.device == jax.local_devices()[0])
    total = sum(leaf.nbytes for cc in out.caches for leaf in jax.tree.leaves(cc))
    say(f"  caches: {total / 1e6:.2f} MB in all, {held / 1e6:.2f} MB on device 0")
    say(f"  tokens {_shape(out.tokens)} {out.tokens.sharding.spec}")

    tokens = np.asarray(multihost_utils.process_allgather(out.tokens, tiled=True))
    n_tok = int(np.asarray(multihost_utils.process_allgather(out.lengths, tiled=True)).sum())
    say(f"generate ({args.kv}, {args.new_tokens} new tokens x {args.batch} sequences): first call {t_first:.1f} s "
        f"(compiles), then {t:.2f} s = {n_tok / t:.1f} tokens/s (prefill included)")
    for b in range(min(args.batch, 2)):
        text = tokenizer.decode(tokens[b].tolist()) if tokenizer is not None else tokens[b].tolist()
        say(f"  [{b}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
