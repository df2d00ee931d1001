"""Greedy decoding: the most likely next token at every step, for a padded batch of sources."""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.decode._common import check_decode_args, cut_at_eos, forbid_special, inference
from qkv.models.base import BOS_ID, EOS_ID, Seq2SeqModel

__all__ = ["greedy_decode"]


def greedy_decode(
    model: Seq2SeqModel,
    source: Tensor,
    *,
    max_len: int,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
) -> list[list[int]]:
    """Decode every source greedily with the model's incremental API (KV cache / RNN state).

    Runs in evaluation mode under ``torch.no_grad()`` and restores the model's mode afterwards.

    Args:
        model: a :class:`~qkv.models.Seq2SeqModel`.
        source: ``(B, Ns)`` int64 ids, right-padded with 0.
        max_len: the most tokens generated per source, ``eos`` included.
        bos: the id that starts every target.
        eos: the id that ends one; a row stops at its first ``eos``.

    Returns:
        ``B`` lists of ids, without ``bos`` and ``eos``; ``<pad>`` and ``bos`` are never
        generated.

    Raises:
        TypeError, ValueError: for a model without the interface, a bad ``max_len``, ``bos``,
            ``eos`` or source (naming the argument).
    """
    check_decode_args(model, max_len, bos, eos)
    with inference(model):
        encoded = model.encode(source)
        state = model.start_decoding(encoded, max_len=max_len)
        tokens = torch.full((encoded.batch_size,), bos, dtype=torch.long, device=source.device)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        generated: list[Tensor] = []
        for _ in range(max_len):
            logits = forbid_special(model.decode_step(state, tokens), model, bos)  # (B, V)
            tokens = logits.argmax(dim=-1)  # (B,)
            generated.append(tokens)
            finished |= tokens == eos
            if bool(finished.all()):
                break
        rows = torch.stack(generated, dim=1).tolist()  # (B, steps)
    return [cut_at_eos(row, eos) for row in rows]
