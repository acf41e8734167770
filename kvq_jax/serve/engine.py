"""Engine: continuous batching over a paged quantized KV cache, with a prefix cache and
chunked prefill; `speculative_generate`: greedy speculative decoding with a draft model.

    engine = Engine(model, kv="int8", max_batch=8, page_size=64, max_len=4096)
    a = engine.submit(prompt_a, max_new_tokens=64)
    b = engine.submit(prompt_b, max_new_tokens=16)
    out = engine.run()                       # {a: [ids...], b: [ids...]}

How a request runs:

1. Admission (between steps): a free slot of the ``max_batch`` decode slots and the
   pages its whole life needs (prompt + max_new_tokens - 1 tokens) must be available;
   pages of a cached prefix are shared instead of allocated (see below).
2. Prefill in chunks of at most ``prefill_chunk`` tokens, one chunk per engine
   iteration, so decoding requests keep stepping while a long prompt enters. A chunk
   starting at position 0 attends to its own full-precision K/V (as `kvq.generate`'s
   prefill does), then is quantize-appended; a later chunk attends to the quantized
   past (the kernel through the page tables on GPU; XLA in blocks of ``prefill_block``
   tokens elsewhere; memory stays bounded at any context) and causally to its own
   full-precision K/V (`kvq.attention.attend_chunk`), then is appended.
3. Decode: one jitted step feeds the last token of every decoding slot (T = 1),
   appends it through the page tables and samples the next one. Steps are pipelined:
   the next step is dispatched (taking its tokens from the previous step's ids on the
   device) before the previous step's ids are read back, so the device does not wait
   for the host between steps. A request retires after ``max_new_tokens`` tokens or an
   EOS (read one step later; the extra step's token is dropped, its append stays
   within the request's reserved pages); its pages go back to the allocator.

Cache layout inside the engine: the pool leaves of all layers of one format are
stacked into one array per leaf, ``[layers * num_pages, Hkv, page_size, ...]`` (one such
set per distinct format of a per-layer policy); the i-th layer of a format reads and
writes its pages through ``page_table + i * num_pages``. Every layer uses the same page
numbers, so a page is allocated for all layers at once. The jitted step runs the
layers as an unrolled loop over the model's own per-layer weights (no stacked copy: a
``lax.scan`` over stacked weights measured a fixed ~13 ms per step on the H200 for the
8B shape, the layer slices being copied) and updates the donated pools in place: no
per-layer or per-step copy of the cache or the weights is made.

Prefix cache (specs without a bf16 residual window or sinks, i.e. whose state after n
tokens is exactly their first n quantized tokens): when a prompt's chunk completes
full pages, those pages are registered under the hash of the token prefix they end. A
later prompt that starts with the same tokens takes the longest registered run of
pages, cut down to a multiple of ``prefill_chunk`` tokens (and to at most the prompt
minus one token), and prefills only the rest. Because chunks always start at
multiples of ``prefill_chunk``, the shared pages and everything computed after them
are what a prefill from scratch computes: results do not depend on hits.

With a bf16 window or sinks (``prefix_cache=True``), the state after n prompt tokens is
the body (which ends inside a page in general), the window and the sinks. When a prefill
chunk ends at a multiple n of ``prefill_chunk``, a snapshot keyed by the hash of the first
n tokens keeps it: a reference to the body pages every layer's format fills, and copies
(outside the pool) of the pages some format fills only partly and of the slot's windows
and sinks. A later prompt with that prefix (the longest snapshotted one, at most the
prompt minus one token) shares the full pages, gets the partly filled ones copied into its
own pages and the window and sinks into its slot, and prefills the rest: again exactly
what a prefill from scratch computes.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kvq_jax.cache import residual_capacity, segment_lengths
from kvq_jax.generate import GREEDY, Sampler, bucket_length
from kvq_jax.nn import causal_attention, prefill_impl, resolve_policy
from kvq_jax.serve.allocator import OutOfPages, PageAllocator, prefix_keys
from kvq_jax.serve.paged import (
    PagedKVCache,
    check_page_size,
    pages_needed,
    pool_shapes,
)
from kvq_jax.sharding import (
    DATA,
    MODEL,
    cache_sharding,
    check_mesh,
    shard_append,
    shard_attend,
    shard_attend_chunk,
    shard_params,
    use_mesh,
)
from kvq_jax.spec import KVSpec

_POOL = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")
_SEQ = ("res_k", "res_v", "sink_k", "sink_v")
# XLA's rematerialization is off for the steps that take the pools: it counts a donated pool
# twice (argument and result), so with pools filling the device it judged a step over the memory
# limit and recomputed layers' projections to no avail (bf16, 16 x 32K on an H200: the QKV gemm
# twice in 30 of 32 layers; BENCHMARKS.md run T)
_STEP_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


# ----------------------------------------------------------------------------- one block over a paged cache


def block_forward(block, x, positions, cache: PagedKVCache, *, fresh: bool, lengths, impl: str,
                  prefill_block: int | None = 2048):
    """One `LlamaBlock` over a paged cache: x ``[B, T, d]`` -> (x ``[B, T, d]``, cache).

    ``fresh``: the T tokens are the first of their sequences: attend on their own
    full-precision K/V, then append (as ``prefill=True`` of `QuantizedAttention`).
    Otherwise, for T > 1 (a prefill chunk after the first): attend to the cache and
    causally to their own K/V (`attend_chunk_paged`, body blocks of ``prefill_block``
    tokens), then append; for T = 1 (decode): append, then attend through the cache.
    ``impl`` reads the cache in both and writes it (`append_paged`). ``lengths: int[B]``: real
    tokens of each row (right padding).
    Inside `kvq.sharding.use_mesh` these cache operations run per shard (`shard_append`,
    `shard_attend`, `shard_attend_chunk`); without a mesh they are `append_paged`,
    `attend_paged` and `attend_chunk_paged`.
    """
    attn = block.attn
    B, T, _ = x.shape
    q, k, v = attn.qkv(block.attn_norm(x), positions)
    if fresh:
        o = causal_attention(q, k, v, positions, positions, key_lengths=lengths,
                             sliding_window=attn.sliding_window, precision=attn.precision,
                             impl=prefill_impl(impl))
        cache = shard_append(cache, k, v, lengths=lengths, impl=impl)
    elif T > 1:
        o = shard_attend_chunk(q, k, v, cache, lengths=lengths, block=prefill_block, impl=impl)
        cache = shard_append(cache, k, v, lengths=lengths, impl=impl)
    else:
        cache = shard_append(cache, k, v, lengths=lengths, impl=impl)
        o = shard_attend(q, cache, impl=impl)
    o = o.reshape(B, T, attn.num_heads * attn.head_dim).astype(attn.dtype or x.dtype)
    x = x + attn.o_proj(o)
    return x + block.mlp(block.mlp_norm(x)), cache


_STATIC = ("gd", "groups", "layer_map", "page_size", "num_pages", "impl", "prefill_block", "mesh")


class _Static:
    """A static jit argument hashed once. jax hashes and compares static arguments at every call;
    the engine passes the same object each time, so that is a cached hash and an identity test
    (hashing the engine's GraphDefs themselves walks their graphs: ~0.2 ms per call on a CPU)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        self._hash = hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Static) and self._hash == other._hash and self.value == other.value)


def _layers(weights, kv, tokens, rows, n_old, n_valid, table, *, gd, groups, layer_map, page_size, num_pages, fresh,
            impl, prefill_block, mesh):
    """Run ``tokens int32[b, T]`` of slots ``rows`` through all layers, writing their K/V.

    kv: the engine's cache (donated): one dict of stacked leaves per format in ``groups``;
    layer l is entry ``layer_map[l] = (group, index in group)``. n_old: tokens each row's
    slot holds before; n_valid: real tokens per row; table: ``int32[b, max_pages]`` page
    tables (the same pages in every layer). Returns (logits f32[b, V] at each row's last
    real token, kv, overflow bool[b]).
    """
    block_gd, embed_gd, norm_gd, head_gd = gd.value
    embed = nnx.merge(embed_gd, weights["embed"])
    b, T = tokens.shape
    positions = n_old[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    x = embed(tokens)
    over = jnp.zeros((b,), bool)
    kv = list(kv)
    for l, lstate in enumerate(weights["layers"]):  # unrolled: weights used in place, pools updated in place
        block = nnx.merge(block_gd, lstate)
        g, i = layer_map[l]
        kg = kv[g]
        seq = {n: kg[n][i][rows] for n in _SEQ}
        cache = PagedKVCache(
            **{n: kg[n] for n in _POOL}, **seq,
            page_table=jnp.where(table >= 0, table + i * num_pages, -1),
            lengths=n_old, overflow=jnp.zeros((b,), bool), spec=groups[g], page_size=page_size,
            head_dim=kg["res_k"].shape[-1])
        with use_mesh(mesh):  # per-shard cache operations while tracing (no-op without a mesh)
            x, cache = block_forward(block, x, positions, cache, fresh=fresh, lengths=n_valid, impl=impl,
                                     prefill_block=prefill_block)
        new = {n: getattr(cache, n) for n in _POOL}
        for n in _SEQ:
            new[n] = kg[n] if kg[n].shape[3] == 0 else kg[n].at[i, rows].set(getattr(cache, n))
        kv[g], over = new, over | cache.overflow
    kv = tuple(kv)
    h = nnx.merge(norm_gd, weights["norm"])(x)
    last = jnp.take_along_axis(h, jnp.clip(n_valid - 1, 0, T - 1)[:, None, None], axis=1)[:, 0]
    if head_gd is None:
        w = embed.embedding[...]
        logits = jnp.einsum("...d,vd->...v", last.astype(w.dtype), w, preferred_element_type=jnp.float32)
    else:
        w = nnx.merge(head_gd, weights["head"]).kernel[...]
        logits = jnp.einsum("...d,dv->...v", last.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return logits, kv, over


# `_layers` as a program of its own (prefill chunks); `_decode_step` traces `_layers` into its own
# (compiler options only apply to a top-level jit)
_forward = jax.jit(_layers, static_argnames=_STATIC + ("fresh",), donate_argnames=("kv",), compiler_options=_STEP_OPTIONS)


@partial(jax.jit, static_argnames=("samplers",))
def _sample(logits, base_key, rids, steps, which, *, samplers):
    """Next ids ``int32[b]``: row i sampled by ``samplers[which[i]]`` with key (rid, step)."""
    keys = jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base_key, r), s))(rids, steps)
    out = jnp.zeros(logits.shape[:1], jnp.int32)
    for i, s in enumerate(samplers):
        tok = jax.vmap(lambda lg, k, s=s: s(lg[None], k)[0])(logits, keys)
        out = jnp.where(which == i, tok, out)
    return out


