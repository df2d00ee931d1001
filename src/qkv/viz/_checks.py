"""Argument checks shared by the visualisation functions.

Every check raises ``TypeError`` or ``ValueError`` naming the argument and what it got, and hands
back a detached float tensor on the CPU: pictures and pages never need gradients or a GPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def as_weights(weights: object, name: str, ndim: int, layout: str) -> Tensor:
    """``weights`` as a detached float64 CPU tensor with ``ndim`` dimensions and finite values.

    ``layout`` is the expected shape in words, e.g. ``"(H, Nq, Nk)"``, used in the error message.
    """
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {layout}; got {type(weights).__name__}"
        )
    if weights.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}; got {tuple(weights.shape)}")
    if not (weights.dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating-point tensor; got {weights.dtype}")
    if weights.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(weights.shape)}")
    values = weights.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or inf")
    return values


def check_nonnegative(values: Tensor, name: str) -> None:
    """Attention weights are probabilities; a negative value means the caller passed scores."""
    smallest = float(values.min())
    if smallest < 0:
        raise ValueError(
            f"{name} must be non-negative attention weights; got a minimum of {smallest:.4g}"
        )


def token_labels(tokens: Sequence[str] | None, length: int, name: str) -> list[str]:
    """``tokens`` as a list of ``length`` strings; ``None`` numbers the positions ``0..length-1``."""
    if tokens is None:
        return [str(i) for i in range(length)]
    if isinstance(tokens, str):
        raise TypeError(f"{name} must be a sequence of token strings, not one string ({tokens!r})")
    labels = list(tokens)
    if len(labels) != length:
        raise ValueError(f"{name} has {len(labels)} tokens but the weights have {length} positions")
    for i, token in enumerate(labels):
        if not isinstance(token, str):
            raise TypeError(f"{name}[{i}] must be a str; got {type(token).__name__} ({token!r})")
    return labels


#: The mark qkv leaves in the pages and pictures it writes, so that a later run may replace its
#: own output but never a file of the user's that happens to carry the same name.
GENERATOR_META = '<meta name="generator" content="qkv">'
FIGURE_METADATA: dict[str, dict[str, str]] = {
    "png": {"Software": "qkv"},
    "svg": {"Creator": "qkv"},
    "pdf": {"Creator": "qkv"},
}
_MARKS = (
    GENERATOR_META.encode(),
    b"tEXtSoftware\x00qkv",  # PNG text chunk
    b"<dc:title>qkv</dc:title>",  # SVG creator
    b"/Creator (qkv)",  # PDF info
)


def written_by_qkv(path: str | os.PathLike[str]) -> bool:
    """Whether the file ``path`` is a page or picture that qkv wrote (it carries qkv's mark)."""
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 16)
    except OSError:
        return False
    return any(mark in head for mark in _MARKS)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader (a browser reloading the page, a docs build) never sees a half-written file, and a
    failed write leaves the previous file in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file private (0600); a picture or page is for sharing, so give it the
    # mode of the file it replaces, or the usual 0644.
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
