"""kvq.sharding: caches, attention, weights and generate on a mesh of 8 CPU devices.

The multi-device checks live in tests/sharding_checks.py and run in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before jax
starts; this process has one device). Two subprocesses run at once, each a share of the
checks, once per test run (also under pytest-xdist); every check is then reported here as
its own test. The tests below the subprocess ones run in this process on its single device.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import kvq_jax as kvq
from kvq_jax import sharding as ks

SCRIPT = pathlib.Path(__file__).with_name("sharding_checks.py")
CHECKS = re.findall(r"^def (check_\w+)\(", SCRIPT.read_text(), re.M)
# Checks sharing state (sharding_checks._first_turn) stay in one process; the groups
# are balanced by compile time.
SECOND = ("check_generate", "check_engine_tensor_parallel")  # ~70 s of ~140 s on 2 cores
GROUPS = ([c for c in CHECKS if not c.startswith(SECOND)], [c for c in CHECKS if c.startswith(SECOND)])
TIMEOUT_S = 600
# `--dist loadgroup` keeps this module in one worker (the test extra pins pytest below 9.2:
# with 9.2 xdist's grouping silently does not happen, pytest-xdist issue #1386); should it not,
# the fixture below also makes the workers of one run share a single run of the checks.
pytestmark = pytest.mark.xdist_group("sharding")


def _run_checks(tmp: pathlib.Path) -> dict:
    """Run the check script's groups in parallel subprocesses; ``{check: "ok" | traceback}``."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for i, group in enumerate(GROUPS):
        out = tmp / f"group{i}.json"
        log = open(tmp / f"group{i}.log", "w+")
        procs.append((out, log, subprocess.Popen([sys.executable, str(SCRIPT), str(out), *group], env=env,
                                                 stdout=log, stderr=subprocess.STDOUT)))
    merged = {}
    for out, log, proc in procs:
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        if not out.exists():
            pytest.fail(f"{SCRIPT.name} exited {proc.returncode} without results:\n{text[-5000:]}")
        got = json.loads(out.read_text())
        if proc.returncode != (0 if all(v == "ok" for v in got.values()) else 1):
            pytest.fail(f"{SCRIPT.name} exit status {proc.returncode} disagrees with its results:\n{text[-5000:]}")
        merged.update(got)
        print(text)
    return merged


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """The checks' results, computed once per test run: under pytest-xdist the first worker
    to ask runs them while holding a lock in the run's shared temporary folder and leaves
    them there for the others."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _run_checks(tmp_path_factory.mktemp("sharding"))
    shared = tmp_path_factory.getbasetemp().parent  # one folder per run, shared by its workers
    done = shared / "sharding-results.json"
    with open(shared / "sharding.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            done.write_text(json.dumps(_run_checks(shared / "sharding")))
        return json.loads(done.read_text())


def test_every_check_ran(results):
    assert sorted(results) == sorted(CHECKS)
    assert len(CHECKS) >= 10


@pytest.mark.parametrize("name", CHECKS)
def test_multi_device(results, name):
    if results.get(name) != "ok":
        pytest.fail(f"{name} failed in {SCRIPT.name}:\n{results.get(name, 'not run')}")


# ----------------------------------------------------------------------------- this process (1 device)


def test_package_exports_sharding():
    assert kvq.sharding is ks
    for name in ("make_mesh", "shard_cache", "cache_sharding", "shard_params", "shard_attend", "shard_append"):
        assert callable(getattr(kvq.sharding, name))


def test_one_device_mesh_and_argument_errors():
    mesh = ks.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match=r"^data, model: a 2 x 1 mesh needs 2 devices"):
        ks.make_mesh(2, 1)
    with pytest.raises(ValueError, match="^mesh: the mesh has axes"):
        ks.check_mesh(jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,)))
    with pytest.raises(ValueError, match="^mesh: expected a jax.sharding.Mesh"):
        ks.cache_sharding(kvq.init_cache("int8", 1, 16, 1, 32), mesh=None)
    with pytest.raises(ValueError, match="^mesh: expected a jax.sharding.Mesh"):
        ks.shard_attend(jnp.zeros((1, 1, 2, 32)), kvq.init_cache("int8", 1, 16, 1, 32), mesh="mesh")


def test_without_a_mesh_shard_functions_are_the_plain_ones(monkeypatch):
    """No mesh argument and no `use_mesh` context: kvq.append / kvq.attend themselves, same arguments."""
    from kvq_jax import attention, cache

    calls = []
    monkeypatch.setattr(cache, "append", lambda *a, **k: calls.append(("append", a, k)) or "appended")
    monkeypatch.setattr(attention, "attend", lambda *a, **k: calls.append(("attend", a, k)) or "attended")
    assert ks.current_mesh() is None
    assert ks.shard_append("c", "k", "v", lengths="n", impl="xla") == "appended"
    assert ks.shard_attend("q", "c", impl="xla", scale=0.5) == "attended"
    assert calls == [("append", ("c", "k", "v"), {"lengths": "n", "impl": "xla", "interpret": None}),
                     ("attend", ("q", "c"), {"impl": "xla", "interpret": None, "scale": 0.5, "precise": False,
                                             "config": None})]


def test_use_mesh_context_is_scoped():
    mesh = ks.make_mesh()
    with ks.use_mesh(mesh):
        assert ks.current_mesh() is mesh
        with ks.use_mesh(None):
            assert ks.current_mesh() is None
        assert ks.current_mesh() is mesh
    assert ks.current_mesh() is None
    with pytest.raises(ValueError, match="^mesh:"):
        with ks.use_mesh("not a mesh"):
            pass