@partial(jax.jit, static_argnames=_STATIC + ("samplers",), donate_argnames=("kv",), compiler_options=_STEP_OPTIONS)
def _decode_step(weights, kv, slots, prev, table, base_key, *, samplers, **static):
    """One decode step of every slot and its sampling in one program.

    ``slots: int32[B, 7]``, one row per slot (one transfer per step): last token, tokens
    held, n_valid (1 decoding, 0 idle), request id, tokens generated so far, sampler index,
    and 1 where the last token is instead ``prev[slot]`` (``int32[B]``, the previous step's
    ids, still on the device); ``table: int32[B, max_pages]``. Returns (next ids
    ``int32[B]``, kv, overflow ``bool[B]``); ids of idle slots are meaningless. Sampling as
    `_sample` (key (rid, step)).
    """
    tokens, n_old, n_valid, rids, steps, which, from_prev = (slots[:, i] for i in range(7))
    tokens = jnp.where(from_prev == 1, prev, tokens)
    rows = jnp.arange(slots.shape[0], dtype=jnp.int32)
    logits, kv, over = _layers(weights, kv, tokens[:, None], rows, n_old, n_valid, table, fresh=False, **static)
    ids = _sample(logits, base_key, rids, steps, which, samplers=samplers)
    if static["mesh"] is not None:  # replicated, as the next step takes them (no resharding between steps)
        ids = jax.lax.with_sharding_constraint(ids, NamedSharding(static["mesh"], P()))
    return ids, kv, over


