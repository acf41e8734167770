"""Jit-compiled generation over quantized KV caches: prefill, a `lax.while_loop` decode, samplers.

    out = kvq.generate(model, tokens, max_new_tokens=64, kv="int4-kivi")
    out.tokens    # int32[B, max_new_tokens], padded with eos after a sequence stops
    out.lengths   # int32[B], tokens generated per sequence (eos included)

Flow of one call (one jit, caches donated):

1. Prompts ``[B, T]`` are right-padded to a length bucket (a power of two >= 16), so
   prompts of different lengths in the same bucket reuse one compilation.
2. Prefill runs the prompts through every layer attending on their own full-precision
   K/V, then quantize-appends the real tokens (``lengths`` = per-sequence prompt length).
   When ``caches`` already hold earlier turns, the prompt is instead appended and
   attended through the caches (chunked prefill).
3. Decode: ``lax.while_loop`` feeds one token per step (append, then attend through the
   cache), samples the next, and stops a sequence at EOS; the loop ends when every
   sequence is done or ``max_new_tokens`` are out.

With ``mesh=`` (`kvq_jax.sharding`) the same jit runs on a device mesh: weights split
Megatron style, caches split by sequence over "data" and by KV head over "model",
attention through the caches run per shard (``shard_map``), results kept sharded.

Note: ``kvq_jax.generate`` (attribute of the package) is this function; import helpers
with ``from kvq_jax.generate import ...``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from kvq_jax import sharding as _sharding
from kvq_jax.cache import KVCache
from kvq_jax.nn import init_caches, resolve_policy

MIN_BUCKET = 16


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Next-token sampling: temperature, then top-k, then top-p (nucleus) filtering.

    Hashable: it is a static argument of the compiled loop.

    Attributes:
      temperature: logits are divided by it; 0 means greedy (argmax).
      top_k: keep the k most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches
        top_p (None or 1.0: all); the most likely token is always kept.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: expected a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a float in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def filter(self, logits: jax.Array) -> jax.Array:
        """Temperature-scaled logits ``f32[B, V]`` with the tokens outside top-k / top-p set to -inf."""
        logits = logits.astype(jnp.float32) / max(self.temperature, 1e-6)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None and self.top_p < 1.0:
            srt = jnp.sort(logits, axis=-1)[..., ::-1]
            probs = jax.nn.softmax(srt, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
            keep = before < self.top_p
            thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < thresh, -jnp.inf, logits)
        return logits

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Sample ids: logits ``f32[B, V]``, a PRNG key -> ``int32[B]``."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filter(logits), axis=-1).astype(jnp.int32)


GREEDY = Sampler(temperature=0.0)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
      tokens: ``int32[B, max_new_tokens]`` generated ids; after a sequence's EOS (and
        after the loop stopped) the row is padded with the first EOS id (0 without one).
      lengths: ``int32[B]`` tokens generated per sequence, its EOS included.
      caches: tuple of one KVCache per layer holding, for each sequence, the prompt
        (and earlier turns) plus every generated token but the last one (the last
        token has not been fed back yet: start the next turn's prompt with it).
      prompt_lengths: ``int32[B]`` prompt tokens per sequence.
      steps: decode iterations run (at most max_new_tokens - 1; fewer when all sequences
        hit EOS early).
    """

    tokens: jax.Array
    lengths: jax.Array
    caches: tuple[KVCache, ...]
    prompt_lengths: jax.Array
    steps: int


