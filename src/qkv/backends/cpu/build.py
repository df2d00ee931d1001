"""Compile the CPU kernel once, on first use, and load it; or say why it cannot be had.

The C++ source (``kernel.cpp`` beside this file) is built with
:func:`torch.utils.cpp_extension.load` and kept in a cache shared by every environment of the
machine: ``qkv_cpu/<name>.so`` under torch's extension folder (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). The name (:func:`extension_name`) hashes exactly what the
library depends on: the source, the compiler flags and compiler, the torch version and C++ ABI,
and the CPU's instruction-set flags (``-march=native`` code is only ever loaded on a CPU with the
same instruction sets; editing the source makes a new name). It leaves out where the environment
lives: two virtualenvs with the same torch load one build, where torch's own cache rebuilt it
whenever the other one had used it (its ``build.ninja`` names the environment's include folders).

The cache is safe for concurrent processes:

- a build goes into a fresh temporary folder beside the cache and its library is renamed into
  place (atomic on one file system), so a process never loads a half-written or rewritten file;
- builders take a file lock (``<name>.lock``) and look again once they hold it, so two processes
  that start together build once: the second waits, then loads the first one's library;
- a process that finds the library loads it without taking the lock (about a tenth of a second).

``QKV_CPU_KERNEL=0`` in the environment turns the kernel off (the backend then refuses every call
and ``auto`` uses the chunked backend).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "KernelStatus",
    "cache_folder",
    "extension_name",
    "kernel_status",
    "library_path",
    "load_kernel",
]

SOURCE = Path(__file__).with_name("kernel.cpp")
#: -O3 and the host's instruction sets let the compiler vectorise the exp and row loops; the
#: cache name includes the CPU flags, so a build never runs on a CPU it was not made for.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


@dataclass(frozen=True)
class KernelStatus:
    """The outcome of building or loading the kernel.

    Attributes:
        ok: True when ``torch.ops.qkv_cpu`` is loaded.
        reason: why not, in words a user can act on (None when ``ok``).
        seconds: time spent building or loading it in this process.
        built: True when this process compiled it (False: loaded from the cache, or failed).
    """

    ok: bool
    reason: str | None
    seconds: float
    built: bool


_lock = threading.Lock()
_status: KernelStatus | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    """``qkv_cpu_<hash>``: the hash covers the source, flags, compiler, torch version and C++ ABI
    and the CPU flags; not the environment's path, so environments with one torch share a build."""
    digest = hashlib.sha256()
    parts = (
        SOURCE.read_bytes(),
        " ".join(CFLAGS).encode(),
        os.environ.get("CXX", "c++").encode(),
        torch.__version__.encode(),
        str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")).encode(),
    )
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    digest.update(_cpu_flags().encode())
    return f"qkv_cpu_{digest.hexdigest()[:16]}"


def cache_folder() -> Path:
    """Where the built libraries live: ``qkv_cpu/`` under torch's extension folder."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "qkv_cpu"


def library_path(name: str | None = None) -> Path:
    """The cached library of the kernel ``name`` (default :func:`extension_name`)."""
    name = extension_name() if name is None else name
    return cache_folder() / f"{name}.so"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (released when the process dies)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the rename still keeps the cache whole
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _compile(name: str, folder: Path) -> Path:
    """Build the kernel into ``folder`` (a fresh temporary one) and load it; return the library.

    ``cpp_extension.load`` compiles, links and loads ``folder/<name>.so`` (registering
    ``torch.ops.qkv_cpu``); the caller renames it into the cache.
    """
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    return folder / f"{name}.so"


def _load_or_build(name: str) -> bool:
    """Load the cached library ``name``, building it first (once across processes) if needed.

    Returns True when this process built it. Raises whatever the build or the load raises.
    """
    target = library_path(name)
    if target.is_file():
        torch.ops.load_library(str(target))
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_suffix(".lock")):
        if target.is_file():  # another process built it while this one waited for the lock
            torch.ops.load_library(str(target))
            return False
        for stale in target.parent.glob(f".{name}.build-*"):  # failed or killed builds
            shutil.rmtree(stale, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=target.parent))
        try:
            built = _compile(name, folder)
            os.chmod(built, 0o755)
            os.replace(built, target)
        except Exception as error:
            raise BuildError(folder) from error  # its folder keeps the build log
        shutil.rmtree(folder, ignore_errors=True)
        return True


class BuildError(Exception):
    """The compiler or linker failed; the build folder is kept for its log."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self.folder = folder


def _missing_tool() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler found (looked for {compiler!r} and 'g++' on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja), which torch needs to build extensions"
    return None


def _build() -> KernelStatus:
    start = time.perf_counter()
    if os.environ.get("QKV_CPU_KERNEL", "1") == "0":
        return KernelStatus(False, "the CPU kernel is turned off (QKV_CPU_KERNEL=0)", 0.0, False)
    name = extension_name()
    if not library_path(name).is_file() and (missing := _missing_tool()) is not None:
        return KernelStatus(False, f"the CPU kernel cannot be built: {missing}", 0.0, False)
    try:
        built = _load_or_build(name)
        torch.ops.qkv_cpu.forward  # noqa: B018 - raises if the library did not register
    except Exception as error:  # a failed build must never break a call: auto falls back
        where = error.folder if isinstance(error, BuildError) else library_path(name)
        cause = error.__cause__ if isinstance(error, BuildError) and error.__cause__ else error
        lines = str(cause).strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()]
        detail = (errors or lines or [type(cause).__name__])[0]
        return KernelStatus(
            False,
            f"the CPU kernel failed to build ({detail[:200]}); see {where}",
            time.perf_counter() - start,
            False,
        )
    return KernelStatus(True, None, time.perf_counter() - start, built)


def kernel_status() -> KernelStatus:
    """Build or load the kernel on the first call (thread-safe); later calls return the outcome."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _build()
    return _status


def load_kernel() -> object:
    """``torch.ops.qkv_cpu``, building it first if needed. Raises RuntimeError with the reason."""
    status = kernel_status()
    if not status.ok:
        raise RuntimeError(status.reason)
    return torch.ops.qkv_cpu
