"""What the translation task needs around a copy-attention model (:mod:`qkv.models.copy`).

- :func:`source_to_target_ids`: which target id each source id copies to, from the two
  vocabularies (the identity for one shared vocabulary).
- :func:`copy_loss`: the label-smoothed negative log likelihood of the model's extended
  distribution (the smoothing spreads over the fixed vocabulary only: a copy-only slot is not a
  word the model could have generated).
- :func:`decode_copied`: text of generated ids where ids ``>= V`` are copied source tokens,
  written as they appear in the source (an unknown character stays itself, not ``<unk>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qkv.data import PairTokenizer, TextTokenizer
from qkv.data.tokenizer import PAD_ID, UNK_ID

__all__ = [
    "copy_loss",
    "decode_copied",
    "simulate_unknowns",
    "source_pieces",
    "source_to_target_ids",
]


def source_to_target_ids(tokenizer: PairTokenizer) -> Tensor:
    """``(Vs,)`` int64: the target id of the same token string, or ``-1`` (``<unk>`` always
    -1, so that an unknown source word is copied as its text)."""
    source, target = tokenizer.source, tokenizer.target
    if tokenizer.shared:
        mapping = torch.arange(source.vocab_size)
    else:
        target_vocab = target.hf.get_vocab()
        mapping = torch.full((source.vocab_size,), -1, dtype=torch.long)
        for token, i in source.hf.get_vocab().items():
            j = target_vocab.get(token)
            if j is not None:
                mapping[i] = j
    mapping[UNK_ID] = -1
    return mapping


def copy_loss(log_probs: Tensor, labels: Tensor, label_smoothing: float, vocab_size: int) -> Tensor:
    """Summed loss over the non-padding labels.

    Args:
        log_probs: ``(B, Nt, V + X)`` the model's extended log probabilities.
        labels: ``(B, Nt)`` int64 ids in ``[0, V + X)``, ``0`` = padding (ignored).
        label_smoothing: ``eps``: ``(1 - eps) * NLL + eps * mean over the V fixed ids of -log p``
            (what ``cross_entropy(label_smoothing=eps)`` computes for a plain model).
        vocab_size: ``V``.
    """
    log_probs = log_probs.float()
    keep = labels != PAD_ID  # (B, Nt)
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, Nt)
    if label_smoothing > 0:
        smooth = -log_probs[..., :vocab_size].mean(dim=-1)  # (B, Nt)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return (nll * keep).sum()


def source_pieces(tokenizer: TextTokenizer, text: str) -> list[str]:
    """The text of each source token as it appears in ``text`` (from the tokenizer's
    offsets; ``</s>`` appended for the end-of-source id)."""
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    return [text[a:b] for a, b in encoding.offsets] + ["</s>"]


def decode_copied(
    tokenizer: TextTokenizer,
    ids: Sequence[int],
    pieces: Sequence[str],
    positions: Sequence[int],
) -> str:
    """Text of ``ids`` (target ids, and ``V + j`` for the ``j``-th extended source token).

    Args:
        tokenizer: the target tokenizer (``V = tokenizer.vocab_size``).
        ids: generated ids, without ``<bos>``/``<eos>``.
        pieces: the source's token texts (:func:`source_pieces`).
        positions: the source position of each extended token (from the model).
    """
    V = tokenizer.vocab_size
    out: list[str] = []
    run: list[int] = []
    for i in ids:
        if i < V:
            run.append(i)
            continue
        if run:
            out.append(tokenizer.decode(run))
            run = []
        j = i - V
        out.append(pieces[positions[j]] if j < len(positions) else "")
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def simulate_unknowns(
    source: Tensor, labels: Tensor, source_to_target: Tensor, vocab_size: int, rate: float
) -> tuple[Tensor, Tensor]:
    """Teach a copy model to copy words it does not know: hide some source tokens as
    ``<unk>`` and make the target's copies of them point at those positions.

    A training corpus has no ``<unk>`` in it (its vocabulary was built from it), so without this
    a model never learns to copy an unknown word it meets at test time. In each row, every
    distinct copyable source token (one that maps to a target id that the labels contain) is
    hidden with probability ``rate``, at all of its positions; each label equal to its target id
    becomes the extended id of its first position (``V + j``, as
    :func:`~qkv.models.copy.extended_source` numbers them).

    Args:
        source: ``(B, Ns)`` int64 source ids.
        labels: ``(B, Nt)`` int64 target labels (``0`` = padding).
        source_to_target: ``(Vs,)`` the model's map of source ids to target ids (``-1``: none).
        vocab_size: ``V``.
        rate: the probability of hiding a token, in ``[0, 1)``.

    Returns:
        The new ``source`` and ``labels`` (the inputs are not changed).
    """
    from qkv.models.copy import extended_source

    if rate <= 0:
        return source, labels
    mapped = source_to_target[source]  # (B, Ns)
    in_labels = (mapped.unsqueeze(-1) == labels.unsqueeze(1)).any(dim=-1)  # (B, Ns)
    copyable = (mapped > UNK_ID) & in_labels  # (B, Ns): a real token the target copies
    if not bool(copyable.any()):
        return source, labels
    # One draw per (row, token id): a token is hidden at every one of its positions.
    draws = torch.rand(source.shape[0], source_to_target.shape[0], device=source.device)
    hidden = copyable & (draws.gather(1, source) < rate)  # (B, Ns)
    if not bool(hidden.any()):
        return source, labels
    new_source = source.masked_fill(hidden, UNK_ID)
    source_ext, _ = extended_source(new_source, source_to_target, vocab_size)
    new_labels = labels.clone()
    for b, i in torch.nonzero(hidden).tolist():
        target_id = int(mapped[b, i])
        first = int(torch.nonzero(hidden[b] & (source[b] == source[b, i]))[0])
        if first == i:
            new_labels[b][labels[b] == target_id] = source_ext[b, i]
    return new_source, new_labels
