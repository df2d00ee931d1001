"""A compiled CPU attention kernel (C++ with OpenMP, built on first use), behind the ``cpu``
backend. See :mod:`qkv.backends.cpu.backend` for what it serves, :mod:`qkv.backends.cpu.plan`
for how masks and score functions reach it, :mod:`qkv.backends.cpu.build` for the build."""

from qkv.backends.cpu.backend import CpuBackend, cpu_attention
from qkv.backends.cpu.build import KernelStatus, kernel_status

__all__ = ["CpuBackend", "KernelStatus", "cpu_attention", "kernel_status"]
