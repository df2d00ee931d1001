r"""Batched beam search with a GNMT length penalty, on the model's incremental API.

``B`` sources are decoded together with ``K`` beams each: the decoder state holds ``B * K`` rows
(row ``b * K + k``), every step scores all ``K * V`` one-token extensions of a source's beams,
and :meth:`~qkv.models.base.DecoderState.select` copies the surviving parents into place, so
the KV cache (or RNN state) follows the hypotheses instead of being recomputed.

Finished hypotheses (ending in ``eos``) are ranked by Wu et al. "Google's Neural Machine
Translation System" (2016), Eq. 14::

    score(Y) = log P(Y | X) / lp(Y),        lp(Y) = ((5 + |Y|) / 6) ** alpha

with ``|Y|`` the generated tokens, ``eos`` included; ``alpha = 0`` ranks by plain log
probability, larger values favour longer outputs. A source is done once it has ``K`` finished
hypotheses and no live beam can still beat the worst of them: log probabilities only fall as a
beam grows, so with ``alpha >= 0`` a live beam's best possible score is its current log
probability divided by ``lp(max_len)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.decode._common import check_decode_args, forbid_special, inference
from qkv.models.base import BOS_ID, EOS_ID, Seq2SeqModel, check_positive_int

__all__ = ["Hypothesis", "beam_search", "beam_search_hypotheses", "length_penalty"]


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: ``tokens`` without ``bos`` and ``eos``, its total ``log_prob``, and the
    length-normalized ``score`` it is ranked by."""

    tokens: list[int]
    log_prob: float
    score: float


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ``((5 + length) / 6) ** alpha``."""
    return float(((5.0 + length) / 6.0) ** alpha)


class _SourceBeams:
    """The finished hypotheses of one source and the test that it is done."""

    def __init__(self, beam_size: int, alpha: float, max_len: int) -> None:
        self.beam_size = beam_size
        self.alpha = alpha
        self.best_possible_lp = length_penalty(max_len, alpha)
        self.finished: list[Hypothesis] = []
        self.done = False

    def add(self, tokens: list[int], log_prob: float, *, ended: bool) -> None:
        """A finished hypothesis; ``ended`` if it generated ``eos`` (which counts in its
        length but is not kept in ``tokens``)."""
        score = log_prob / length_penalty(len(tokens) + ended, self.alpha)
        self.finished.append(Hypothesis(tokens, log_prob, score))

    def update_done(self, best_live_log_prob: float) -> None:
        """Done when ``K`` hypotheses are finished and no live beam can beat the worst of the
        best ``K`` (or when nothing is live)."""
        if best_live_log_prob == float("-inf"):
            self.done = True
            return
        if len(self.finished) < self.beam_size:
            return
        worst_kept = sorted(h.score for h in self.finished)[-self.beam_size]
        self.done = best_live_log_prob / self.best_possible_lp <= worst_kept

    def ranked(self) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: h.score, reverse=True)[: self.beam_size]


def _check_beam_args(beam_size: object, alpha: object) -> tuple[int, float]:
    k = check_positive_int("beam_size", beam_size)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha < 0:
        raise ValueError(f"length_penalty must be a number >= 0; got length_penalty={alpha!r}")
    return k, float(alpha)


def beam_search_hypotheses(
    model: Seq2SeqModel,
    source: Tensor,
    *,
    beam_size: int,
    length_penalty: float = 0.6,
    max_len: int,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
) -> list[list[Hypothesis]]:
    """Beam search over a padded batch of sources, returning up to ``beam_size`` ranked
    hypotheses per source (best first). Arguments as in :func:`beam_search`."""
    check_decode_args(model, max_len, bos, eos)
    K, alpha = _check_beam_args(beam_size, length_penalty)
    with inference(model):
        encoded = model.encode(source)
        B, device = encoded.batch_size, source.device
        state = model.start_decoding(encoded, beam_size=K, max_len=max_len)
        beams = [_SourceBeams(K, alpha, max_len) for _ in range(B)]
        # Only the first of a source's K identical start beams may expand at step 0.
        log_probs = torch.full((B, K), float("-inf"), device=device)
        log_probs[:, 0] = 0.0
        history = torch.empty(B, K, 0, dtype=torch.long, device=device)  # tokens so far
        tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)[:, None] * K  # (B, 1): first row of each source
        for step in range(max_len):
            logits = forbid_special(model.decode_step(state, tokens).float(), model, bos)
            V = logits.shape[-1]
            candidates = log_probs[..., None] + logits.log_softmax(-1).view(B, K, V)
            top, index = candidates.view(B, K * V).topk(min(2 * K, K * V), dim=1)  # (B, 2K)
            parents, words = index // V, index % V
            next_lp, next_parents, next_words = _choose_beams(
                beams, top, parents, words, history, eos, last=step == max_len - 1
            )
            if all(b.done for b in beams):
                break
            state.select((rows + next_parents).view(-1))
            history = torch.cat(
                [
                    history.gather(1, next_parents[..., None].expand_as(history)),
                    next_words[..., None],
                ],
                dim=2,
            )  # (B, K, step + 1)
            log_probs, tokens = next_lp, next_words.view(-1)
    return [b.ranked() for b in beams]


def _choose_beams(
    beams: list[_SourceBeams],
    top: Tensor,
    parents: Tensor,
    words: Tensor,
    history: Tensor,
    eos: int,
    *,
    last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split each source's ``2K`` best candidates into finished hypotheses (``eos``) and the
    ``K`` live beams of the next step; returns their log probs, parents and words ``(B, K)``.

    Taking ``2K`` candidates guarantees ``K`` live ones even if ``K`` of them end in ``eos``.
    An ``eos`` candidate counts only if it ranks among the ``K`` best, as it would in a beam of
    ``K``; a finished or exhausted source keeps ``-inf`` beams that are never extended.
    """
    B, K = history.shape[0], history.shape[1]
    # Built as lists (cheap element writes), turned into (B, K) tensors once at the end.
    next_lp = [[float("-inf")] * K for _ in range(B)]
    next_parents = [list(range(K)) for _ in range(B)]
    next_words = [[eos] * K for _ in range(B)]
    top_l, parents_l, words_l, past = (
        top.tolist(),
        parents.tolist(),
        words.tolist(),
        history.tolist(),
    )
    for b, source in enumerate(beams):
        if source.done:
            continue
        live = 0
        for rank, (lp, parent, word) in enumerate(
            zip(top_l[b], parents_l[b], words_l[b], strict=True)
        ):
            if lp == float("-inf") or live == K:
                break
            if word == eos:
                if rank < K:
                    source.add(past[b][parent], lp, ended=True)
                continue
            next_lp[b][live], next_parents[b][live], next_words[b][live] = lp, parent, word
            if last:  # out of room: finished without eos
                source.add([*past[b][parent], word], lp, ended=False)
            live += 1
        source.update_done(float("-inf") if last else next_lp[b][0])
    device = top.device
    return (
        torch.tensor(next_lp, device=device),
        torch.tensor(next_parents, dtype=torch.long, device=device),
        torch.tensor(next_words, dtype=torch.long, device=device),
    )