# ----------------------------------------------------------------------------- bucketing and tracing


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded prompt length for a prompt of ``n`` tokens: the next power of two, at least ``minimum``."""
    n = max(int(n), 1)
    return max(minimum, 1 << (n - 1).bit_length())


_TRACES = {"generate": 0, "teacher_force": 0}


def trace_count(name: str = "generate") -> int:
    """How many times the compiled generate (or "teacher_force") function was traced in this process.

    Each trace is one compilation; tests use it to prove that prompts of different
    lengths within a bucket share one.
    """
    return _TRACES[name]


class _Stream:
    """A user's stream callback, fed in step order: on several devices the loop's callbacks are
    unordered (jax supports ordered effects on one device only), so early steps wait here."""

    def __init__(self, fn: Callable):
        self.fn, self.next, self.pending, self.lock = fn, 0, {}, threading.Lock()

    def __call__(self, step: int, tokens: np.ndarray, active: np.ndarray) -> None:
        with self.lock:
            if step >= self.next:
                self.pending.setdefault(step, (tokens, active))
            while self.next in self.pending:
                t, a = self.pending.pop(self.next)
                self.fn(self.next, t, a)
                self.next += 1


_STREAMS: dict[int, _Stream] = {}
_STREAM_IDS = itertools.count(1)
_STREAM_LOCK = threading.Lock()


def _emit(stream_id, step, tokens, active):
    fn = _STREAMS.get(int(stream_id))
    if fn is not None:
        fn(int(step), np.asarray(tokens), np.asarray(active))


def _eos_array(eos_ids):
    return jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)


# ----------------------------------------------------------------------------- the compiled loop


def _prefill(model, caches, start, tokens, prompt_lengths, fresh, impl):
    """Run the padded prompts from positions ``start`` (int32[B]); return (last-token logits f32[B, V], caches)."""
    B, T = tokens.shape
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    h, caches = model.hidden(tokens, positions, caches, prefill=fresh, lengths=prompt_lengths, impl=impl)
    last = jnp.take_along_axis(h, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, d]
    return model.logits(last), caches


def scan_layers_default(scan_layers: bool | None) -> bool:
    """``scan_layers`` of `generate` / `teacher_force` resolved: None scans the blocks on every
    backend but a GPU. Scanned, each decode step copies every layer's cache out of and back into
    the stacked caches (`kvq_jax.models.ScannedLlama`), where an unrolled step reads it in place.
    On an H200 that copy dominates the step: Llama-3-8B shape, 8 x 2048-token prompts, decode
    unrolled / scanned bf16 5.66 / 18.07 ms per step, int8 5.01 / 16.15, int4 5.07 / 14.46, for
    13-17 s of compile against 2-5 s (BENCHMARKS.md run W). On a CPU the unrolled model's compile
    time weighs more."""
    if scan_layers is None:
        return jax.default_backend() != "gpu"
    return bool(scan_layers)


def _runner(graphdef, state, caches, scan_layers):
    """The model to run inside a jit (scanned over layers when asked) and its caches in the form it takes."""
    model = nnx.merge(graphdef, state)
    if scan_layers and hasattr(model, "scanned"):
        runner = model.scanned([c.spec for c in caches])
        return runner, runner.stack_caches(caches), runner.unstack_caches
    return model, caches, lambda c: c


def _keep(mesh, x, spec):
    """Inside a jit: ``x`` constrained to ``spec`` on ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _keep_caches(mesh, caches):
    return caches if mesh is None else _sharding.constrain_caches(caches, mesh)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampler", "eos_ids", "fresh", "impl",
                                   "streaming", "scan_layers", "mesh"), donate_argnames=("caches",))
def _generate_jit(graphdef, state, caches, tokens, prompt_lengths, key, stream_id, *, max_new_tokens,
                  sampler, eos_ids, fresh, impl, streaming, scan_layers, mesh):
    _TRACES["generate"] += 1
    with _sharding.use_mesh(mesh):  # attention through the caches runs per shard while tracing
        out, n_gen, caches, steps = _generate_loop(
            graphdef, state, caches, tokens, prompt_lengths, key, stream_id, max_new_tokens=max_new_tokens,
            sampler=sampler, eos_ids=eos_ids, fresh=fresh, impl=impl, streaming=streaming,
            scan_layers=scan_layers, mesh=mesh)
    return (_keep(mesh, out, P(_sharding.DATA, None)), _keep(mesh, n_gen, P(_sharding.DATA)),
            _keep_caches(mesh, caches), _keep(mesh, steps, P()))


def _generate_loop(graphdef, state, caches, tokens, prompt_lengths, key, stream_id, *, max_new_tokens,
                   sampler, eos_ids, fresh, impl, streaming, scan_layers, mesh):
    start = caches[0].lengths
    model, caches, unstack = _runner(graphdef, state, caches, scan_layers)
    B = tokens.shape[0]
    eos = _eos_array(eos_ids)
    pad = eos_ids[0] if eos_ids else 0

    logits, caches = _prefill(model, caches, start, tokens, prompt_lengths, fresh, impl)
    caches = _keep_caches(mesh, caches)
    tok = sampler(logits, jax.random.fold_in(key, 0))
    done = jnp.isin(tok, eos) if eos_ids else jnp.zeros((B,), bool)
    out = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
    n_gen = jnp.ones((B,), jnp.int32)
    if streaming:
        jax.debug.callback(_emit, stream_id, 0, _keep(mesh, tok, P()), jnp.ones((B,), bool), ordered=mesh is None)
    pos0 = start + prompt_lengths  # position of generated token 0

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, done, n_gen, caches = carry
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=True)  # [B, 1]
        pos = (pos0 + i - 1)[:, None]
        # finished sequences append nothing: their caches stop at the last real token.
        step_len = jnp.where(done, 0, 1).astype(jnp.int32)
        logits, caches = model(prev, pos, caches, lengths=step_len, impl=impl)
        nxt = sampler(logits[:, 0], jax.random.fold_in(key, i))
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_index_in_dim(out, nxt[:, None], i, axis=1)
        if streaming:
            jax.debug.callback(_emit, stream_id, i, _keep(mesh, nxt, P()), _keep(mesh, ~done, P()),
                               ordered=mesh is None)
        n_gen = n_gen + (~done).astype(jnp.int32)
        if eos_ids:
            done = done | jnp.isin(nxt, eos)
        return i + 1, out, done, n_gen, _keep_caches(mesh, caches)

    i, out, done, n_gen, caches = jax.lax.while_loop(cond, body, (jnp.int32(1), out, done, n_gen, caches))
    return out, n_gen, unstack(caches), i - 1


