"""Data-parallel serving: one `Engine` per device, each with its own copy of the weights.

For a model that fits one device this scales decode throughput with the device count
without tensor parallelism's per-step collectives (BENCHMARKS.md, run J: the decode steps of
two engines on two H200s ran at 0.98 of one engine's tokens/s each, tensor parallel over the
same two at 0.75-0.83).
A request runs entirely on one replica; the engines run their loops concurrently, one host
thread each (JAX releases the GIL while a device works).

    replicas = kvq.serve.ReplicatedEngine(model, kv="int8", max_batch=16, page_size=64)
    rids = [replicas.submit(p, max_new_tokens=128) for p in prompts]
    out = replicas.run()          # {request id: [generated ids]}
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
from flax import nnx

from kvq_jax.serve.engine import Engine


def _placed(model, device):
    """``model`` with its weights on ``device``: the model itself when they already are, else a copy."""
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    if leaves and all(leaf.devices() == {device} for leaf in leaves):
        return model
    return nnx.merge(graphdef, jax.device_put(state, device))


class ReplicatedEngine:
    """One `Engine` per device, each serving its share of the requests.

    Args:
      model: a `kvq_jax.models.LlamaModel`; each replica gets a copy of its weights on its
        device (the model itself serves the device that already holds all its weights).
      devices: the devices, one engine each; default ``jax.local_devices()``.
      **engine_kw: `Engine` arguments (kv, max_batch, page_size, num_pages, max_len, ...),
        the same for every replica (``max_batch`` and ``num_pages`` are per replica).
        ``mesh`` is not accepted: each replica runs on one device.

    A request goes to the replica with the fewest outstanding tokens (`Engine.pending_tokens`;
    ties to the first). Request ids are this object's own. Greedy requests give the tokens a
    single `Engine` gives; a sampled request's random stream follows its replica's request
    count, so it depends on where it ran (reproducible for the same submissions).

    Attributes:
      engines: the replicas, in ``devices`` order.
      devices: their devices.
    """

    def __init__(self, model, devices=None, **engine_kw):
        if "mesh" in engine_kw:
            raise ValueError("mesh: a ReplicatedEngine runs one engine per device; pass devices= "
                             "(for tensor parallelism use Engine(mesh=...))")
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise ValueError(f"devices: expected a non-empty list of jax devices, got {devices!r}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices: each device at most once, got {devices!r}")
        self.devices = devices
        self.engines = []
        for d in devices:
            with jax.default_device(d):  # pools, keys and per-step inputs on d
                self.engines.append(Engine(_placed(model, d), **engine_kw))
        self._where: dict[int, tuple[int, int]] = {}  # request id -> (replica, its id there)
        self._next_id = 0

    # -- requests ------------------------------------------------------------------
    def submit(self, token_ids, max_new_tokens: int, sampler=None) -> int:
        """Queue a request on the least loaded replica (`Engine.submit`'s arguments and errors); returns its id."""
        i = min(range(len(self.engines)), key=lambda j: self.engines[j].pending_tokens)
        local = self.engines[i].submit(token_ids, max_new_tokens, sampler)
        rid = self._next_id
        self._next_id += 1
        self._where[rid] = (i, local)
        return rid

    def cancel(self, rid: int) -> list[int]:
        """Drop a queued or running request (`Engine.cancel`); returns the tokens it had generated."""
        if rid not in self._where:
            raise ValueError(f"rid: no queued or running request {rid!r}")
        i, local = self._where[rid]
        out = self.engines[i].cancel(local)
        del self._where[rid]
        return out

    def replica_of(self, rid: int) -> int:
        """The index (in `engines`) of the replica serving request ``rid``."""
        if rid not in self._where:
            raise ValueError(f"rid: no queued or running request {rid!r}")
        return self._where[rid][0]

    def run(self, max_steps: int | None = None) -> dict[int, list[int]]:
        """Run every replica until its requests are done (or ``max_steps`` iterations each),
        concurrently, one thread per replica.

        Returns:
          ``{request id: generated ids}`` of the requests that finished in this call.
        """
        def one(i):
            with jax.default_device(self.devices[i]):
                return self.engines[i].run(max_steps)

        with ThreadPoolExecutor(len(self.engines)) as pool:
            done = list(pool.map(one, range(len(self.engines))))  # re-raises a replica's error
        local_to_global = {where: rid for rid, where in self._where.items()}
        out = {}
        for i, finished in enumerate(done):
            for local, toks in finished.items():
                rid = local_to_global[(i, local)]
                out[rid] = toks
                del self._where[rid]
        return out

    # -- state ---------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return sum(e.num_active for e in self.engines)

    @property
    def num_queued(self) -> int:
        return sum(e.num_queued for e in self.engines)

    @property
    def pending_tokens(self) -> int:
        return sum(e.pending_tokens for e in self.engines)

    @property
    def kv_bytes(self) -> int:
        """Bytes of all replicas' caches."""
        return sum(e.kv_bytes for e in self.engines)

    @property
    def stats(self) -> dict[str, int]:
        """The replicas' `Engine.stats`, summed."""
        out: dict[str, int] = {}
        for e in self.engines:
            for k, v in e.stats.items():
                out[k] = out.get(k, 0) + v
        return out
