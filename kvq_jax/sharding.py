"""Multiple devices: shard KV caches, attention and a model's weights over a device mesh.

    mesh = kvq.sharding.make_mesh(data=2, model=4)          # axes ("data", "model")
    caches = kvq.sharding.shard_cache(caches, mesh)         # batch over "data", KV heads over "model"
    out = kvq.sharding.shard_attend(q, cache, mesh=mesh)    # the kernel runs per shard (shard_map)
    out = kvq.generate(model, tokens, 64, kv="int8", mesh=mesh)

Layout on a `jax.sharding.Mesh` with axes ``("data", "model")`` (other axes, if any,
are replicated over):

* Cache leaves ``[B, Hkv, S, X]`` (body, scales, zero points, residual window, sinks)
  are ``P("data", "model", None, None)``; ``lengths`` and ``overflow`` ``[B]`` are
  ``P("data")``. Each device holds its sequences' slice of its KV heads; nothing is
  ever gathered: `shard_append` and `shard_attend` run `kvq.append` / `kvq.attend`
  (the Pallas kernel included) on the local shard through ``jax.shard_map``.
* KV heads are sharded only when Hkv is a multiple of the "model" axis size M.
  Otherwise (in particular Hkv < M, e.g. 2 KV heads on 8 devices) the KV heads are
  *replicated* across "model": every device of a "model" group stores all Hkv heads of
  its sequences and appends them redundantly, and attends with its own query heads:
  when Hq is a multiple of M and M a multiple of Hkv, the query heads stay sharded and
  each device reads (a copy of) the one KV head its query heads belong to; otherwise
  every device computes all heads. Serving engines that copy each KV head onto M / Hkv
  devices store one head per device; this layout stores Hkv per device, and keeps the
  cache's logical shape ``[B, Hkv, ...]`` so the same caches work with and without a mesh.
  Caches whose spec carries per-head calibrated constants (``spec.static``) always
  keep all KV heads per device: the constants are indexed by global head.
* A paged cache (`kvq_jax.serve.PagedKVCache`): pool leaves ``[num_pages, Hkv, page, X]``
  (the value pool ``[num_pages, Hkv, X, page]``) are ``P("data", "model", None, None)``: each "data" shard owns ``num_pages / data``
  contiguous pages, and the page tables (``P("data", None)``) of its sequences hold page
  numbers *local* to that range (0 .. num_pages / data - 1), so a shard reads and writes
  only its own pages. Windows ``[B, Hkv, R, D]`` and ``lengths`` as for KVCache.
  `shard_append` / `shard_attend` run `append_paged` / `attend_paged` per shard, and
  `shard_attend_chunk` (a prefill chunk over the cache before it) `attend_chunk_paged`.
* Weights (`param_partition_specs`), Megatron style: q/k/v and gate/up projections
  column-parallel (output features over "model"), o and down projections
  row-parallel (input features over "model"), the embedding split over its
  vocabulary, an untied lm_head column-parallel; norms replicated. A projection whose
  heads (or features) do not divide by M stays replicated, so k/v projections follow
  the KV-head rule above.

Queries ``[B, T, Hq, D]`` are ``P("data", None, "model", None)`` when query heads are
sharded. The batch B must be a multiple of the "data" axis size.

Multi-host: call ``jax.distributed.initialize()`` in every process before anything
else touches jax, then build the mesh from the global device list (`make_mesh` uses
``jax.devices()``, every process's devices) and run the same program in every process.
Only global-mesh APIs are used: host inputs become global arrays through
``jax.device_put`` with a global ``NamedSharding`` (numpy values; every process must
pass the same prompts) or ``jax.make_array_from_callback`` (weights held as jax arrays
by each process); results are global arrays: read a "data"-sharded one on every host
with ``jax.experimental.multihost_utils.process_allgather`` (or `to_host`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvq_jax import attention as _attention
from kvq_jax import cache as _cache
from kvq_jax.cache import KVCache

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


# ----------------------------------------------------------------------------- meshes


def make_mesh(data: int | None = None, model: int | None = None, devices=None) -> Mesh:
    """A ``(data, model)`` device mesh with axes ``("data", "model")``.

    Args:
      data: size of the "data" axis (the batch is split over it).
      model: size of the "model" axis (KV heads and weights are split over it).
        Neither given: ``data = 1`` and ``model`` = all devices (tensor parallel).
        One given: the other is ``len(devices) // given`` (it must divide exactly).
        Both given: the first ``data * model`` devices are used.
      devices: the devices to use (default ``jax.devices()``: every device of every
        process, so the mesh is global under ``jax.distributed``).

    Returns:
      a ``jax.sharding.Mesh`` of shape ``(data, model)`` with ``AxisType.Auto`` axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("devices: no devices given")
    for name, val in (("data", data), ("model", model)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {val!r}")
    if data is None and model is None:
        data, model = 1, n
    elif data is None:
        if n % model:
            raise ValueError(f"model: {model} does not divide the {n} devices; give data too")
        data = n // model
    elif model is None:
        if n % data:
            raise ValueError(f"data: {data} does not divide the {n} devices; give model too")
        model = n // data
    data, model = int(data), int(model)
    if data * model > n:
        raise ValueError(f"data, model: a {data} x {model} mesh needs {data * model} devices, only {n} given")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def check_mesh(mesh, name: str = "mesh") -> Mesh:
    """Validate that ``mesh`` is a ``jax.sharding.Mesh`` with "data" and "model" axes of Auto type.

    Raises ValueError naming the argument ``name`` otherwise. Returns ``mesh``.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{name}: expected a jax.sharding.Mesh with axes {AXES} "
                         f"(kvq.sharding.make_mesh), got {type(mesh).__name__}")
    missing = [a for a in AXES if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"{name}: the mesh has axes {tuple(mesh.axis_names)}, it needs {AXES} "
                         f"(missing {tuple(missing)}); build it with kvq.sharding.make_mesh")
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    explicit = [a for a in AXES if types.get(a, AxisType.Auto) != AxisType.Auto]
    if explicit:
        raise ValueError(f"{name}: axes {tuple(explicit)} are {[str(types[a]) for a in explicit]}; kvq shards "
                         "with AxisType.Auto axes (kvq.sharding.make_mesh, or jax.make_mesh(..., "
                         "axis_types=(AxisType.Auto,) * 2))")
    return mesh


def _size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis])


def check_batch(batch: int, mesh: Mesh, name: str) -> None:
    """ValueError naming ``name`` unless ``batch`` is a multiple of the mesh's "data" axis size."""
    d = _size(mesh, DATA)
    if batch % d:
        raise ValueError(f"{name}: batch {batch} is not divisible by the mesh's 'data' axis of size {d}")


def kv_heads_sharded(num_kv_heads: int, mesh: Mesh) -> bool:
    """True when ``num_kv_heads`` KV heads are split over the "model" axis (a multiple of
    its size); False when they are replicated across it."""
    return num_kv_heads % _size(mesh, MODEL) == 0


def _per_head_constants(cache) -> bool:
    """True when the cache's spec carries constants indexed by global KV head (calibrated
    static scales): a device holding a slice of the heads could not index them, so such
    caches keep all KV heads on every device of a "model" group."""
    return getattr(getattr(cache, "spec", None), "static", None) is not None


def _split_heads(cache, mesh: Mesh) -> bool:
    """Whether this cache's KV heads are split over "model" (see the module docstring)."""
    return kv_heads_sharded(_layout(cache, "cache").num_kv_heads(cache), mesh) and not _per_head_constants(cache)


def _head_mode(num_heads: int, cache, mesh: Mesh) -> str:
    """How attention splits over "model": "sharded" (KV and query heads split), "select" (KV
    heads replicated, query heads split: each device reads the one KV head of its query
    heads) or "replicated" (every device computes every head)."""
    M = _size(mesh, MODEL)
    if _split_heads(cache, mesh):
        return "sharded"
    kvh = cache.num_kv_heads
    if num_heads % M == 0 and M % kvh == 0 and not _per_head_constants(cache):
        return "select"
    return "replicated"


# ----------------------------------------------------------------------------- cache layouts


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where batch and KV heads live in the leaves of one cache type.

    ``specs(cache, heads, lead)`` returns the cache's pytree with a PartitionSpec per
    leaf, given the head axis entry (``"model"`` or None) and ``lead`` leading stacked
    axes (layers under ``lax.scan``); ``batch(cache)`` / ``num_kv_heads(cache)`` read
    sizes; ``lead(cache)`` counts stacked axes. Leaves holding KV heads carry them on
    axis ``lead + 1`` (`_select_head` relies on that).
    """

    specs: object
    batch: object
    num_kv_heads: object
    lead: object
    attend: object = None  # attend(q, cache, **kw) of this cache type (default kvq.attend)
    append: object = None  # append(cache, k, v, lengths=) (default kvq.append)
    attend_chunk: object = None  # attend_chunk(q, k, v, cache, **kw) (default kvq.attention.attend_chunk)
    check: object = None  # check(cache, mesh, name): extra argument errors


def register_layout(cache_type: type, layout: CacheLayout) -> None:
    """Teach `shard_cache`, `shard_append` and `shard_attend` another cache pytree type."""
    _LAYOUTS[cache_type] = layout


def _kv_lead(c: KVCache) -> int:
    return c.lengths.ndim - 1


def leaf_specs(c, heads, lead: int):
    """PartitionSpec per leaf by rank: ``[.., X, Hkv, S, Y]`` leaves ``(data, heads)``,
    ``[.., B, N]`` ``(data, None)``, ``[.., B]`` ``(data)``; ``lead`` stacked axes in front."""
    pre = (None,) * lead

    def spec(x):
        if x.ndim == lead + 4:
            return P(*pre, DATA, heads, None, None)
        if x.ndim == lead + 2:  # a paged cache's page table [B, max_pages]
            return P(*pre, DATA, None)
        if x.ndim == lead + 1:
            return P(*pre, DATA)
        raise ValueError(f"cache: unexpected leaf of shape {x.shape} in a {type(c).__name__}")

    return jax.tree.map(spec, c)




_LAYOUTS: dict[type, CacheLayout] = {
    KVCache: CacheLayout(
        specs=leaf_specs,
        batch=lambda c: int(c.lengths.shape[-1]),
        num_kv_heads=lambda c: int(c.k.shape[_kv_lead(c) + 1]),
        lead=_kv_lead,
    ),
}  # kvq_jax.serve.paged registers PagedKVCache


def _layout(cache, name: str) -> CacheLayout:
    lay = _LAYOUTS.get(type(cache))
    if lay is None:
        known = ", ".join(t.__name__ for t in _LAYOUTS)
        raise TypeError(f"{name}: expected a cache ({known}) or a tuple/list of them, got {type(cache).__name__}")
    return lay


def _map_caches(fn, cache, name: str):
    """Apply ``fn(one_cache)`` to a cache or to each cache of a tuple/list (same container type)."""
    if isinstance(cache, (tuple, list)):
        if not cache:
            raise ValueError(f"{name}: an empty sequence of caches")
        return type(cache)(_map_caches(fn, c, f"{name}[{i}]") for i, c in enumerate(cache))
    _layout(cache, name)
    return fn(cache, name)


def cache_partition_specs(cache, mesh: Mesh):
    """PartitionSpecs of every leaf of a cache (or tuple/list of caches) on ``mesh``.

    Args:
      cache: a `KVCache` (concrete, or abstract from ``jax.eval_shape``; leaves may carry
        leading stacked axes, as `LlamaModel.scanned` stacks them), or a tuple/list of them.
      mesh: a mesh with axes ("data", "model").

    Returns:
      the same structure with a ``PartitionSpec`` per leaf: ``[B, Hkv, S, X]`` leaves
      ``P("data", "model" or None, None, None)`` (None: KV heads replicated, see the
      module docstring), ``lengths, overflow [B]`` ``P("data")``.
    """
    check_mesh(mesh)

    def one(c, name):
        lay = _layout(c, name)
        check_batch(lay.batch(c), mesh, name)
        if lay.check is not None:
            lay.check(c, mesh, name)
        heads = MODEL if _split_heads(c, mesh) else None
        return lay.specs(c, heads, lay.lead(c))

    return _map_caches(one, cache, "cache")


def cache_sharding(cache, mesh: Mesh):
    """``NamedSharding`` of every leaf of a cache (or tuple/list of caches): `cache_partition_specs` on ``mesh``."""
    specs = cache_partition_specs(cache, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _place(x, sharding: NamedSharding):
    """``x`` (a jax or numpy array) as a global array with ``sharding``; a no-op when it already is.

    ``jax.device_put`` (shards move device to device); in a multi-process run a
    process-local jax array goes through ``jax.make_array_from_callback`` instead (every
    process must hold the same value).
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if (jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
        # a process-local array (weights loaded by each process): the global array from its slices
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x[idx]))
    return jax.device_put(x, sharding)