def beam_search(
    model: Seq2SeqModel,
    source: Tensor,
    *,
    beam_size: int,
    length_penalty: float = 0.6,
    max_len: int,
    bos: int = BOS_ID,
    eos: int = EOS_ID,
) -> list[list[int]]:
    """The best hypothesis of a ``beam_size`` beam search for every source.

    Runs in evaluation mode under ``torch.no_grad()`` and restores the model's mode afterwards.

    Args:
        model: a :class:`~qkv.models.Seq2SeqModel`.
        source: ``(B, Ns)`` int64 ids, right-padded with 0; all ``B`` are decoded together.
        beam_size: ``K``, live hypotheses per source; 1 gives the greedy result (with
            ``length_penalty=0``).
        length_penalty: GNMT's ``alpha >= 0`` (0.6 to 1.0 in their experiments).
        max_len: the most tokens generated per source, ``eos`` included.
        bos, eos: the start and end ids.

    Returns:
        ``B`` lists of ids, without ``bos`` and ``eos``; ``<pad>`` and ``bos`` are never
        generated.

    Raises:
        TypeError, ValueError: for a model without the interface or a bad argument, naming it.
    """
    ranked = beam_search_hypotheses(
        model,
        source,
        beam_size=beam_size,
        length_penalty=length_penalty,
        max_len=max_len,
        bos=bos,
        eos=eos,
    )
    return [hyps[0].tokens if hyps else [] for hyps in ranked]
