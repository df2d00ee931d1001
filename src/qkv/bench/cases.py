"""What one benchmark case is, and the ``qkv.attention`` arguments it stands for."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from qkv import masks, scores

MASK_KINDS = ("none", "causal", "sliding_window", "documents", "alibi")
Mode = Literal["fwd", "fwd+bwd"]


@dataclass(frozen=True)
class BenchCase:
    """One timed call: ``backend`` on q ``(batch, heads, seq_len, head_dim)``, k and v
    ``(batch, kv_heads, seq_len, head_dim)``, with the mask ``mask_kind``."""

    backend: str
    mask_kind: str
    seq_len: int
    mode: Mode = "fwd"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    window: int = 256
    documents: int = 16
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}; got {self.mask_kind!r}")
        if self.mode not in ("fwd", "fwd+bwd"):
            raise ValueError(f"mode must be 'fwd' or 'fwd+bwd'; got {self.mode!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        return f"{self.mask_kind} N={self.seq_len} {self.mode}"

    def attention_kwargs(self) -> dict[str, Any]:
        """The mask, causal flag and bias arguments for :func:`qkv.attention`."""
        n = self.seq_len
        if self.mask_kind == "causal":
            return {"causal": True}
        if self.mask_kind == "sliding_window":
            # A causal window of `window` keys: the query itself and window - 1 before it.
            return {"mask": masks.sliding_window(self.window - 1)}
        if self.mask_kind == "documents":
            ids = torch.arange(n, device=self.device) * self.documents // n
            return {"mask": masks.document(ids)}
        if self.mask_kind == "alibi":
            return {"bias": scores.alibi(self.heads)}
        return {}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def expand_sweep(
    *,
    backends: list[str],
    mask_kinds: list[str],
    seq_lens: list[int],
    modes: list[Mode],
    **fixed: Any,
) -> list[BenchCase]:
    """Every combination, ordered so one table row (mask, N, mode) has its backends together."""
    return [
        BenchCase(backend=b, mask_kind=m, seq_len=n, mode=mode, **fixed)
        for m, n, mode, b in itertools.product(mask_kinds, seq_lens, modes, backends)
    ]