def shard_cache(cache, mesh: Mesh):
    """Place a cache (or a tuple/list of caches) on ``mesh``: every leaf gets its `cache_sharding`.

    Args:
      cache: a `KVCache` or a tuple/list of them (e.g. one per layer); batch B a multiple
        of the "data" axis size.
      mesh: a mesh with axes ("data", "model").

    Returns:
      the same caches, leaves ``[B, Hkv, S, X]`` split over ("data", "model") (KV heads
      replicated when Hkv is not a multiple of the "model" size), ``[B]`` leaves over
      "data". Leaves already placed so are not copied.
    """
    shardings = cache_sharding(cache, mesh)
    return jax.tree.map(_place, cache, shardings)


def init_caches(policy, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, mesh: Mesh,
                dtype=jnp.bfloat16, num_layers: int | None = None) -> tuple[KVCache, ...]:
    """Empty caches, one per layer, created already sharded on ``mesh`` (never whole on one device).

    Arguments as `kvq.nn.init_caches` (``policy``: specs per layer, or a preset with
    ``num_layers``); ``batch`` must be a multiple of the "data" axis size.

    Returns:
      ``tuple[KVCache, ...]`` with the leaves placed as `shard_cache` places them.
    """
    from kvq_jax.nn import resolve_policy  # kvq_jax.nn imports this module

    check_mesh(mesh)
    check_batch(int(batch), mesh, "batch")
    if num_layers is None:
        if isinstance(policy, str) or not isinstance(policy, (list, tuple)):
            raise ValueError("num_layers: required when policy is a single spec or a mapping")
        num_layers = len(policy)
    specs = resolve_policy(policy, num_layers)
    return _init_sharded(specs, batch, max_len, num_kv_heads, head_dim, jnp.dtype(dtype), mesh=mesh)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("mesh",))
