"""A trained summarizer: load a folder, summarize documents, score it with ROUGE."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from qkv.data.parallel import Pair
from qkv.data.tokenizer import EOS_ID, TextTokenizer
from qkv.models.pointer import PointerGenerator, PointerGeneratorConfig
from qkv.tasks.summarization.batches import collate_pointer
from qkv.tasks.summarization.decoding import pointer_greedy_decode
from qkv.tasks.summarization.metrics import lead_baseline, rouge_scores
from qkv.tasks.summarization.vocab import detokenize, encode_with_oov, ids_to_words

__all__ = ["Summarizer", "Summary", "evaluate_summarizer"]

TASK_NAME = "summarization"


def _build(config: dict[str, Any]) -> PointerGenerator:
    return PointerGenerator(PointerGeneratorConfig.from_dict(config))


@dataclass(frozen=True)
class Summary:
    """One generated summary.

    Attributes:
        text: the summary.
        words: its words (lowercased, as generated).
        source_words: the document's words as the model read them (after truncation).
        attention: ``(len(words), len(source_words))`` copy attention of each step.
    """

    text: str
    words: list[str]
    source_words: list[str]
    attention: Tensor


class Summarizer:
    """A trained pointer-generator with its vocabulary, loaded from a model folder."""

    def __init__(
        self,
        model: PointerGenerator,
        tokenizer: TextTokenizer,
        *,
        max_source_length: int,
        max_target_length: int,
        settings: Any | None = None,
    ) -> None:
        self.model = model.eval()
        self.settings = settings
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, device: str = "auto") -> Summarizer:
        """Load a folder written by ``train_task("summarization", ...)``, on ``device``.

        Raises:
            ModelFolderError: not a summarization model folder, or inconsistent files.
        """
        from qkv.tasks.base import load_task_model

        model, _, settings = load_task_model(
            folder,
            TASK_NAME,
            _build,
            device=device,
            model_type=PointerGenerator,
        )
        tokenizer = TextTokenizer.load(Path(folder) / "tokenizer.json")
        return cls(
            model,
            tokenizer,
            max_source_length=settings.max_source_length,
            max_target_length=settings.max_target_length,
            settings=settings,
        )

    def summarize(self, documents: Sequence[str], *, batch_size: int = 32) -> list[Summary]:
        """Summarize ``documents`` (greedy decoding, no repeated trigram).

        Raises:
            ValueError: an empty (or whitespace-only) document, naming its position.
        """
        for i, document in enumerate(documents):
            if not isinstance(document, str) or not document.strip():
                raise ValueError(f"document {i} is empty: there is nothing to summarize")
        encoded = [encode_with_oov(self.tokenizer, d, self.max_source_length) for d in documents]
        device = next(self.model.parameters()).device
        summaries: list[Summary] = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            items = [(i, d, [EOS_ID]) for i, d in enumerate(chunk)]
            batch = collate_pointer(items, self.tokenizer.vocab_size).to(device)
            outputs, weights = pointer_greedy_decode(
                self.model, batch, max_length=self.max_target_length
            )
            for d, ids, w in zip(chunk, outputs, weights, strict=True):
                words = ids_to_words(ids, self.tokenizer, d.oovs)
                summaries.append(Summary(detokenize(words), words, d.words, w[:, : len(d.words)]))
        return summaries


def evaluate_summarizer(
    summarizer: Summarizer, pairs: Sequence[Pair], *, lead_sentences: int = 1
) -> dict[str, Any]:
    """ROUGE-1/2/L of the model and of the lead baseline on ``pairs``.

    Args:
        summarizer: the model.
        pairs: ``Pair(document, reference summary)``.
        lead_sentences: sentences of the lead baseline (1: first sentence; 3: lead-3).

    Returns:
        ``{"model": {...}, "lead": {...}, "count": n, "lead_sentences": k}``.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    references = [p.target for p in pairs]
    predictions = [s.text for s in summarizer.summarize([p.source for p in pairs])]
    lead = [lead_baseline(p.source, lead_sentences) for p in pairs]
    return {
        "model": rouge_scores(predictions, references),
        "lead": rouge_scores(lead, references),
        "count": len(pairs),
        "lead_sentences": lead_sentences,
    }
