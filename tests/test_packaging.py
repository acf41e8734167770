"""A non-editable install (the wheel, into a fresh venv) ships kvq_jax.kernels."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(out), str(ROOT)], check=True)
    (whl,) = out.glob("kvq_jax-*.whl")
    return whl


def test_wheel_maps_kernels_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvq_jax/kernels/decode.py" in names
    assert "kvq_jax/kernels/_compat.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a bare top-level 'kernels' must not ship"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "kvq-jax = kvq_jax.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_wheel_in_a_fresh_venv_imports_the_kernels(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True)
    # dependencies (jax, ...) come from this environment, after the wheel's own files
    pathlib.Path(site, "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import kvq_jax, kvq_jax.kernels.decode as d; print(d.__file__); "
            "print(kvq_jax.KVSpec.parse('int4-kivi'))")
    res = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    path, spec = res.stdout.split()
    assert path.startswith(site), f"imported from {path}, not from the installed wheel"
    assert spec == "int4-kivi"