def _init_sharded(specs, batch, max_len, num_kv_heads, head_dim, dtype, *, mesh):
    from kvq_jax.nn import init_caches as _init

    return constrain_caches(_init(specs, batch, max_len, num_kv_heads, head_dim, dtype), mesh)


def constrain_caches(cache, mesh: Mesh):
    """Inside a jit: ``with_sharding_constraint`` of every cache leaf to its `cache_sharding`
    (per-layer or stacked caches)."""
    return jax.lax.with_sharding_constraint(cache, cache_sharding(cache, mesh))


# ----------------------------------------------------------------------------- weights


def _name(key) -> object:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _module_at(root, names):
    obj = root
    for n in names:
        try:
            obj = obj[n] if isinstance(n, int) else getattr(obj, n)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return obj


_COLUMN = {"gate", "up", "gate_proj", "up_proj", "w1", "w3"}
_ROW = {"down", "down_proj", "w2"}


def param_partition_specs(model, mesh: Mesh):
    """Megatron-style PartitionSpecs of a model's weights, chosen by parameter path.

    Rules (kernels are ``[in, out]``, M = the "model" axis size):

    * ``q_proj`` / ``k_proj`` / ``v_proj`` kernel ``[d, H * D]`` -> ``P(None, "model")``,
      bias ``[H * D]`` -> ``P("model")`` (column-parallel) when the layer's query heads
      (q) or KV heads (k, v) are a multiple of M; else replicated.
    * ``o_proj`` kernel ``[Hq * D, d]`` -> ``P("model", None)`` (row-parallel) when Hq
      is a multiple of M; its bias replicated.
    * MLP ``gate`` / ``up`` kernel ``[d, F]`` -> ``P(None, "model")``; ``down``
      ``[F, d]`` -> ``P("model", None)``, when F is a multiple of M.
    * ``embed.embedding`` ``[V, d]`` -> ``P("model", None)`` (vocabulary-parallel) and an
      untied ``lm_head`` kernel ``[d, V]`` -> ``P(None, "model")``, when V is a multiple of M.
    * everything else (norm scales, ...) replicated.

    Args:
      model: an nnx module (`kvq_jax.models.LlamaModel`, `kvq_jax.nn.QuantizedAttention`, ...).
      mesh: a mesh with axes ("data", "model").

    Returns:
      an ``nnx.State`` shaped like ``nnx.state(model)`` with a ``PartitionSpec`` per leaf.
    """
    from flax import nnx

    check_mesh(mesh)
    M = _size(mesh, MODEL)
    state = nnx.state(model)

    def spec(path, x):
        names = [_name(k) for k in path]
        if names and names[-1] == "value":  # nnx.Variable's value attribute
            names = names[:-1]
        if len(names) < 2 or np.ndim(x) == 0:
            return P()
        leaf, owner = names[-1], names[-2]
        shape = np.shape(x)
        col = P(*(None,) * (len(shape) - 1), MODEL)
        if owner in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn = _module_at(model, names[:-2])
            hq = getattr(attn, "num_heads", None)
            hkv = getattr(attn, "num_kv_heads", hq)
            heads = hq if owner in ("q_proj", "o_proj") else hkv
            if heads is None or heads % M:
                return P()
            if owner == "o_proj":
                return P(MODEL, None) if leaf == "kernel" and len(shape) == 2 else P()
            return col if leaf in ("kernel", "bias") else P()
        if owner in _COLUMN and leaf in ("kernel", "bias"):
            return col if shape[-1] % M == 0 else P()
        if owner in _ROW and leaf == "kernel" and len(shape) == 2:
            return P(MODEL, None) if shape[0] % M == 0 else P()
        if owner == "embed" and leaf == "embedding" and len(shape) == 2:
            return P(MODEL, None) if shape[0] % M == 0 else P()
        if owner == "lm_head" and leaf == "kernel" and len(shape) == 2:
            return P(None, MODEL) if shape[1] % M == 0 else P()
        return P()

    return jax.tree_util.tree_map_with_path(spec, state)


