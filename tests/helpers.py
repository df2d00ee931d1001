"""What several test modules share: loading a script of ``benchmarks/``, case builders and
fixtures. Test modules import from here (and from ``gold.py``), never from each other."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from qkv import masks, scores

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/NAME.py`` as a module (registered in ``sys.modules`` under
    ``NAME``, where its dataclasses look their module up); loaded once per session."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- attention cases: masks and score modifiers ------------------------------------------------


def make_mask(
    kind: str,
    B: int,
    Nq: int,
    Nk: int,
    seed: int,
    *,
    heads: int = 1,
    window: int = 3,
    documents: int = 3,
    prefix: int = 2,
    min_keys: int = 1,
    dense_p: float = 0.7,
    empty_every: int | None = None,
    device: str = "cpu",
) -> Tensor | masks.MaskFn | None:
    """A mask of ``kind`` for a ``(B, ., Nq, Nk)`` call, random parts drawn from ``seed``.

    Kinds: ``none``; ``sliding_window`` (``window``); ``document`` (ids of ``documents``
    documents, sorted); ``key_padding`` (between ``min_keys`` and ``Nk`` real keys: 0 gives
    fully masked rows); ``prefix_lm`` (``prefix``); ``dense`` (a bool ``(B, heads, Nq, Nk)``
    tensor, True with probability ``dense_p``, every ``empty_every``-th query row empty).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "sliding_window":
        return masks.sliding_window(window)
    if kind == "document":
        ids = torch.sort(torch.randint(0, documents, (B, max(Nq, Nk)), generator=g), dim=-1).values
        return masks.document(ids[:, :Nq], ids[:, :Nk])
    if kind == "key_padding":
        return masks.key_padding(torch.randint(min_keys, Nk + 1, (B,), generator=g))
    if kind == "prefix_lm":
        return masks.prefix_lm(prefix)
    if kind == "dense":
        dense = torch.rand(B, heads, Nq, Nk, generator=g) < dense_p
        if empty_every is not None:
            dense[:, :, ::empty_every] = False
        return dense.to(device)
    raise AssertionError(kind)


class CappedRelative(torch.nn.Module):
    """A learnable score function that is *not* additive: dS must go back through the tanh."""

    def __init__(self, rel: scores.RelativePositionBias, cap: float) -> None:
        super().__init__()
        self.rel = rel
        self.cap = cap

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return self.cap * torch.tanh(self.rel(score, b, h, q, kv) / self.cap)


def make_bias(kind: str, Hq: int, Nq: int, Nk: int, seed: int, *, max_distance: int = 5) -> Any:
    """A bias or score modifier of ``kind`` (``none``, ``tensor`` float64 ``(1, Hq, Nq, Nk)``,
    ``alibi``, ``softcap``, ``relative`` with a random table, ``relative_softcap``: the
    relative bias through a tanh cap), random parts drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "tensor":
        return torch.randn(1, Hq, Nq, Nk, generator=g, dtype=torch.float64)
    if kind == "alibi":
        return scores.alibi(Hq)
    if kind == "softcap":
        return scores.softcap(2.0)
    rel = scores.RelativePositionBias(Hq, max_distance=max_distance)
    with torch.no_grad():
        rel.table.copy_(torch.randn(rel.table.shape, generator=g))
    if kind == "relative":
        return rel
    if kind == "relative_softcap":
        return CappedRelative(rel, 3.0)
    raise AssertionError(kind)


def cast_bias(bias: object, dtype: torch.dtype, *, tables_in_float64: bool = True) -> object:
    """A per-run copy of a bias: tensors in ``dtype`` requiring grad, modules deep-copied (with
    ``tables_in_float64``, their tables in float64 for the float64 runs, so that the gold
    gradient is float64 through and through)."""
    if isinstance(bias, Tensor):
        return bias.detach().to(dtype).requires_grad_(True)
    if isinstance(bias, torch.nn.Module):
        copied = copy.deepcopy(bias)
        return copied.double() if tables_in_float64 and dtype == torch.float64 else copied
    return bias


def bias_grad(bias: object) -> Tensor | None:
    """The gradient a bias collected: the tensor's, or the relative table's."""
    if isinstance(bias, Tensor):
        return bias.grad
    if isinstance(bias, CappedRelative):
        return bias.rel.table.grad
    return bias.table.grad if isinstance(bias, scores.RelativePositionBias) else None


# --- the tiled backends' cases (chunked, cpu) --------------------------------------------------

TILED_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TILED_CAUSAL = [False, "top_left", "bottom_right"]
TILED_MASKS = ["none", "sliding_window", "document", "padding", "prefix_lm", "dense"]
TILED_BIASES = ["tensor", "alibi", "softcap", "relative", "relative_softcap"]
# (B, Hq, Hkv, Nq, Nk, D, Dv, non_contiguous): GQA ratios 1, 2, 3, 4; Nq < Nk and Nq > Nk;
# lengths 1, tile - 1, tile, tile + 1 for both of the chunked tests' 4 x 8 tiles, and primes.
TILED_SHAPES = [
    (2, 4, 4, 13, 13, 8, 8, False),
    (1, 4, 2, 1, 9, 8, 8, True),
    (2, 4, 1, 5, 7, 8, 4, False),
    (1, 6, 2, 8, 16, 16, 8, True),
    (2, 2, 2, 17, 3, 4, 4, False),
    (1, 4, 2, 31, 29, 8, 8, True),
    (1, 2, 1, 3, 8, 8, 8, False),
    (2, 4, 2, 9, 24, 8, 12, False),
]


def tiled_mask(kind: str, B: int, Nq: int, Nk: int, seed: int) -> Tensor | masks.MaskFn | None:
    """The tiled suites' masks: ``padding`` may leave batch 0 no key (fully masked rows),
    ``dense`` has every fifth query row empty."""
    if kind == "padding":
        return make_mask("key_padding", B, Nq, Nk, seed, min_keys=0)
    return make_mask(kind, B, Nq, Nk, seed, empty_every=5)


# --- threads -----------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
