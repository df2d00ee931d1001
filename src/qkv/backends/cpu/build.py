"""Compile the CPU kernel once, on first use, and load it; or say why it cannot be had.

The C++ source (``kernel.cpp`` beside this file) is built with
:func:`torch.utils.cpp_extension.load` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) under a name that hashes the source, the compiler flags,
the torch version and the CPU's instruction-set flags: ``-march=native`` code is only ever loaded
on a CPU with the same instruction sets, and editing the source rebuilds it. Later processes load
the cached library (about a tenth of a second).

``QKV_CPU_KERNEL=0`` in the environment turns the kernel off (the backend then refuses every call
and ``auto`` uses the chunked backend).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["KernelStatus", "kernel_status", "load_kernel"]

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
    """``qkv_cpu_<hash>``: the hash covers the source, flags, torch version and CPU flags."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode()):
        digest.update(part)
    digest.update(_cpu_flags().encode())
    return f"qkv_cpu_{digest.hexdigest()[:16]}"


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
    if (missing := _missing_tool()) is not None:
        return KernelStatus(False, f"the CPU kernel cannot be built: {missing}", 0.0, False)
    from torch.utils import cpp_extension

    name = extension_name()
    root = Path(cpp_extension._get_build_directory(name, verbose=False))
    cached = any(root.glob(f"{name}*.so"))
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        torch.ops.qkv_cpu.forward  # noqa: B018 - raises if the library did not register
    except Exception as error:  # a failed build must never break a call: auto falls back
        lines = str(error).strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()]
        detail = (errors or lines or [type(error).__name__])[0]
        return KernelStatus(
            False,
            f"the CPU kernel failed to build ({detail[:200]}); see {root}",
            time.perf_counter() - start,
            False,
        )
    return KernelStatus(True, None, time.perf_counter() - start, not cached)


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