def param_sharding(model, mesh: Mesh):
    """``NamedSharding`` per weight: `param_partition_specs` on ``mesh`` (an ``nnx.State``)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(model, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_state(model, mesh: Mesh):
    """``nnx.state(model)`` placed with `param_sharding` (the model is not modified)."""
    from flax import nnx

    return jax.tree.map(_place, nnx.state(model), param_sharding(model, mesh))


def shard_params(model, mesh: Mesh):
    """Place a model's weights on ``mesh``, Megatron style (`param_partition_specs`), in place.

    Args:
      model: an nnx module, e.g. a `kvq_jax.models.LlamaModel`.
      mesh: a mesh with axes ("data", "model").

    Returns:
      ``model`` itself, its weights now global arrays split over "model" (column- and
      row-parallel projections, vocabulary-parallel embedding). `kvq.generate` with the
      same mesh then uses them as they are, without moving them again.
    """
    from flax import nnx

    nnx.update(model, shard_state(model, mesh))
    return model


# ----------------------------------------------------------------------------- per-shard append / attend


_MESH: contextvars.ContextVar = contextvars.ContextVar("kvq_sharding_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Within this context `shard_append` / `shard_attend` without a ``mesh`` argument (and
    so `kvq.nn.QuantizedAttention` and the models built on it) run per shard on ``mesh``.

    It must be active while a function is *traced*: include the mesh in the jit's static
    arguments (as `kvq.generate` does), so a trace without it is not reused. None: off.
    """
    if mesh is not None:
        check_mesh(mesh)
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the innermost active `use_mesh`, or None."""
    return _MESH.get()


def _select_head(cache, h, lead: int = 0):
    """The cache of KV head ``h`` only (a traced index): leaves with heads on axis ``lead + 1`` sliced to 1 head."""
    def f(x):
        if x.ndim >= lead + 4:
            return jax.lax.dynamic_slice_in_dim(x, h, 1, axis=lead + 1)
        return x

    return jax.tree.map(f, cache)


def _qkv_spec(mode: str) -> P:
    return P(DATA, None, MODEL, None) if mode != "replicated" else P(DATA, None, None, None)


def _local_shape(shape, spec: P, mesh: Mesh) -> tuple[int, ...]:
    """The per-device shape of a global ``shape`` split by ``spec`` on ``mesh``."""
    out = list(shape)
    for i, axes in enumerate(tuple(spec)):
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            out[i] //= _size(mesh, a)
    return tuple(out)


def _split_empty(cache, cspec, mesh: Mesh):
    """Keep a cache's zero-size leaves out of a ``shard_map``.

    Specs without sinks or a bf16 window hold ``[B, Hkv, 0, D]`` leaves. Passing such
    leaves through a manual computation crashed XLA's compiler (a segmentation fault in
    the Shardy import of jax 0.11.2 on 2 GPUs); they hold no data, so they never need to
    cross it. Returns ``(live, live_specs, local, merge, live_of)``: the non-empty leaves
    and their specs; ``local(live_shards)`` rebuilds a per-device cache inside the map
    (fresh empty leaves of the local shape); ``merge(live_out)`` rebuilds the global cache
    around the original empty leaves; ``live_of(cache)`` picks a cache's non-empty leaves.
    """
    leaves, treedef = jax.tree.flatten(cache)
    specs = jax.tree.leaves(cspec, is_leaf=lambda x: isinstance(x, P))
    keep = [x.size > 0 for x in leaves]

    def fill(live, empty):
        it = iter(live)
        return treedef.unflatten([next(it) if k else e for k, e in zip(keep, empty)])

    def local(live):
        return fill(live, [jnp.zeros(_local_shape(x.shape, s, mesh), x.dtype) for x, s in zip(leaves, specs)])

    def live_of(c):
        return [x for x, k in zip(jax.tree.leaves(c), keep) if k]

    return (live_of(cache), [s for s, k in zip(specs, keep) if k], local,
            lambda live: fill(live, leaves), live_of)


@partial(jax.jit, static_argnames=("mesh", "mode", "impl", "interpret", "scale", "precise", "config"))
def _attend_sharded(q, cache, *, mesh, mode, impl, interpret, scale, precise, config):
    qspec = _qkv_spec(mode)
    live, live_specs, local_cache, _, _ = _split_empty(cache, cache_partition_specs(cache, mesh), mesh)
    kvh = cache.num_kv_heads
    reps = _size(mesh, MODEL) // kvh if mode == "select" else 1

    def local(q, live):
        c = local_cache(live)
        if mode == "select":  # this device's query heads all read KV head axis_index // reps
            c = _select_head(c, jax.lax.axis_index(MODEL) // reps)
        return _layout_fn(c, "attend")(q, c, impl=impl, interpret=interpret, scale=scale, precise=precise,
                                       config=config)

    return jax.shard_map(local, mesh=mesh, in_specs=(qspec, live_specs), out_specs=qspec, check_vma=False)(q, live)


@partial(jax.jit, static_argnames=("mesh", "mode", "impl", "interpret"))
def _append_sharded(cache, k, v, lengths, *, mesh, mode, impl, interpret):
    kvspec = _qkv_spec(mode)
    live, live_specs, local_cache, merge, live_of = _split_empty(cache, cache_partition_specs(cache, mesh), mesh)
    lspec = None if lengths is None else P(DATA)

    def local(live, k, v, n):
        return live_of(_layout_fn(cache, "append")(local_cache(live), k, v, lengths=n, impl=impl, interpret=interpret))

    out = jax.shard_map(local, mesh=mesh, in_specs=(live_specs, kvspec, kvspec, lspec), out_specs=live_specs,
                        check_vma=False)(live, k, v, lengths)
    return merge(out)


@partial(jax.jit, static_argnames=("mesh", "mode", "scale", "block", "impl", "interpret"))
def _attend_chunk_sharded(q, k, v, cache, lengths, *, mesh, mode, scale, block, impl, interpret):
    qspec = _qkv_spec(mode)
    live, live_specs, local_cache, _, _ = _split_empty(cache, cache_partition_specs(cache, mesh), mesh)

    def local(q, k, v, live, n):
        c = local_cache(live)
        return _layout_fn(c, "attend_chunk")(q, k, v, c, lengths=n, scale=scale, block=block, impl=impl,
                                             interpret=interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=(qspec, qspec, qspec, live_specs, P(DATA)), out_specs=qspec,
                         check_vma=False)(q, k, v, live, lengths)


def _layout_fn(cache, name: str):
    """The cache type's registered ``attend`` / ``append`` / ``attend_chunk`` (`CacheLayout`),
    else the KVCache one (`kvq.attend`, `kvq.append`, `kvq.attention.attend_chunk`)."""
    fn = getattr(_LAYOUTS.get(type(cache)), name, None)
    if fn is not None:
        return fn
    return {"attend": _attention.attend, "append": _cache.append, "attend_chunk": _attention.attend_chunk}[name]


def _resolve(mesh):
    mesh = current_mesh() if mesh is None else mesh
    return None if mesh is None else check_mesh(mesh)


def _precheck_append(cache: KVCache, k, v, lengths):
    """`kvq.append`'s argument errors, raised here because inside shard_map the values are traced."""
    _cache._check_kv(cache, k, v)
    B, T = k.shape[:2]
    if lengths is None:
        t_valid = np.full((B,), T)
    else:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths: expected int[{B}], got {lengths.dtype}{list(lengths.shape)}")
        if _cache.is_traced(lengths):
            return
        t_valid = np.asarray(jax.device_get(lengths))
        if ((t_valid < 0) | (t_valid > T)).any():
            raise ValueError(f"lengths: expected values in [0, {T}], got {t_valid.tolist()}")
    if _cache.is_traced(cache.lengths) or _cache.is_traced(k) or _cache.is_traced(v):
        return
    n_old = np.asarray(jax.device_get(cache.lengths))
    over = n_old + t_valid > cache.max_len
    if over.any():
        bad = np.nonzero(over)[0].tolist()
        raise ValueError(f"k: appending {t_valid[bad].tolist()} tokens to sequences {bad} holding "
                         f"{n_old[bad].tolist()} exceeds max_len={cache.max_len}")
    if not (bool(jnp.all(jnp.isfinite(k))) and bool(jnp.all(jnp.isfinite(v)))):
        raise ValueError("k, v: contain NaN or Inf")


