"""Compile a kernel's C++ source for this machine and register its FFI handlers with JAX.

The library is built once per (source, compiler flags, jaxlib headers, CPU) into `build_dir` and reused;
`-march=native` is what lets a kernel use the CPU's vector extensions (AVX-512 VNNI, ...), so a library is
never shared between machines of different CPUs. A missing compiler or a failed build raises
`KernelUnavailable` with the compiler's message: callers decide, visibly, what to do without the kernel.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

_HERE = Path(__file__).resolve().parent
# -fopenmp-simd: `#pragma omp simd reduction` vectorizes float sums without -ffast-math (no OpenMP runtime).
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded on this machine (the message says why)."""


def cpu_identity() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        wanted = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor() or platform.machine()


def library_path(source: str, build_dir: Path) -> Path:
    src = _HERE / source
    h = hashlib.sha256()
    headers = [path.read_bytes() for path in sorted(_HERE.glob("*.h"))]  # this package's own, e.g. parallel_for.h
    for part in (src.read_bytes(), *headers, " ".join(CXX_FLAGS).encode(), jax.ffi.include_dir().encode(),
                 jax.__version__.encode(), cpu_identity().encode()):
        h.update(part)
    return Path(build_dir) / f"{src.stem}-{h.hexdigest()[:16]}.so"


# Loaded libraries by file name (a hash of source, flags, headers and CPU): XLA's FFI registry is per process
# and refuses a second handler address for a target, so a library built again elsewhere (another build_dir)
# is not loaded twice; the first copy has the same code.
_LOADED: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def load(source: str, build_dir: Path, handlers: tuple[tuple[str, str], ...]) -> ctypes.CDLL:
    """Build `source` (a .cc file in this package) if needed, load it, and register each (ffi target name,
    exported symbol) in `handlers` for the CPU platform (once per process)."""
    path = library_path(source, build_dir)
    with _LOCK:
        if path.name in _LOADED:
            return _LOADED[path.name]
        if not path.exists():
            _build(source, path)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError as e:
            raise KernelUnavailable(f"loading {path} failed: {e}") from e
        for target, symbol in handlers:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _LOADED[path.name] = lib
        return lib


def _build(source: str, path: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelUnavailable(f"no C++ compiler (g++, c++ or $CXX) to build {source}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: concurrent starts never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [compiler, *CXX_FLAGS, "-I", jax.ffi.include_dir(), "-I", str(_HERE), str(_HERE / source), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"building {source} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
