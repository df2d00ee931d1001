"""Device and precision selection: CUDA when present with bf16 autocast, else CPU in fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qkv.train.config import Precision

__all__ = ["autocast", "resolve_device", "resolve_precision"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; other names as given.

    Raises:
        ValueError: a CUDA device asked for on a machine without one, or an unknown name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a device name ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for plain fp32.

    ``"auto"`` picks bf16 on CUDA (no loss scaling needed, unlike fp16) and fp32 on the CPU,
    where bf16 autocast is slower than fp32 on most processors.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` when ``dtype`` is given, otherwise nothing."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