def shard_append(cache: KVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *,
                 mesh: Mesh | None = None, impl: str = "auto", interpret: bool | None = None) -> KVCache:
    """`kvq.append` run per shard: each device quantizes and stores its own sequences and KV heads.

    Args:
      cache: a KVCache (placed by `shard_cache`, or anywhere: it is moved to its sharding).
      k, v: ``Float[Array, "B T Hkv D"]`` new keys and values.
      lengths: optional ``int[B]`` real tokens per sequence (ragged), as in `kvq.append`.
      mesh: the mesh; default the `use_mesh` context's. Without either this is `kvq.append`.
      impl, interpret: how the quantized tokens are stored, as in `kvq.append`.

    Returns:
      the new KVCache with the same shardings (`cache_sharding`); same values as
      `kvq.append` on one device. Errors as `kvq.append` (``overflow`` flags under jit).
    """
    mesh = _resolve(mesh)
    if mesh is None:
        return _layout_fn(cache, "append")(cache, k, v, lengths=lengths, impl=impl, interpret=interpret)
    if isinstance(cache, KVCache):
        _precheck_append(cache, k, v, lengths)
    else:  # other cache types check the rest per shard (overflow flags under jit)
        _cache._check_kv(cache, k, v)
    cache_partition_specs(cache, mesh)  # argument errors name "cache"
    mode = "sharded" if _split_heads(cache, mesh) else "replicated"
    if lengths is not None:
        lengths = jnp.asarray(lengths).astype(jnp.int32)
    impl, interpret = _cache.write_impl(impl, interpret)
    return _append_sharded(cache, k, v, lengths, mesh=mesh, mode=mode, impl=impl, interpret=interpret)