def _as_prompts(tokens, prompt_lengths):
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected int[B, T], got {tokens.dtype}{list(tokens.shape)}")
    B, T = tokens.shape
    if T == 0:
        raise ValueError("tokens: prompts need at least one token")
    if prompt_lengths is None:
        lens = np.full((B,), T, np.int32)
    else:
        lens = np.asarray(prompt_lengths, np.int64).reshape(-1)
        if lens.shape != (B,):
            raise ValueError(f"prompt_lengths: expected {B} lengths, got shape {lens.shape}")
        if lens.min() < 1 or lens.max() > T:
            raise ValueError(f"prompt_lengths: expected values in [1, {T}], got {lens.tolist()}")
        lens = lens.astype(np.int32)
    return tokens.astype(np.int32), lens


def _pad_to_bucket(tokens: np.ndarray, lens: np.ndarray, bucket: int | None):
    Tb = bucket_length(int(lens.max())) if bucket is None else int(bucket)
    if Tb < int(lens.max()):
        raise ValueError(f"bucket: {Tb} is shorter than the longest prompt ({int(lens.max())})")
    B = tokens.shape[0]
    padded = np.zeros((B, Tb), np.int32)
    w = min(Tb, tokens.shape[1])
    padded[:, :w] = tokens[:, :w]
    padded[np.arange(Tb)[None, :] >= lens[:, None]] = 0
    return padded


