"""Greedy decoding of the pointer-generator, with extended (copy) ids and n-gram blocking.

This is the pointer-generator's own decoder (:func:`pointer_greedy_decode`), not
:func:`qkv.decode.greedy_decode`: its output distribution covers the fixed vocabulary plus
each document's out-of-vocabulary words, and it blocks repeated n-grams.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.data.batching import BucketBatchSampler
from qkv.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer
from qkv.models.pointer import PointerGenerator
from qkv.tasks.summarization.batches import PointerBatch, PointerDataset, collate_pointer
from qkv.tasks.summarization.vocab import detokenize, ids_to_words

__all__ = ["decode_dataset", "pointer_greedy_decode"]


def _blocked(history: list[int], n: int) -> set[int]:
    """Tokens that would repeat an ``n``-gram already in ``history``."""
    if n < 1 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - (n - 1) :]) if n > 1 else ()
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i : i + n - 1]) == prefix
    }


@torch.no_grad()
def pointer_greedy_decode(
    model: PointerGenerator,
    batch: PointerBatch,
    *,
    max_length: int = 40,
    no_repeat_ngram: int = 3,
) -> tuple[list[list[int]], list[Tensor]]:
    """Greedy decoding of a batch.

    Args:
        model: the pointer-generator (eval mode).
        batch: a :class:`PointerBatch` on the model's device (targets are not read).
        max_length: most tokens per summary (``<eos>`` excluded).
        no_repeat_ngram: never produce an ``n``-gram twice (0 turns it off); a cheap guard
            against the loops greedy decoding falls into.

    Returns:
        Extended ids per example (without ``<eos>``) and the attention of each step
        ``(len, Ns)`` per example.
    """
    encoding = model.encode(batch.source, batch.source_ext, batch.num_oov)
    state = model.start_decoding(encoding)
    B = len(batch)
    tokens = torch.full((B,), BOS_ID, dtype=torch.long, device=batch.source.device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    weights: list[list[Tensor]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_length + 1):
        log_probs, attn = model.decode_step(state, tokens)  # (B, V + X), (B, Ns)
        # Never emit <pad>, <bos> or <unk>: copy or generate a word (or end with <eos>).
        log_probs[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
        for b in range(B):
            blocked = _blocked(outputs[b], no_repeat_ngram)
            if blocked:
                log_probs[b, list(blocked)] = float("-inf")
        tokens = log_probs.argmax(dim=-1)  # (B,)
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if token == EOS_ID or len(outputs[b]) >= max_length:
                done[b] = True
            else:
                outputs[b].append(token)
                weights[b].append(attn[b].cpu())
        if all(done):
            break
    return outputs, [
        torch.stack(w) if w else torch.zeros(0, batch.source.shape[1]) for w in weights
    ]


def decode_dataset(
    model: PointerGenerator,
    dataset: PointerDataset,
    tokenizer: TextTokenizer,
    batch_size: int,
    max_length: int,
) -> list[str]:
    """Greedy summaries of every example, in dataset order."""
    device = next(model.parameters()).device
    sampler = BucketBatchSampler(dataset.lengths(), batch_size=batch_size, shuffle=False)
    summaries: dict[int, str] = {}
    for indices in sampler.batches():
        batch = collate_pointer([dataset[i] for i in indices], tokenizer.vocab_size).to(device)
        outputs, _ = pointer_greedy_decode(model, batch, max_length=max_length)
        for i, ids, oovs in zip(batch.index.tolist(), outputs, batch.oovs, strict=True):
            summaries[i] = detokenize(ids_to_words(ids, tokenizer, oovs))
    return [summaries[i] for i in range(len(dataset))]
