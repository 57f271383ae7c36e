"""The engine's C++ CPU kernels: built once per machine with the system compiler, cached on disk.

Lifecycle: the first engine that needs a kernel library (`load()`) compiles its sources with
`c++` against the installed torch's headers into `<cache_dir>/kernels/<name>-<hash>.so`, under a
file lock (tp/dp ranks starting together build it once), then every process loads it with
`torch.ops.load_library`, which registers its ops (`torch.ops.pdserve.*`, declared with
`TORCH_LIBRARY` so torch.compile sees them as ordinary ops). The hash covers the source, the
compiler flags, the compiler's version and torch's version: a changed source, or an upgraded
torch, builds a new file; anything else loads the cached one in milliseconds. `make setup`
builds it ahead (`python -m pdserve.engine.kernels`), so a server's start-up does not pay the
~30 s compile.

Code is generated for AVX2 + FMA when the CPU has them (not -march=native: AVX-512 brings
nothing to these memory-bound loops, and one instruction set keeps timings comparable across
machines of this kind), else for the compiler's baseline. Where there is no compiler, or the
build fails, `load()` returns False after one log line and the engine keeps its torch-only
path (engine/attention.py's gather + SDPA).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path

import torch

from pdserve.model.bundled import cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "paged_attention.cpp"
COMPILER_ENV = "CXX"


def _cpu_flags() -> list[str]:
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def _command(compiler: str, source: Path, target: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", *_cpu_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", str(target), *libs,
            "-lc10", "-ltorch_cpu"]


def _library_path(compiler: str, source: Path) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(_cpu_flags()).encode(), version.encode(), torch.__version__.encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if target.exists():
            return
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        t0 = time.perf_counter()
        done = subprocess.run(_command(compiler, source, tmp), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
        log.info("built %s in %.1f s", target.name, time.perf_counter() - t0)


@cache
def load() -> bool:
    """Register `torch.ops.pdserve.*` (building the library first if needed); False where it
    cannot be built or loaded (the caller keeps its torch-only path)."""
    return load_with(os.environ.get(COMPILER_ENV) or shutil.which("c++") or shutil.which("g++"))


def load_with(compiler: str | None) -> bool:
    if compiler is None:
        log.warning("no C++ compiler: paged attention falls back to gathering the KV (torch only)")
        return False
    try:
        target = _library_path(compiler, SOURCE)
        if not target.exists():
            _build(compiler, SOURCE, target)
        torch.ops.load_library(str(target))
    except Exception as e:  # noqa: BLE001 -- any failure to build or load means the torch-only path, never a crash
        log.warning("C++ kernels unavailable (%s): paged attention falls back to gathering the KV", e)
        return False
    return True

