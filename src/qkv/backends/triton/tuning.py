"""Tile sizes of the triton kernels: defaults per head dim, and a cached autotuner.

Each kernel (``"fwd"``, ``"dkdv"``, ``"dq"``) runs with a :class:`KernelConfig`. On CUDA the first
call for a given (kernel, head dims, dtype, device) times a few candidates on that call's own
inputs and keeps the fastest for the rest of the process (:data:`TUNED`); the candidates share a
small set of tile sizes, so the block tables they need are built once each. ``QKV_TRITON_AUTOTUNE=0``
turns tuning off (the first candidate, a sound default, is used). Under ``TRITON_INTERPRET=1``
nothing is timed: small tiles keep the interpreter quick.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["TUNED", "KernelConfig", "candidates", "interpreting", "pick_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel.

    Attributes:
        block_m: query rows per tile (power of two, >= 16).
        block_n: keys per tile (power of two, >= 16).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the key loop.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16; got {name}={value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16; got {self.num_warps}")
        if not 1 <= self.num_stages <= 6:
            raise ValueError(f"num_stages must be in 1..6; got {self.num_stages}")


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETER = KernelConfig(32, 32, 1, 1)


def candidates(kernel: str, head_dim: int) -> list[KernelConfig]:
    """Configs tried for ``kernel`` at ``head_dim`` (the padded power of two), best guess first.
    Larger head dims need smaller tiles to fit the shared memory of one multiprocessor."""
    if kernel == "fwd":
        if head_dim <= 64:
            return [
                KernelConfig(128, 64, 4, 3),
                KernelConfig(128, 128, 8, 3),
                KernelConfig(64, 64, 4, 3),
                KernelConfig(128, 64, 4, 4),
            ]
        if head_dim <= 128:
            return [
                KernelConfig(128, 64, 8, 3),
                KernelConfig(128, 128, 8, 2),
                KernelConfig(64, 64, 4, 3),
                KernelConfig(128, 64, 4, 3),
            ]
        return [KernelConfig(64, 32, 4, 2), KernelConfig(64, 64, 8, 2), KernelConfig(32, 32, 4, 2)]
    if kernel in ("dkdv", "dq"):
        if head_dim <= 64:
            return [
                KernelConfig(64, 64, 4, 3),
                KernelConfig(64, 128, 8, 3),
                KernelConfig(128, 64, 8, 3),
                KernelConfig(32, 64, 4, 3),
            ]
        if head_dim <= 128:
            return [
                KernelConfig(64, 64, 8, 2),
                KernelConfig(64, 64, 4, 3),
                KernelConfig(32, 128, 8, 2),
                KernelConfig(128, 64, 8, 2),
            ]
        return [KernelConfig(32, 32, 4, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 4, 1)]
    raise ValueError(f"kernel must be 'fwd', 'dkdv' or 'dq'; got {kernel!r}")


#: The chosen config per (kernel, padded D, padded Dv, dtype, device name), for this process.
TUNED: dict[tuple[str, int, int, torch.dtype, str], KernelConfig] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("QKV_TRITON_AUTOTUNE", "1") not in ("", "0")


def pick_config(
    kernel: str,
    head_dim: int,
    value_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    run: Callable[[KernelConfig], None],
) -> KernelConfig:
    """The config for ``kernel``: cached, else the fastest candidate timed with ``run(config)``
    (which launches the kernel once on the call's inputs, writing scratch outputs)."""
    if interpreting() or device.type != "cuda":
        return _INTERPRETER
    name = torch.cuda.get_device_name(device)
    key = (kernel, head_dim, value_dim, dtype, name)
    if key in TUNED:
        return TUNED[key]
    options = candidates(kernel, max(head_dim, value_dim))
    if not _autotune_enabled():
        TUNED[key] = options[0]
        return options[0]
    from triton.testing import do_bench

    timings: dict[KernelConfig, float] = {}
    for config in options:
        try:
            timings[config] = float(do_bench(lambda c=config: run(c), warmup=5, rep=20))
        except Exception as error:  # out of shared memory or registers: not a candidate here
            log.debug("triton %s config %s failed: %s", kernel, config, error)
    if not timings:
        raise RuntimeError(f"no triton {kernel} config could run for head dim {head_dim}")
    best = min(timings, key=timings.__getitem__)
    log.info("triton %s tuned for %s: %s (%.3f ms)", kernel, key[1:], best, timings[best])
    TUNED[key] = best
    return best
