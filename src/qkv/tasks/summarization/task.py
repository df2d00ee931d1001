"""Summarization as a task: the loss and validation the trainer runs, the settings, the spec.

Training is :func:`qkv.tasks.train_task` with :data:`SPEC` (:class:`SummarizationTask` (summed
negative log-likelihood of the summary tokens, plus the coverage loss when enabled; validation
decodes greedily and reports ROUGE-L, which early stopping watches)).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from qkv.data.labeled import load_documents
from qkv.data.parallel import Pair, read_pairs
from qkv.data.registry import Splits
from qkv.data.tokenizer import PAD_ID, SPECIAL_TOKENS, PairTokenizer, TextTokenizer
from qkv.models.pointer import PointerGenerator, PointerGeneratorConfig
from qkv.tasks.base import (
    EvalOptions,
    Evaluation,
    Flag,
    Prepared,
    Settings,
    TaskSpec,
)
from qkv.tasks.summarization.batches import PointerBatch, PointerDataset, collate_pointer
from qkv.tasks.summarization.decoding import decode_dataset
from qkv.tasks.summarization.inference import Summarizer, evaluate_summarizer
from qkv.tasks.summarization.metrics import rouge_scores
from qkv.tasks.summarization.vocab import train_word_tokenizer
from qkv.train import LossOutput, read_config

__all__ = [
    "SPEC",
    "SummarizationSettings",
    "SummarizationSetup",
    "SummarizationSpec",
    "SummarizationTask",
]

logger = logging.getLogger(__name__)

TASK_NAME = "summarization"


class SummarizationTask:
    """Summed NLL of the summary tokens (+ coverage loss); validation decodes and scores.

    Args:
        validation: validation pairs, tokenized, with their reference summaries.
        references: the reference summary texts, aligned with ``validation``.
        tokenizer: the word tokenizer.
        coverage_weight: weight of the coverage loss (used if the model has coverage).
        batch_size: validation batch size.
        max_length: decoding limit.
    """

    name = TASK_NAME
    metric = "rougeL"
    higher_is_better = True

    def __init__(
        self,
        validation: PointerDataset,
        references: Sequence[str],
        tokenizer: TextTokenizer,
        *,
        coverage_weight: float = 1.0,
        batch_size: int = 32,
        max_length: int = 40,
    ) -> None:
        self.validation = validation
        self.references = list(references)
        self.tokenizer = tokenizer
        self.coverage_weight = coverage_weight
        self.batch_size = batch_size
        self.max_length = max_length

    def loss(self, model: nn.Module, batch: PointerBatch) -> LossOutput:
        out = model(batch.source, batch.source_ext, batch.num_oov, batch.target_in)
        real = batch.target_out != PAD_ID  # (B, Nt)
        nll = -out.log_probs.gather(2, batch.target_out.unsqueeze(-1)).squeeze(-1)  # (B, Nt)
        total = (nll * real).sum()
        if self.coverage_weight > 0:
            total = total + self.coverage_weight * (out.coverage_loss * real).sum()
        tokens = int((batch.source != PAD_ID).sum() + real.sum())
        return LossOutput(total, int(real.sum()), tokens)

    def validate(self, model: nn.Module) -> dict[str, float]:
        if not len(self.validation):
            return {self.metric: float("nan")}
        predictions = decode_dataset(
            _unwrap(model), self.validation, self.tokenizer, self.batch_size, self.max_length
        )
        return rouge_scores(predictions, self.references)


def _unwrap(model: nn.Module) -> PointerGenerator:
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps it in .module
    if not isinstance(inner, PointerGenerator):
        raise TypeError(f"expected a PointerGenerator, got {type(inner).__name__}")
    return inner


@dataclass(frozen=True)
class SummarizationSettings(Settings):
    """What to build before training (saved in ``config.json`` under ``"summarization"``).

    Attributes:
        data: a spec for :func:`qkv.data.load_documents` (``builtin:docstrings``, a
            JSONL/TSV file, a folder).
        preset: a :data:`qkv.models.pointer.POINTER_PRESETS` name.
        vocab_size: words in the fixed vocabulary.
        max_source_length: words kept per document.
        max_target_length: words kept per summary (``<eos>`` included).
        batch_size: examples per training batch.
        coverage_weight: weight of the coverage loss (with a coverage model).
        validation_limit: decode at most this many validation examples per validation.
        model_overrides: fields of :class:`PointerGeneratorConfig` replacing the preset's.
        data_options: options of :func:`qkv.data.load_documents`.
    """

    data: str = "builtin:docstrings"
    preset: str = "small"
    vocab_size: int = 10_000
    max_source_length: int = 200
    max_target_length: int = 40
    batch_size: int = 32
    coverage_weight: float = 1.0
    validation_limit: int = 300
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_source_length", "max_target_length", "batch_size", "validation_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_target_length < 2:
            raise ValueError(f"max_target_length must be >= 2, got {self.max_target_length}")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed 4, got {self.vocab_size}")
        if self.coverage_weight < 0:
            raise ValueError(f"coverage_weight must be >= 0, got {self.coverage_weight}")


#: The earlier name of :class:`SummarizationSettings` (kept so existing code keeps working).
SummarizationSetup = SummarizationSettings


def lead_sentences_for(data: str) -> int:
    """Sentences of the lead baseline: three for ``aclsum`` / ``aclsum-summary`` (lead-3,
    as their abstracts' summaries are several sentences), else one."""
    return 3 if data in ("builtin:aclsum", "builtin:aclsum-summary") else 1


class SummarizationSpec(TaskSpec[SummarizationSettings, Summarizer]):
    """Summarization as a :class:`~qkv.tasks.base.TaskSpec`: ROUGE of the model and the lead."""

    name = TASK_NAME
    settings_type = SummarizationSettings
    summary = "abstractive summarization with a pointer-generator (See et al. 2017)"
    metric_name = "ROUGE-L"
    default_steps = 3000
    train_flags = (
        Flag(
            "--document-field",
            "data_options.document_field",
            "JSONL document field (default document)",
            reader=True,
        ),
        Flag(
            "--summary-field",
            "data_options.summary_field",
            "JSONL summary field (default summary)",
            reader=True,
        ),
        Flag("--preset", "preset", "model size", choices=("tiny", "cpu", "small", "see2017")),
        Flag(
            "--coverage",
            "model_overrides.coverage",
            "add the coverage mechanism and loss",
            switch=True,
        ),
        Flag("--coverage-weight", "coverage_weight", "weight of the coverage loss", float),
        Flag("--vocab-size", "vocab_size", "word vocabulary", int),
        Flag("--max-source-length", "max_source_length", "words per document", int),
        Flag("--max-target-length", "max_target_length", "words per summary", int),
        Flag(
            "--valid-size", "validation_limit", "validation documents decoded per validation", int
        ),
    )

    def legacy_settings(self, config: dict[str, Any]) -> dict[str, Any] | None:
        # Folders written before the settings had a section kept a few of them under "data".
        data = config.get("data")
        if not isinstance(data, dict) or "spec" not in data:
            return None
        keys = ("max_source_length", "max_target_length", "preset")
        legacy = {"data": data["spec"], "data_options": data.get("options") or {}}
        return {**legacy, **{k: data[k] for k in keys if k in data}}

    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[Pair]:
        return load_documents(data, **options)

    def read_file(self, path: str, options: dict[str, Any]) -> list[Pair]:
        return read_pairs(
            path,
            source_field=options.get("document_field", "document"),
            target_field=options.get("summary_field", "summary"),
        )

    def prepare(
        self, settings: SummarizationSettings, splits: Splits[Pair], *, folder: Path | None
    ) -> Prepared:
        if folder is not None:
            tokenizer = TextTokenizer.load(folder / "tokenizer.json")
            config = PointerGeneratorConfig.from_dict(read_config(folder)["model"])
        else:
            tokenizer = train_word_tokenizer(
                [t for p in splits.train for t in (p.source, p.target)],
                vocab_size=settings.vocab_size,
            )
            config = PointerGeneratorConfig.from_name(
                settings.preset, vocab_size=tokenizer.vocab_size, **settings.model_overrides
            )
        logger.info("summarization: %s, %s", splits.sizes(), config)
        dataset = partial(
            PointerDataset.from_pairs,
            tokenizer=tokenizer,
            max_source_length=settings.max_source_length,
            max_target_length=settings.max_target_length,
        )
        held = splits.validation[: settings.validation_limit]
        task = SummarizationTask(
            dataset(held),
            [p.target for p in held],
            tokenizer,
            coverage_weight=settings.coverage_weight if config.coverage else 0.0,
            batch_size=2 * settings.batch_size,
            max_length=settings.max_target_length,
        )
        return Prepared(
            settings=settings,
            model=PointerGenerator(config),
            model_config=config.to_dict(),
            objective=task,
            train_set=dataset(splits.train),
            collate=partial(collate_pointer, vocab_size=tokenizer.vocab_size),
            batch_size=settings.batch_size,
            tokenizer=PairTokenizer(tokenizer),
        )

    def load(self, folder: Path, *, device: str = "auto") -> Summarizer:
        return Summarizer.load(folder, device=device)

    def evaluate(
        self, predictor: Summarizer, examples: Sequence[Pair], options: EvalOptions
    ) -> dict[str, Any]:
        data = predictor.settings.data if predictor.settings is not None else ""
        return evaluate_summarizer(predictor, examples, lead_sentences=lead_sentences_for(data))

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        """ROUGE-1/2/L F1 of the model and of the lead baseline, one row each."""
        metrics = evaluation.metrics
        lines = [f"  {'':<12} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}"]
        rows = [("model", metrics["model"]), (f"lead-{metrics['lead_sentences']}", metrics["lead"])]
        for name, scores in rows:
            lines.append(
                f"  {name:<12} {scores['rouge1']:>8.2f} {scores['rouge2']:>8.2f} "
                f"{scores['rougeL']:>8.2f}"
            )
        return lines


SPEC = SummarizationSpec()