def _stacked_rows(x, pages, num_pages):
    """Rows of stacked pool leaf ``x`` (``[layers * num_pages, ...]``, layer i's page p at row
    ``i * num_pages + p``) that hold ``pages`` (``int32[n]``) in every layer, layer-major."""
    base = (jnp.arange(x.shape[0] // num_pages, dtype=jnp.int32) * num_pages)[:, None]
    return (base + pages[None]).reshape(-1)


@partial(jax.jit, static_argnames=("num_pages",))
def _read_pages(kv, pages, *, num_pages):
    """Copies of pool pages ``pages`` in every layer: per format ``{leaf: [layers * n, ...]}``."""
    return tuple({name: None if kg[name] is None else kg[name][_stacked_rows(kg[name], pages, num_pages)]
                  for name in _POOL} for kg in kv)


@partial(jax.jit, static_argnames=("num_pages",), donate_argnames=("kv",))
def _write_pages(kv, pages, data, *, num_pages):
    """`_read_pages`'s copies written into pool pages ``pages``."""
    return tuple(dict(kg, **{name: kg[name].at[_stacked_rows(kg[name], pages, num_pages)].set(d[name])
                             for name in _POOL if kg[name] is not None}) for kg, d in zip(kv, data))


@jax.jit
def _slot_window(kv, slot):
    """Copies of one slot's bf16 window and sinks in every layer: per format ``{leaf: [L_g, Hkv, n, D]}``."""
    return tuple({name: kg[name][:, slot] for name in _SEQ} for kg in kv)


@partial(jax.jit, donate_argnames=("kv",))
def _set_slot_window(kv, window, slot):
    """`_slot_window`'s copies written into slot ``slot``."""
    return tuple(dict(kg, **{name: kg[name].at[:, slot].set(w[name]) for name in _SEQ}) for kg, w in zip(kv, window))


@dataclasses.dataclass
class _Snapshot:
    """A prompt prefix's cache state for specs with a bf16 window or sinks (see `Engine`)."""
    tokens: int  # prefix length n (a multiple of prefill_chunk)
    shared: list  # the body pages every layer's format fills: one reference held
    partial: int  # the next pages, which some format's body fills only partly: how many,
    partial_data: tuple | None  # and their `_read_pages` copies
    window: tuple  # `_slot_window` at n


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass
class _Request:
    rid: int
    prompt: np.ndarray
    max_new: int
    sampler: Sampler
    slot: int = -1
    pages: list = dataclasses.field(default_factory=list)
    keys: list = dataclasses.field(default_factory=list)
    done: int = 0  # prompt tokens in the cache
    hit: int = 0  # prompt tokens taken from the prefix cache
    out: list = dataclasses.field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.prompt)


class Engine:
    """Continuous-batching generation over a paged quantized KV cache.

    Args:
      model: a `kvq_jax.models.LlamaModel` (its weights are used in place, not copied).
      kv: the cache format: a preset name or KVSpec for every layer, or a per-layer
        policy (a sequence or ``{layer: spec, "default": spec}`` mapping, e.g. from
        `kvq.calibrate.policy`); layers of one format share one stacked pool.
      max_batch: decode slots (requests decoding at once).
      page_size: tokens per page (a multiple of 16 and of the spec's token group; the
        kernel's blocks lie within one page, so pages of 64+ tokens keep its default blocks).
      num_pages: pages per layer in the pool; default enough for ``max_batch``
        sequences of ``max_len`` tokens.
      max_len: most tokens (prompt + generated) one request may hold.
      prefill_chunk: most prompt tokens run in one call (a multiple of page_size).
      prefix_cache: reuse the cache of a prompt prefix another request computed. Specs
        without a bf16 residual window or sinks share full prompt pages (kept, once no request
        holds them, until the pool needs them). Specs with one keep snapshots instead (their
        state after n tokens is not just their first n quantized tokens): at every multiple of
        ``prefill_chunk`` within a prompt, the body pages (shared), and copies of the partly
        filled pages and of the bf16 window and sinks, held outside the pool (per snapshot
        about a page of every layer plus ``layers x Hkv x (window + sinks) x D x 4`` bytes).
        None (default): on for specs without a window or sinks, off otherwise; True / False:
        on / off.
      prefix_snapshots: most snapshots kept, least recently used dropped first (also when
        the pool runs short of pages for a new request).
      eos_id: id or ids that end a request; None uses ``model.eos_token_ids``.
      impl: how decode steps and prefill chunks after the first read the cache: "pallas"
        (the fused-dequant kernel through the page tables), "xla", or "auto" (pallas on GPU);
        and how every step stores its quantized tokens: "pallas" one kernel for all pools of a
        layer (`kvq_jax.kernels.write`), "xla" one scatter per pool.
      prefill_block: with impl "xla", cached tokens per block when a prefill chunk after
        the first reads the quantized past (`kvq.attention.attend_chunk`, memory
        ``prefill_chunk x prefill_block`` scores per layer); None reads it at once.
      seed: base PRNG seed of sampling (request r, step i uses fold_in(fold_in(seed, r), i)).
      mesh: run tensor-parallel on a mesh with axes ("data", "model") whose "data" axis
        has size 1 (`kvq_jax.sharding.make_mesh(data=1, model=N)`): the model's weights
        are placed Megatron style in place (`kvq_jax.sharding.shard_params`), the pools
        and windows are created split by KV head over "model" (replicated when Hkv is not
        a multiple of N), and every cache operation runs per shard. Same tokens as
        without a mesh, up to floating-point summation order.

    Attributes:
      allocator: the `PageAllocator` of the pool.
      stats: counters: ``prefill_tokens`` (prompt tokens computed), ``prefix_hit_tokens``
        (prompt tokens taken from the prefix cache), ``prefill_calls``, ``decode_steps``.
    """

    def __init__(self, model, kv="int8", max_batch: int = 8, page_size: int = 64, num_pages: int | None = None,
                 *, max_len: int = 4096, prefill_chunk: int = 512, prefix_cache: bool | None = None, eos_id=None,
                 impl: str = "auto", prefill_block: int | None = 2048, seed: int = 0, mesh=None,
                 prefix_snapshots: int = 8):
        specs = resolve_policy(kv, model.num_layers)
        groups = tuple(dict.fromkeys(specs))  # the distinct formats, in layer order
        for name, val in (("max_batch", max_batch), ("max_len", max_len), ("prefill_chunk", prefill_chunk)):
            if not isinstance(val, (int, np.integer)) or val <= 0:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        for s in groups:
            page_size = check_page_size(s, page_size)
        if prefill_chunk % page_size:
            raise ValueError(f"prefill_chunk: {prefill_chunk} is not a multiple of page_size={page_size}")
        if impl not in ("auto", "xla", "pallas"):
            raise ValueError(f"impl: expected 'auto', 'xla' or 'pallas', got {impl!r}")
        if prefill_block is not None and (not isinstance(prefill_block, (int, np.integer)) or prefill_block <= 0):
            raise ValueError(f"prefill_block: expected a positive int or None, got {prefill_block!r}")
        self.prefill_block = None if prefill_block is None else int(prefill_block)
        if mesh is not None:
            check_mesh(mesh)
            if mesh.shape[DATA] != 1:
                raise ValueError(f"mesh: the engine splits KV heads over {MODEL!r} only; its {DATA!r} axis must have "
                                 f"size 1, got {mesh.shape[DATA]}")
            shard_params(model, mesh)
        self.mesh = mesh
        self.specs, self.page_size, self.max_len = specs, page_size, int(max_len)
        self.spec = groups[0] if len(groups) == 1 else None  # the one format of every layer, if so
        self._groups = groups
        self._layer_map = tuple((groups.index(s), specs[:l].count(s)) for l, s in enumerate(specs))
        self.max_batch, self.prefill_chunk, self.impl = int(max_batch), int(prefill_chunk), impl
        L, H, D = model.num_layers, model.num_kv_heads, model.head_dim
        self.num_layers, self.vocab_size = L, model.config.vocab_size
        self.max_pages = max(self.pages_for(self.max_len, 1), 1)
        if num_pages is None:
            num_pages = self.max_batch * self.max_pages
        if not isinstance(num_pages, (int, np.integer)) or num_pages <= 0:
            raise ValueError(f"num_pages: expected a positive int or None, got {num_pages!r}")
        self.num_pages = int(num_pages)
        windowed = any(residual_capacity(s) or s.sinks for s in groups)
        self.prefix_cache = not windowed if prefix_cache is None else bool(prefix_cache)
        if not isinstance(prefix_snapshots, (int, np.integer)) or prefix_snapshots < 0:
            raise ValueError(f"prefix_snapshots: expected a non-negative int, got {prefix_snapshots!r}")
        self.prefix_snapshots = int(prefix_snapshots)
        self._snapshots: OrderedDict[bytes, _Snapshot] = OrderedDict()  # by prefix key, least recent first
        self._windowed = windowed
        self._salt = f"{'/'.join(map(str, specs))}|{page_size}|{id(model)}".encode()
        if eos_id is None:
            eos_id = tuple(getattr(model, "eos_token_ids", ()) or ())
        self.eos_ids = frozenset([int(eos_id)] if isinstance(eos_id, (int, np.integer)) else map(int, eos_id))

        # weights: the model's own arrays (not copied), as plain nested dicts: jax flattens those
        # in C++ at every step's dispatch (nnx States call back into Python per Variable)
        def split(module):
            gd, state = nnx.split(module)
            return gd, nnx.to_pure_dict(state)

        layers = [split(b) for b in model.layers]  # every block has the first one's GraphDef
        block_gd = layers[0][0]
        weights = {"layers": tuple(state for _, state in layers)}
        embed_gd, weights["embed"] = split(model.embed)
        norm_gd, weights["norm"] = split(model.norm)
        head_gd = None
        if model.lm_head is not None:
            head_gd, weights["head"] = split(model.lm_head)
        self._gd = _Static((block_gd, embed_gd, norm_gd, head_gd))
        self._weights = weights

        # the cache, per format: pool leaves of its layers stacked, per-slot windows [L_g, max_batch, ...]
        self._kv = tuple(self._group_cache(g, specs.count(g), H, D) for g in groups)
        # without a mesh: the device the pools are on (the default device when the engine was built)
        self._device = None if mesh is not None else next(iter(jax.tree.leaves(self._kv)[0].devices()))
        self.allocator = PageAllocator(self.num_pages)
        self._table = np.full((self.max_batch, self.max_pages), -1, np.int32)
        self._table_dev = None  # device copy of _table for decode steps; None after a change
        self._pending = None  # (ids, overflow, {slot: request}) of the last decode step, not yet read
        self._no_prev = self._put(np.zeros((self.max_batch,), np.int32))
        self._lengths = np.zeros((self.max_batch,), np.int32)
        self._slots: list[_Request | None] = [None] * self.max_batch
        self._queue: OrderedDict[int, _Request] = OrderedDict()
        self._next_id = 0
        self._key = self._put(jax.random.key(int(seed)))
        self.stats = dict(prefill_tokens=0, prefix_hit_tokens=0, prefill_calls=0, decode_steps=0)

    # -- public API -------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        """Bytes of the whole cache (pool of all layers, per-slot bf16 windows)."""
        return int(sum(x.nbytes for x in jax.tree.leaves(self._kv)))

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def pending_tokens(self) -> int:
        """Work left: prompt tokens still to prefill plus tokens still to generate, over the
        queued and running requests (`ReplicatedEngine` routes by it)."""
        reqs = [*self._queue.values(), *(r for r in self._slots if r is not None)]
        return sum(len(r.prompt) - r.done + r.max_new - len(r.out) for r in reqs)

    @property
    def num_prefix_snapshots(self) -> int:
        """Prefix snapshots held (specs with a bf16 window or sinks; see ``prefix_snapshots``)."""
        return len(self._snapshots)

    def clear_prefix_cache(self) -> int:
        """Forget every cached prefix: drop the snapshots, evict the cached pages. Returns the
        pages that became free (pages still held by requests stay theirs)."""
        free = self.allocator.num_free
        for key in list(self._snapshots):
            self._drop_snapshot(key)
        self.allocator.clear_cache()
        return self.allocator.num_free - free

    def _put(self, x):
        """Host array ``x`` on the pools' device, or replicated over the mesh: where the jitted
        steps take their small inputs (an input elsewhere would be copied every step)."""
        return jax.device_put(x, self._device if self.mesh is None else NamedSharding(self.mesh, P()))

    def pages_for(self, prompt_len: int, max_new_tokens: int) -> int:
        """Pages a request of this prompt and generation length reserves (the most any layer's format needs)."""
        return max(pages_needed(s, prompt_len + max_new_tokens - 1, self.page_size) for s in self._groups)

    def _group_cache(self, spec: KVSpec, layers: int, H: int, D: int) -> dict:
        """The zeroed pool and window leaves of the ``layers`` layers of one format
        (created already split over the mesh, if any)."""
        shapes = {n: s for n, s in pool_shapes(spec, layers * self.num_pages, self.page_size, H, D).items()
                  if s is not None}
        R = residual_capacity(spec)
        for name, n in (("res_k", R), ("res_v", R), ("sink_k", spec.sinks), ("sink_v", spec.sinks)):
            shapes[name] = ((layers, self.max_batch, H, n, D), jnp.bfloat16)
        names = (*_POOL, *_SEQ)

        def make():
            return {n: jnp.zeros(*shapes[n]) if n in shapes else None for n in names}

        if self.mesh is None:
            return make()
        # a PagedKVCache's layout on the mesh; the windows carry the stacked layer axis in front
        sds = {n: jax.ShapeDtypeStruct(*shapes[n]) if n in shapes else None for n in _POOL}
        sds.update({n: jax.ShapeDtypeStruct(shapes[n][0][1:], shapes[n][1]) for n in _SEQ})
        probe = PagedKVCache(**sds, page_table=jax.ShapeDtypeStruct((self.max_batch, 1), jnp.int32),
                             lengths=jax.ShapeDtypeStruct((self.max_batch,), jnp.int32),
                             overflow=jax.ShapeDtypeStruct((self.max_batch,), bool), spec=spec,
                             page_size=self.page_size, head_dim=D)
        sh = cache_sharding(probe, self.mesh)
        out = {n: getattr(sh, n) if n in shapes else None for n in _POOL}
        out.update({n: NamedSharding(self.mesh, P(None, *getattr(sh, n).spec)) for n in _SEQ})
        return jax.jit(make, out_shardings=out)()

    def submit(self, token_ids, max_new_tokens: int, sampler: Sampler | None = None) -> int:
        """Queue a request; returns its id.

        Args:
          token_ids: ``int[T]`` prompt ids (T >= 1).
          max_new_tokens: N >= 1 tokens to generate (fewer when an EOS comes first).
          sampler: a `kvq_jax.Sampler`; None is greedy.

        Raises:
          ValueError: a bad argument, or a request that can never fit (max_len, pool).
        """
        toks = np.asarray(token_ids)
        if toks.ndim != 1 or toks.size == 0 or not np.issubdtype(toks.dtype, np.integer):
            raise ValueError(f"token_ids: expected a non-empty int[T], got {toks.dtype}{list(toks.shape)}")
        if toks.min() < 0 or toks.max() >= self.vocab_size:
            raise ValueError(f"token_ids: ids must lie in [0, {self.vocab_size})")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        if sampler is not None and not isinstance(sampler, Sampler):
            raise ValueError(f"sampler: expected a kvq_jax.Sampler or None, got {type(sampler).__name__}")
        total = toks.size + int(max_new_tokens) - 1
        if total > self.max_len:
            raise ValueError(f"max_new_tokens: a {toks.size}-token prompt and {max_new_tokens} new tokens "
                             f"need {total} tokens, more than max_len={self.max_len}")
        if self.pages_for(toks.size, int(max_new_tokens)) > self.num_pages:
            raise ValueError(f"token_ids: the request needs {self.pages_for(toks.size, int(max_new_tokens))} "
                             f"pages, the pool has {self.num_pages}")
        rid = self._next_id
        self._next_id += 1
        self._queue[rid] = _Request(rid, toks.astype(np.int32), int(max_new_tokens),
                                    GREEDY if sampler is None else sampler)
        return rid

    def cancel(self, rid: int) -> list[int]:
        """Drop a queued or running request; its pages are released. Returns the tokens it had generated."""
        if rid in self._queue:
            return self._queue.pop(rid).out
        for r in self._slots:
            if r is not None and r.rid == rid:
                self._retire(r)
                return r.out
        raise ValueError(f"rid: no queued or running request {rid!r}")

    def prefill(self, token_ids) -> np.ndarray:
        """Next-token logits ``f32[V]`` after a prompt, computed as a request's prefill (in
        chunks, through a free slot and fresh pages, prefix cache not used or filled); the
        slot and pages are released afterwards. For scoring and for checking chunked prefill."""
        rid = self.submit(token_ids, 1)
        r = self._queue.pop(rid)
        if None not in self._slots:
            raise RuntimeError("prefill: every slot is busy")
        pages = self.allocator.alloc(self.pages_for(len(r.prompt), 1))
        slot = self._slots.index(None)
        r.slot, r.pages = slot, pages
        self._slots[slot] = r
        self._set_pages(slot, pages)
        try:
            while r.prefilling:
                start = r.done
                n = min(self.prefill_chunk - start % self.prefill_chunk, len(r.prompt) - start)
                logits = self._run_chunk(r, start, n)
        finally:
            self._retire(r)
        return np.asarray(logits[0])

    def run(self, max_steps: int | None = None) -> dict[int, list[int]]:
        """Run until every submitted request is done (or ``max_steps`` engine iterations).

        Returns:
          ``{request id: generated ids}`` of the requests that finished in this call
          (an EOS that ended a request is included, as in `kvq.generate`).
        """
        finished: dict[int, list[int]] = {}
        it = 0
        while (self._queue or self.num_active) and (max_steps is None or it < max_steps):
            self.step(finished)
            it += 1
        self._read_pending(finished)
        return finished

    def step(self, finished: dict | None = None) -> dict[int, list[int]]:
        """One engine iteration: admit, one prefill chunk per prefilling request, one decode step.

        Decode steps are pipelined: a step is dispatched before the previous step's tokens
        are read back, so the device never waits for the host between steps, and a request
        leaves its slot one iteration after its last token was computed (`run` reads the
        last step before it returns).

        Returns (and adds to ``finished``) the requests that finished in it.
        """
        finished = {} if finished is None else finished
        self._admit()
        if not self.num_active:
            if self._queue:
                raise RuntimeError("no request could be admitted (pool too small for the next one)")
            return finished
        for r in list(self._slots):
            if r is not None and r.prefilling:
                self._prefill_chunk(r, finished)
        decoding = [r for r in self._slots if r is not None and not r.prefilling]
        if decoding or self._pending:
            self._decode(decoding, finished)
        return finished

    # -- internals ------------------------------------------------------------------
    def _admit(self):
        for rid in list(self._queue):
            if None not in self._slots:
                return
            r = self._queue[rid]
            need = self.pages_for(len(r.prompt), r.max_new)
            hit_pages, snap = [], None
            if self.prefix_cache and not r.keys:  # once per request, not per admission attempt
                unit = self.prefill_chunk if self._windowed else self.page_size  # snapshots' step | full pages
                r.keys = prefix_keys(r.prompt, unit, len(r.prompt) // unit, salt=self._salt)
            if self.prefix_cache and self._windowed:  # snapshots at multiples of prefill_chunk
                usable = (len(r.prompt) - 1) // self.prefill_chunk
                hit = next((k for k in reversed(r.keys[:usable]) if k in self._snapshots), None)
                if hit is not None:
                    self._snapshots.move_to_end(hit)
                    snap = self._snapshots[hit]
                    hit_pages = list(snap.shared)
                    self.allocator.retain(hit_pages)
            elif self.prefix_cache:
                usable = (len(r.prompt) - 1) // self.prefill_chunk * self.prefill_chunk // self.page_size
                hit_pages = self.allocator.lookup(r.keys[:usable])
                keep = len(hit_pages) * self.page_size // self.prefill_chunk * self.prefill_chunk // self.page_size
                self.allocator.release(hit_pages[keep:])
                hit_pages = hit_pages[:keep]
            try:
                fresh = self._alloc(need - len(hit_pages), keep=snap)
            except OutOfPages:
                self.allocator.release(hit_pages)
                return  # first come, first served: wait for pages
            del self._queue[rid]
            slot = self._slots.index(None)
            r.slot, r.pages = slot, hit_pages + fresh
            r.hit = r.done = snap.tokens if snap else len(hit_pages) * self.page_size
            self.stats["prefix_hit_tokens"] += r.hit
            self._slots[slot] = r
            self._set_pages(slot, r.pages)
            self._lengths[slot] = r.done
            if snap:  # the partly filled pages into the request's own, the window into its slot
                if snap.partial:
                    self._kv = _write_pages(self._kv, jnp.asarray(fresh[:snap.partial], jnp.int32),
                                            snap.partial_data, num_pages=self.num_pages)
                self._kv = _set_slot_window(self._kv, snap.window, slot)

    def _alloc(self, n: int, keep: _Snapshot | None = None) -> list[int]:
        """`PageAllocator.alloc`, dropping prefix snapshots (least recently used first, never
        ``keep``) while the free and evictable pages are short; OutOfPages if still short."""
        while n > self.allocator.num_available:
            victim = next((k for k, v in self._snapshots.items() if v is not keep), None)
            if victim is None:
                break
            self._drop_snapshot(victim)
        return self.allocator.alloc(n)

    def _drop_snapshot(self, key: bytes):
        self.allocator.release(self._snapshots.pop(key).shared)

    def _snapshot(self, r: _Request):
        """Keep request ``r``'s cache state after its first ``r.done`` prompt tokens (a multiple
        of prefill_chunk) for later prompts with the same prefix: its body pages that every
        layer's format fills (shared), copies of the pages some format fills only partly, and
        copies of its bf16 windows and sinks (both outside the pool)."""
        key = r.keys[r.done // self.prefill_chunk - 1]
        if key in self._snapshots:
            self._snapshots.move_to_end(key)
            return
        if not self.prefix_snapshots:
            return
        body = [int(segment_lengths(g, np.asarray([r.done]))[1][0]) for g in self._groups]
        n_shared = min(body) // self.page_size
        n_touched = max(-(-q // self.page_size) for q in body)
        data = None
        if n_touched > n_shared:
            data = _read_pages(self._kv, jnp.asarray(r.pages[n_shared:n_touched], jnp.int32), num_pages=self.num_pages)
        shared = r.pages[:n_shared]
        self.allocator.retain(shared)
        self._snapshots[key] = _Snapshot(r.done, shared, n_touched - n_shared, data, _slot_window(self._kv, r.slot))
        while len(self._snapshots) > self.prefix_snapshots:
            self._drop_snapshot(next(iter(self._snapshots)))

    def _static(self, fresh: bool | None) -> dict:
        """The static arguments of `_forward` and `_decode_step` for this engine (also used by benchmarks/serve.py);
        ``fresh=None``: those of `_decode_step` (no ``fresh``)."""
        static = dict(gd=self._gd, groups=self._groups, layer_map=self._layer_map, page_size=self.page_size,
                      num_pages=self.num_pages, impl=self.impl, prefill_block=self.prefill_block, mesh=self.mesh)
        return static if fresh is None else dict(static, fresh=bool(fresh))

    def _call(self, tokens, rows, n_valid, fresh):
        rows = np.asarray(rows, np.int32)
        logits, self._kv, over = _forward(
            self._weights, self._kv, self._put(np.asarray(tokens, np.int32)), self._put(rows),
            self._put(self._lengths[rows]), self._put(np.asarray(n_valid, np.int32)), self._put(self._table[rows]),
            **self._static(fresh))
        if bool(np.any(np.asarray(over))):  # pages are reserved at admission: this is a bug, never silent
            raise RuntimeError(f"page overflow in slots {rows[np.asarray(over)].tolist()}")
        return logits

    def _sample(self, logits, reqs):
        samplers = tuple(dict.fromkeys(r.sampler for r in reqs))
        toks = _sample(logits, self._key, jnp.asarray([r.rid for r in reqs], jnp.int32),
                       jnp.asarray([len(r.out) for r in reqs], jnp.int32),
                       jnp.asarray([samplers.index(r.sampler) for r in reqs], jnp.int32), samplers=samplers)
        return np.asarray(toks).tolist()

    def _run_chunk(self, r: _Request, start: int, n: int):
        Tb = min(bucket_length(n), self.prefill_chunk)
        toks = np.zeros((1, Tb), np.int32)
        toks[0, :n] = r.prompt[start:start + n]
        logits = self._call(toks, [r.slot], [n], fresh=start == 0)
        r.done += n
        self._lengths[r.slot] += n
        self.stats["prefill_tokens"] += n
        self.stats["prefill_calls"] += 1
        return logits

    def _prefill_chunk(self, r: _Request, finished):
        start = r.done
        n = min(self.prefill_chunk - start % self.prefill_chunk, len(r.prompt) - start)
        logits = self._run_chunk(r, start, n)
        if self.prefix_cache and self._windowed:
            if r.done % self.prefill_chunk == 0:
                self._snapshot(r)
        elif self.prefix_cache:
            for p in range(start // self.page_size, r.done // self.page_size):
                self.allocator.register(r.keys[p], r.pages[p])
        if not r.prefilling:
            self._push(r, self._sample(logits, [r])[0], finished)

    def _decode(self, reqs, finished):
        """Dispatch one decode step of the slots in ``reqs`` that still need tokens (sampled on
        the device; one transfer of the slots' state in, the page tables only after they
        change), then read back the previous step. A request whose last token is still
        pending takes it from the previous step's ids on the device."""
        prev = self._pending
        pending_of = prev[2] if prev else {}
        slots = np.zeros((self.max_batch, 7), np.int32)  # see _decode_step
        slots[:, 1] = self._lengths
        samplers = tuple(dict.fromkeys(r.sampler for r in reqs))
        live = {}
        for r in reqs:
            pend = int(pending_of.get(r.slot) is r)
            if len(r.out) + pend >= r.max_new:  # its last token is the pending one
                continue
            slots[r.slot] = (0 if pend else r.out[-1], self._lengths[r.slot], 1, r.rid, len(r.out) + pend,
                             samplers.index(r.sampler), pend)
            live[r.slot] = r
        self._pending = None
        if live:
            if self._table_dev is None:
                # a copy: device_put may alias or copy the host array later (CPU), and the host
                # table changes (admissions) while this step is still in flight
                self._table_dev = self._put(self._table.copy())
            nxt, self._kv, over = _decode_step(self._weights, self._kv, self._put(slots),
                                               prev[0] if prev else self._no_prev, self._table_dev, self._key,
                                               samplers=samplers, **self._static(None))
            self._pending = (nxt, over, live)
            for slot in live:
                self._lengths[slot] += 1
            self.stats["decode_steps"] += 1
        if prev:
            self._apply(prev, finished)

    def _read_pending(self, finished):
        """Read back the last dispatched decode step, if any."""
        prev, self._pending = self._pending, None
        if prev:
            self._apply(prev, finished)

    def _apply(self, step, finished):
        """Push one decode step's tokens to its requests; a request that left its slot since
        (an EOS read after the step was dispatched, or a cancel) drops its token."""
        nxt, over, live = step
        nxt, over = jax.device_get((nxt, over))
        bad = [slot for slot in live if over[slot]]
        if bad:  # pages are reserved at admission: this is a bug, never silent
            raise RuntimeError(f"page overflow in slots {bad}")
        for slot, r in live.items():
            if self._slots[slot] is r:
                self._push(r, nxt[slot], finished)

    def _push(self, r: _Request, tok: int, finished):
        r.out.append(int(tok))
        if len(r.out) >= r.max_new or int(tok) in self.eos_ids:
            finished[r.rid] = r.out
            self._retire(r)

    def _retire(self, r: _Request):
        self.allocator.release(r.pages)
        r.pages = []
        self._slots[r.slot] = None
        self._set_pages(r.slot, [])
        self._lengths[r.slot] = 0
        r.slot = -1

    def _set_pages(self, slot: int, pages):
        """Slot ``slot``'s page-table row := ``pages`` (-1 after them); the device copy is stale."""
        self._table[slot] = -1
        self._table[slot, :len(pages)] = pages
        self._table_dev = None


# ----------------------------------------------------------------------------- speculative decoding


@partial(jax.jit, static_argnames=("graphdef", "fresh", "impl"))
def _model_call(graphdef, state, caches, tokens, positions, lengths, *, fresh, impl):
    """One model call: ``graphdef`` a `_Static` GraphDef, ``state`` its plain-dict weights."""
    model = nnx.merge(graphdef.value, state)
    logits, caches = model(tokens, positions, caches, prefill=fresh, lengths=lengths, impl=impl)
    return logits, caches


def _rollback(caches, n):
    return tuple(dataclasses.replace(c, lengths=jnp.full_like(c.lengths, n)) for c in caches)


def speculative_generate(target, draft, tokens, k: int = 4, max_new_tokens: int = 32, *, kv="int8",
                         draft_kv=None, max_len: int | None = None, eos_id=None, impl: str = "auto"):
    """Greedy speculative decoding: ``draft`` proposes k tokens, ``target`` checks them in one step.

    Each round the draft model decodes k tokens greedily; the target then appends the
    last accepted token and the k drafts to its quantized cache and attends over it
    with T = k + 1 queries (one call, causal per row: the kernel's T > 1 path). The
    longest prefix of drafts equal to the target's own greedy choices is accepted,
    plus the target's next token; rejected tokens are rolled back from both caches.
    The result is the target's plain greedy decode (`kvq.generate` with the same
    ``kv``), token for token, up to floating-point ties.

    Args:
      target, draft: `kvq_jax.models.LlamaModel` s with the same vocabulary.
      tokens: ``int[T]`` one prompt.
      k: draft tokens per round (>= 1).
      max_new_tokens: tokens to generate (fewer when an EOS comes first).
      kv, draft_kv: cache formats of the target and draft (draft default: kv).
      max_len: cache capacity (default: bucketed prompt + max_new_tokens + k + 1).
      eos_id: id or ids that stop; None uses ``target.eos_token_ids``.
      impl: attention implementation over the caches.

    Returns:
      ``(ids list[int], stats dict)`` with stats ``rounds``, ``proposed``, ``accepted``.
    """
    toks = np.asarray(tokens)
    if toks.ndim != 1 or toks.size == 0 or not np.issubdtype(toks.dtype, np.integer):
        raise ValueError(f"tokens: expected one non-empty prompt int[T], got {toks.dtype}{list(toks.shape)}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft: vocabulary {draft.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}")
    P = toks.size
    Tb = bucket_length(P)
    max_len = Tb + max_new_tokens + k + 1 if max_len is None else int(max_len)
    if P + max_new_tokens + k > max_len:
        raise ValueError(f"max_len: {max_len} cannot hold the prompt, {max_new_tokens} tokens and {k} drafts")
    eos = tuple(getattr(target, "eos_token_ids", ()) or ()) if eos_id is None else (
        (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id))
    models = {}
    for name, m, spec in (("t", target, kv), ("d", draft, kv if draft_kv is None else draft_kv)):
        gd, st = nnx.split(m)  # as the engine holds them: cheap to dispatch at every call
        models[name] = [_Static(gd), nnx.to_pure_dict(st), m.init_caches(spec, 1, max_len)]

    def call(name, x, pos, n, fresh=False):
        gd, st, caches = models[name]
        logits, caches = _model_call(gd, st, caches, jnp.asarray(x, jnp.int32)[None], jnp.asarray(pos, jnp.int32)[None],
                                     jnp.asarray([n], jnp.int32), fresh=fresh, impl=impl)
        models[name][2] = caches
        return np.asarray(logits[0])

    padded = np.zeros((Tb,), np.int32)
    padded[:P] = toks
    pos = np.arange(Tb)
    last = int(np.argmax(call("t", padded, pos, P, fresh=True)[P - 1]))
    call("d", padded, pos, P, fresh=True)
    out = [last]
    n = P  # tokens both caches hold (every token but `last`)
    stats = dict(rounds=0, proposed=0, accepted=0)
    while len(out) < max_new_tokens and last not in eos:
        saved = {name: models[name][2] for name in models}  # caches at the round's start (not donated)
        drafts, x = [], last
        for i in range(k + 1):  # the last call only stores d_k in the draft's cache
            lg = call("d", [x], [n + i], 1)
            if i < k:
                x = int(np.argmax(lg[0]))
                drafts.append(x)
        inputs = [last] + drafts
        g = np.argmax(call("t", inputs, n + np.arange(k + 1), k + 1), axis=-1)
        a = 0
        while a < k and drafts[a] == int(g[a]):
            a += 1
        stats["rounds"] += 1
        stats["proposed"] += k
        stats["accepted"] += a
        new = drafts[:a] + [int(g[a])]
        if a < k:
            for name in ("t", "d"):
                _roll(models[name], saved[name], inputs, n, a, lambda *args, name=name: call(name, *args))
        n += a + 1
        for t in new:
            if len(out) < max_new_tokens and last not in eos:
                out.append(t)
                last = t
    return out, stats


def _roll(entry, saved, inputs, n, a, call):
    """Keep only the first ``a + 1`` of the ``k + 1`` tokens a round appended to a model's caches.

    Without a bf16 residual window the stored tokens never move: cutting the lengths
    back is exact. With one, tokens may have moved from the window into the body:
    restore the caches of the round's start and append the kept tokens again (the same
    K/V: same tokens, same positions, same cache before them).
    """
    caches = entry[2]
    if all(residual_capacity(c.spec) == 0 for c in caches):
        entry[2] = _rollback(caches, n + a + 1)
        return
    entry[2] = saved
    x = np.zeros((len(inputs),), np.int32)
    x[:a + 1] = inputs[:a + 1]
    call(x, n + np.arange(len(inputs)), a + 1)


__all__ = ["Engine", "block_forward", "speculative_generate"]
