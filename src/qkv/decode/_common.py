"""What greedy and beam search share: argument checks and evaluation mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from qkv.models.base import Seq2SeqModel, check_positive_int


def check_token_id(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a token id (an int >= 0); got {name}={value!r}")
    return value


def check_decode_args(model: object, max_len: object, bos: object, eos: object) -> None:
    if not isinstance(model, Seq2SeqModel):
        raise TypeError(
            f"model must implement qkv.models.Seq2SeqModel (encode, start_decoding, "
            f"decode_step, ...); got {type(model).__name__}"
        )
    check_positive_int("max_len", max_len)
    check_token_id("bos", bos)
    check_token_id("eos", eos)


@contextlib.contextmanager
def inference(model: Seq2SeqModel) -> Iterator[None]:
    """No gradients and evaluation mode (no dropout) for the duration, then the model's own
    mode back: decoding with dropout on would sample a different model at every step."""
    was_training = bool(getattr(model, "training", False))
    train = getattr(model, "train", None)
    if callable(train):
        train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        if callable(train):
            train(was_training)


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    """The tokens before the first ``eos`` (all of them when there is none)."""
    return ids[: ids.index(eos)] if eos in ids else ids


def forbid_special(logits: Tensor, model: Seq2SeqModel, bos: int) -> Tensor:
    """``logits (B, V)`` with ``<pad>`` and ``bos`` made impossible: neither may be generated
    (a generated pad would be masked out of the prefix by a full recompute, and the cache would
    then disagree with it)."""
    pad = int(getattr(model.config, "pad_id", 0))
    banned = [i for i in {pad, bos} if i < logits.shape[-1]]
    logits = logits.clone()
    logits[:, banned] = float("-inf")
    return logits