def shard_attend(q: jax.Array, cache: KVCache, *, mesh: Mesh | None = None, impl: str = "auto",
                 interpret: bool | None = None, scale: float | None = None, precise: bool = False,
                 config=None) -> jax.Array:
    """`kvq.attend` run per shard through ``jax.shard_map``: the kernel sees only local sequences and heads.

    Args:
      q: ``Float[Array, "B T Hq D"]`` queries of the last T tokens of each sequence.
      cache: a KVCache, placed by `shard_cache` (B a multiple of the "data" axis size).
      mesh: the mesh; default the `use_mesh` context's. Without either this is `kvq.attend`.
      impl, interpret, scale, precise, config: as `kvq.attend` (the Pallas kernel runs on
        each device's ``[B / data, Hkv / model]`` slice of the cache).

    Returns:
      ``[B, T, Hq, D]`` in q's dtype, ``P("data", None, "model", None)`` (query heads
      over "model"; ``P("data", None, None, None)`` when they cannot be split, see the
      module docstring). Same values as `kvq.attend` on one device.
    """
    mesh = _resolve(mesh)
    if mesh is None:
        return _layout_fn(cache, "attend")(q, cache, impl=impl, interpret=interpret, scale=scale, precise=precise,
                                           config=config)
    impl = _attention.resolve_impl(impl)
    _attention._check_q(q, cache)
    cache_partition_specs(cache, mesh)  # argument errors name "cache"
    if impl == "pallas":
        interpret = _attention.resolve_interpret(interpret)
    mode = _head_mode(q.shape[2], cache, mesh)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attend_sharded(q, cache, mesh=mesh, mode=mode, impl=impl, interpret=interpret, scale=scale,
                           precise=bool(precise), config=config)