def _resolve_eos(model, eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return tuple(getattr(model, "eos_token_ids", ()) or ())
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def _model_dims(model):
    return model.num_layers, model.num_kv_heads, model.head_dim


def generate(
    model,
    tokens,
    max_new_tokens: int,
    kv="int8",
    sampler: Sampler | None = None,
    rng: jax.Array | int | None = None,
    prompt_lengths=None,
    eos_id: int | Sequence[int] | None = None,
    stream: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    max_len: int | None = None,
    impl: str = "auto",
    *,
    caches: tuple[KVCache, ...] | None = None,
    bucket: int | None = None,
    scan_layers: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` per sequence with quantized KV caches.

    Args:
      model: a `kvq_jax.models.LlamaModel` (or any nnx module with the same call
        signature and ``num_layers``, ``num_kv_heads``, ``head_dim``).
      tokens: ``int[B, T]`` prompts, right-padded (or ``int[T]`` for one prompt).
      max_new_tokens: N >= 1, tokens to generate per sequence (a compile-time constant).
      kv: cache policy when ``caches`` is None: a preset name ("bf16", "int8",
        "int4-kivi", ...), a KVSpec, or one per layer (`kvq.nn.resolve_policy`).
      sampler: a `Sampler`; None is greedy.
      rng: PRNG key or int seed for sampling (default 0).
      prompt_lengths: ``int[B]`` real prompt tokens per row (default: all T).
      eos_id: an id or ids that end a sequence; None uses ``model.eos_token_ids``;
        ``()`` never stops early.
      stream: optional ``stream(step, tokens int32[B], active bool[B])`` called on the
        host for every generated position as the loop runs (``active[b]`` False once
        sequence b has finished: its token is padding).
      max_len: cache capacity in tokens per sequence for new caches (default: prompt
        bucket + max_new_tokens).
      impl: implementation of attention through the caches and of appends to them ("auto",
        "xla", "pallas"; `kvq.attend`, `kvq.append`).
      caches: continue from these caches (earlier turns of the same sequences); they
        are donated (consumed) and the new ones returned in ``.caches``. The prompt is
        then appended and attended through the caches instead of the full-precision prefill.
      bucket: force the padded prompt length (default: power of two >= 16).
      scan_layers: run the blocks under ``lax.scan`` (`LlamaModel.scanned`): compiles
        several times faster, but every step reads each layer's weights and cache as
        slices of stacked copies and writes the caches back, so steps are slower
        (measured: SmolLM2-135M, int8, 1K prompt, 2 CPU cores: 96 vs 70 ms per decode
        step; see `scan_layers_default` for the H200). False unrolls the layers: no
        copies, longer compiles. None (default): `scan_layers_default`, unrolled on a GPU,
        scanned elsewhere.
      mesh: run on a device mesh with axes ("data", "model") (`kvq_jax.sharding.make_mesh`):
        the weights are placed Megatron style (`kvq_jax.sharding.shard_params`; already
        placed weights are not moved), new caches are created split over the mesh
        (`kvq_jax.sharding.shard_cache`: sequences over "data", KV heads over "model",
        replicated when Hkv is not a multiple of its size), given ``caches`` are placed
        so, and attention through them runs per shard. B must be a multiple of the
        "data" axis size. Same tokens as without a mesh, up to floating-point
        reduction order; the decode loop transfers nothing to or from the host (unless
        ``stream`` is given).

    Returns:
      `GenerateOutput` with ``.tokens int32[B, N]``, ``.lengths int32[B]``, ``.caches``,
      ``.prompt_lengths``, ``.steps``. With a mesh, tokens, lengths and prompt_lengths
      are split over "data" and the caches keep the shardings of `shard_cache`.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    prompts, lens = _as_prompts(tokens, prompt_lengths)
    padded = _pad_to_bucket(prompts, lens, bucket)
    B, Tb = padded.shape
    L, Hkv, D = _model_dims(model)
    if mesh is not None:
        _sharding.check_mesh(mesh, "mesh")
        _sharding.check_batch(B, mesh, "tokens")
    fresh = caches is None
    if fresh:
        max_len = Tb + max_new_tokens if max_len is None else int(max_len)
        need = int(lens.max()) + max_new_tokens - 1
        if need > max_len:
            raise ValueError(f"max_len: {max_len} tokens cannot hold a {int(lens.max())}-token prompt "
                             f"and {max_new_tokens} new tokens (need {need})")
        if mesh is None:
            caches = init_caches(resolve_policy(kv, L), B, max_len, Hkv, D)
        else:
            caches = _sharding.init_caches(resolve_policy(kv, L), B, max_len, Hkv, D, mesh=mesh)
    else:
        caches = tuple(caches)
        if len(caches) != L or caches[0].batch != B:
            raise ValueError(f"caches: expected {L} caches of batch {B}")
        if mesh is not None:
            caches = _sharding.shard_cache(caches, mesh)
        # read a copy: a host view of the buffer itself would keep it from being donated
        held = _sharding.to_host(caches[0].lengths)
        need = held + lens + max_new_tokens - 1
        if (need > caches[0].max_len).any():
            raise ValueError(f"caches: max_len {caches[0].max_len} cannot hold this turn "
                             f"(needs {int(need.max())} tokens)")
    sampler = GREEDY if sampler is None else sampler
    if rng is None or isinstance(rng, (int, np.integer)):
        with jax.transfer_guard_host_to_device("allow"):  # the seed is a host input, sent on purpose
            rng = jax.random.key(0 if rng is None else int(rng))
    eos_ids = _resolve_eos(model, eos_id)
    graphdef, state = nnx.split(model)
    stream_id = 0
    if stream is not None:
        with _STREAM_LOCK:
            stream_id = next(_STREAM_IDS)
            _STREAMS[stream_id] = _Stream(stream)
    if mesh is None:
        args = (jnp.asarray(padded), jnp.asarray(lens), rng, jnp.int32(stream_id))
    else:  # explicit placement of every input: nothing moves implicitly
        state = _sharding.shard_state(model, mesh)
        args = (_sharding.global_array(padded, mesh, P(_sharding.DATA, None)),
                _sharding.global_array(lens, mesh, P(_sharding.DATA)),
                _sharding.global_array(rng, mesh, P()),
                _sharding.global_array(np.int32(stream_id), mesh, P()))
    try:
        out, n_gen, caches, steps = _generate_jit(
            graphdef, state, caches, *args,
            max_new_tokens=max_new_tokens, sampler=sampler, eos_ids=eos_ids, fresh=fresh, impl=impl,
            streaming=stream is not None, scan_layers=scan_layers_default(scan_layers), mesh=mesh)
        out.block_until_ready()
        if stream is not None:
            jax.effects_barrier()
    finally:
        if stream is not None:
            _STREAMS.pop(stream_id, None)
    return GenerateOutput(tokens=out, lengths=n_gen, caches=caches, prompt_lengths=args[1],
                          steps=int(jax.device_get(steps)))


# ----------------------------------------------------------------------------- teacher forcing


@partial(jax.jit, static_argnames=("graphdef", "impl", "scan_layers", "mesh"), donate_argnames=("caches",))
def _teacher_force_jit(graphdef, state, caches, tokens, prompt_lengths, targets, *, impl, scan_layers, mesh):
    _TRACES["teacher_force"] += 1
    with _sharding.use_mesh(mesh):
        logits, caches = _teacher_force_steps(graphdef, state, caches, tokens, prompt_lengths, targets,
                                              impl=impl, scan_layers=scan_layers)
    return _keep(mesh, logits, P(_sharding.DATA, None, None)), _keep_caches(mesh, caches)


def _teacher_force_steps(graphdef, state, caches, tokens, prompt_lengths, targets, *, impl, scan_layers):
    start = caches[0].lengths
    model, caches, unstack = _runner(graphdef, state, caches, scan_layers)
    logits0, caches = _prefill(model, caches, start, tokens, prompt_lengths, True, impl)
    pos0 = start + prompt_lengths

    def step(caches, xs):
        i, tok = xs
        logits, caches = model(tok[:, None], (pos0 + i)[:, None], caches, impl=impl)
        return caches, logits[:, 0]

    N = targets.shape[1]
    caches, rest = jax.lax.scan(step, caches, (jnp.arange(N - 1, dtype=jnp.int32), targets[:, :-1].T))
    return jnp.concatenate([logits0[:, None], jnp.swapaxes(rest, 0, 1)], axis=1), unstack(caches)


def teacher_force(model, tokens, targets, kv="bf16", prompt_lengths=None, max_len: int | None = None,
                  impl: str = "auto", bucket: int | None = None, scan_layers: bool | None = None,
                  mesh: jax.sharding.Mesh | None = None):
    """Next-token logits along a given continuation, decoding it step by step through the caches.

    The prompt is prefilled exactly as in `generate` (full-precision K/V, then
    quantize-append); then ``targets[:, i]`` is fed at step i (append, attend through
    the cache), so ``logits[:, i]`` is the distribution `generate` would sample token i
    from had it produced ``targets[:, :i]``. Use it to compare caches on the same text.

    Args:
      model: a LlamaModel.
      tokens: ``int[B, T]`` right-padded prompts; prompt_lengths ``int[B]`` (default T).
      targets: ``int[B, N]`` the continuation.
      kv: cache policy (preset, KVSpec or per-layer).
      max_len: cache capacity (default bucket + N).
      scan_layers: as `generate`'s (None: `scan_layers_default`).
      mesh: run on a device mesh as `generate` does (weights, caches and attention
        split over ("data", "model")); B must be a multiple of the "data" axis size.

    Returns:
      ``(logits f32[B, N, V], caches)``; with a mesh, logits split over "data" and the
      caches placed as `kvq_jax.sharding.shard_cache` places them.
    """
    prompts, lens = _as_prompts(tokens, prompt_lengths)
    padded = _pad_to_bucket(prompts, lens, bucket)
    targets = np.asarray(targets, np.int32)
    if targets.ndim == 1:
        targets = targets[None]
    B, Tb = padded.shape
    N = targets.shape[1]
    if targets.shape[0] != B or N < 1:
        raise ValueError(f"targets: expected int[{B}, N >= 1], got {list(targets.shape)}")
    L, Hkv, D = _model_dims(model)
    max_len = Tb + N if max_len is None else int(max_len)
    graphdef, state = nnx.split(model)
    if mesh is None:
        caches = init_caches(resolve_policy(kv, L), B, max_len, Hkv, D)
        args = (jnp.asarray(padded), jnp.asarray(lens), jnp.asarray(targets))
    else:
        _sharding.check_mesh(mesh, "mesh")
        _sharding.check_batch(B, mesh, "tokens")
        caches = _sharding.init_caches(resolve_policy(kv, L), B, max_len, Hkv, D, mesh=mesh)
        state = _sharding.shard_state(model, mesh)
        args = (_sharding.global_array(padded, mesh, P(_sharding.DATA, None)),
                _sharding.global_array(lens, mesh, P(_sharding.DATA)),
                _sharding.global_array(targets, mesh, P(_sharding.DATA, None)))
    return _teacher_force_jit(graphdef, state, caches, *args, impl=impl, scan_layers=scan_layers_default(scan_layers),
                              mesh=mesh)


__all__ = ["GREEDY", "GenerateOutput", "Sampler", "bucket_length", "generate", "scan_layers_default", "teacher_force",
           "trace_count"]
