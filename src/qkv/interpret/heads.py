r"""Which heads of a causal decoder do what: every head scored for three known patterns.

- **previous-token** heads put their weight on the token just before the query
  (``A[i, i - 1]``), measured on ordinary text;
- **induction** heads (Olsson et al. 2022, "In-context Learning and Induction Heads"): on a
  random token sequence repeated twice, ``t_0 .. t_{T-1} t_0 .. t_{T-1}``, a query at ``t_j`` in
  the second copy attends to the token *after* the earlier ``t_j``, i.e. key ``i - T + 1``;
  random tokens make this pattern impossible to explain by anything but copying;
- **attention sinks** (Xiao et al. 2024, "Efficient Streaming Language Models with Attention
  Sinks"): heads that park their weight on the first token whatever it is (``A[i, 0]``).

A score is the mean of that weight over the query positions where the pattern is defined, so it
lies in ``[0, 1]`` (1: all of the head's weight, always, on the predicted key). The scoring
functions take attention maps (``L`` tensors ``(B, H, N, N)``, causal); :func:`find_heads` runs a
model on the probes (any object with ``attention_maps(ids) -> L x (B, H, N, N)``, such as
:class:`~qkv.models.pretrained.llama.LlamaDecoder`).

Notation: ``L`` layers, ``H`` heads, ``B`` sequences, ``N`` tokens, ``T`` the period of the
repeated sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "HeadScores",
    "find_heads",
    "induction_scores",
    "previous_token_scores",
    "repeated_random_tokens",
    "sink_scores",
]

Pattern = Literal["previous_token", "induction", "sink"]


def _stack(maps: Sequence[Tensor]) -> Tensor:
    """``L`` maps ``(B, H, N, N)`` -> ``(L, B, H, N, N)`` float, checked square and alike."""
    if not maps:
        raise ValueError("maps is empty: give one (B, H, N, N) tensor per layer")
    for i, m in enumerate(maps):
        if not isinstance(m, Tensor) or m.ndim != 4 or m.shape[-1] != m.shape[-2]:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"maps[{i}] must be a (B, H, N, N) tensor; got {shape}")
        if m.shape != maps[0].shape:
            raise ValueError(
                f"maps[{i}] has shape {tuple(m.shape)}; maps[0] has {tuple(maps[0].shape)}"
            )
    return torch.stack([m.float() for m in maps])


def previous_token_scores(maps: Sequence[Tensor]) -> Tensor:
    """``(L, H)``: each head's mean weight on the previous token, over queries ``1 .. N-1``."""
    a = _stack(maps)  # (L, B, H, N, N)
    n = a.shape[-1]
    if n < 2:
        raise ValueError(f"need N >= 2 tokens; got N={n}")
    q = torch.arange(1, n)
    return a[..., q, q - 1].mean(dim=(1, 3))  # (L, H)


def sink_scores(maps: Sequence[Tensor]) -> Tensor:
    """``(L, H)``: each head's mean weight on the first token, over queries ``1 .. N-1`` (query
    0 can attend nothing else)."""
    a = _stack(maps)
    if a.shape[-1] < 2:
        raise ValueError(f"need N >= 2 tokens; got N={a.shape[-1]}")
    return a[..., 1:, 0].mean(dim=(1, 3))  # (L, H)


def induction_scores(maps: Sequence[Tensor], period: int) -> Tensor:
    """``(L, H)``: on sequences that repeat with ``period`` ``T`` (``N >= 2T``), each head's mean
    weight from query ``i`` to key ``i - T + 1``, over the queries ``T .. N-1`` of the repeat
    (whose earlier occurrence has a successor)."""
    a = _stack(maps)
    n = a.shape[-1]
    if isinstance(period, bool) or not isinstance(period, int) or not 1 <= period <= n // 2:
        raise ValueError(f"period must be an int in [1, N/2 = {n // 2}]; got {period!r}")
    q = torch.arange(period, n)
    return a[..., q, q - period + 1].mean(dim=(1, 3))  # (L, H)


def repeated_random_tokens(
    batch: int, period: int, *, low: int, high: int, seed: int = 0, prefix: Sequence[int] = ()
) -> tuple[Tensor, int]:
    """``batch`` rows of ``prefix`` then ``period`` random ids in ``[low, high)`` twice.

    Returns:
        ``ids (batch, len(prefix) + 2 * period)`` int64 and the offset ``len(prefix)`` of the
        first copy.
    """
    if period < 2 or high - low < period:
        raise ValueError(
            f"need period >= 2 and at least period ids in [low, high); got period={period}, "
            f"low={low}, high={high}"
        )
    gen = torch.Generator().manual_seed(seed)
    # distinct ids within a copy: a token that recurs inside one copy has two predecessors
    block = torch.stack(
        [torch.randperm(high - low, generator=gen)[:period] + low for _ in range(batch)]
    )
    head = torch.tensor(list(prefix), dtype=torch.long).expand(batch, len(prefix))
    return torch.cat((head, block, block), dim=1), len(prefix)


@dataclass(frozen=True)
class HeadScores:
    """Every head's score for each pattern, ``(L, H)`` tensors in ``[0, 1]``."""

    previous_token: Tensor
    induction: Tensor
    sink: Tensor

    def top(self, pattern: Pattern, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` best heads for ``pattern`` as ``(layer, head, score)``, best first."""
        scores: Tensor = getattr(self, pattern)
        values, flat = scores.flatten().topk(min(k, scores.numel()))
        heads = scores.shape[1]
        return [
            (int(i) // heads, int(i) % heads, round(float(v), 3))
            for v, i in zip(values, flat, strict=True)
        ]

    def count_above(self, pattern: Pattern, threshold: float) -> int:
        return int((getattr(self, pattern) > threshold).sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            name: [[round(float(x), 4) for x in row] for row in getattr(self, name)]
            for name in ("previous_token", "induction", "sink")
        }


@torch.no_grad()
def find_heads(
    model: Any,
    text_ids: Tensor,
    *,
    vocab_range: tuple[int, int],
    period: int = 50,
    batch: int = 4,
    seed: int = 0,
    prefix: Sequence[int] = (),
) -> HeadScores:
    """Score every head of a causal decoder for previous-token, induction and sink patterns.

    Args:
        model: has ``attention_maps(ids) -> L x (B, H, N, N)`` (a
            :class:`~qkv.models.pretrained.llama.LlamaDecoder`).
        text_ids: ``(B, N)`` ids of ordinary text (no padding), for previous-token and sink
            scores.
        vocab_range: ``(low, high)``: the random tokens of the induction probe are drawn from
            these ids (leave out special tokens).
        period: ``T``, the length of the random sequence that is repeated.
        batch: random sequences in the induction probe.
        seed: of the random sequences.
        prefix: ids put before each random sequence (e.g. a start token); the induction score
            is measured on the repeat only.

    Returns:
        :class:`HeadScores`. The sink score is measured on the text (its first token is the
        text's own).
    """
    text_maps = model.attention_maps(text_ids)
    ids, offset = repeated_random_tokens(
        batch, period, low=vocab_range[0], high=vocab_range[1], seed=seed, prefix=prefix
    )
    repeat_maps = [m[..., offset:, offset:] for m in model.attention_maps(ids)]
    return HeadScores(
        previous_token=previous_token_scores(text_maps),
        induction=induction_scores(repeat_maps, period),
        sink=sink_scores(text_maps),
    )