def shard_attend_chunk(q: jax.Array, k: jax.Array, v: jax.Array, cache, *, lengths=None, mesh: Mesh | None = None,
                       scale: float | None = None, block: int | None = 2048, impl: str = "auto",
                       interpret: bool | None = None) -> jax.Array:
    """`kvq.attention.attend_chunk` (a prefill chunk over the cache before it and over
    itself; the paged twin for a `kvq.serve.PagedKVCache`) run per shard.

    Args:
      q, k, v: ``[B, T, Hq, D]`` / ``[B, T, Hkv, D]`` the chunk's queries, keys, values.
      cache: the cache before the chunk, placed by `shard_cache`.
      lengths: optional ``int[B]`` real tokens of each row of the chunk (default T).
      mesh: the mesh; default the `use_mesh` context's. Without either this is the plain function.
      scale, block, impl, interpret: as `kvq.attention.attend_chunk`.

    Returns:
      ``[B, T, Hq, D]``: heads split over "model" when the cache's KV heads are
      (``P("data", None, "model", None)``), else every device computes every head.
    """
    mesh = _resolve(mesh)
    fn = _layout_fn(cache, "attend_chunk")
    if mesh is None:
        return fn(q, k, v, cache, lengths=lengths, scale=scale, block=block, impl=impl, interpret=interpret)
    _attention.check_chunk(q, k, v, cache)
    cache_partition_specs(cache, mesh)  # argument errors name "cache"
    B, T = q.shape[:2]
    mode = "sharded" if _split_heads(cache, mesh) else "replicated"
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths).astype(jnp.int32)
    impl = _attention.resolve_impl(impl)  # outside the map: the default backend decides "auto"
    return _attend_chunk_sharded(q, k, v, cache, n, mesh=mesh, mode=mode, scale=scale,
                                 block=None if block is None else int(block), impl=impl, interpret=interpret)


def to_host(x) -> np.ndarray:
    """The whole value of a (sharded, possibly multi-process) array as numpy, by an explicit transfer.

    Reads a copy, so ``x`` itself can still be donated afterwards.
    """
    x = jnp.copy(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_array(x, mesh: Mesh, spec: P):
    """A host value (numpy, or a jax array) as a global array on ``mesh`` with ``spec``
    (every process must pass the same value)."""
    return _place(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


__all__ = [
    "AXES", "DATA", "MODEL", "cache_partition_specs", "cache_sharding", "check_batch", "check_mesh",
    "constrain_caches", "current_mesh", "global_array", "init_caches", "kv_heads_sharded", "make_mesh",
    "param_partition_specs", "param_sharding", "replicated", "shard_append", "shard_attend", "shard_attend_chunk",
    "shard_cache", "shard_params", "shard_state", "to_host", "use_mesh",
]
