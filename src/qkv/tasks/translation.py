"""Translation end to end: data -> tokenizer -> model -> :class:`~qkv.train.Trainer` -> decoding.

::

    from qkv.tasks.translation import TranslationSettings, train_translation, Translator

    outcome = train_translation(TranslationSettings(data="builtin:dates"),
                                TrainConfig(max_steps=2000), out="dates-model")
    translator = Translator.load("dates-model")
    translator.translate(["3 mars 1998"])             # ['1998-03-03']

The model folder holds ``config.json`` with three sections (``translation``: this module's
:class:`TranslationSettings`; ``model``: what :func:`qkv.models.build_model` rebuilds;
``training``: the :class:`~qkv.train.TrainConfig`), the weights, the tokenizer and the training
state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qkv.data import (
    BucketBatchSampler,
    Pair,
    PairBatch,
    PairDataset,
    PairTokenizer,
    Splits,
    collate_pairs,
    load_pairs,
    read_pairs,
)
from qkv.tasks.base import (
    EvalOptions,
    Evaluation,
    Flag,
    Prepared,
    Settings,
    TaskSpec,
    TrainOutcome,
    load_task_model,
    train_task,
)
from qkv.train import (
    EvalReport,
    LossOutput,
    StepReport,
    TrainConfig,
    read_config,
)
from qkv.train.checkpoint import ModelFolderError

__all__ = [
    "SPEC",
    "TranslationConfig",
    "TranslationOutcome",
    "TranslationSettings",
    "TranslationSpec",
    "TranslationTask",
    "Translator",
    "build_translation_model",
    "train_translation",
]

logger = logging.getLogger(__name__)

ModelKind = Literal["transformer", "rnn"]
AttentionKind = Literal["bahdanau", "luong", "none"]
Metric = Literal["exact_match", "chrf", "bleu", "loss"]
TASK_NAME = "translation"


@dataclass(frozen=True)
class TranslationSettings(Settings):
    """What to translate and with which model (the training loop has :class:`TrainConfig`).

    Attributes:
        data: a :func:`qkv.data.load_pairs` spec: ``builtin:NAME``, a file, ``SRC,TGT`` files
            or a folder.
        data_options: keyword options of the data loader (e.g. ``{"n_train": 20000}``).
        model: ``"transformer"`` or ``"rnn"``.
        attention: the RNN's attention, ``"bahdanau"``, ``"luong"`` or ``"none"`` (the
            Transformer always uses scaled dot-product attention: leave this ``None``).
        preset: ``"tiny"``, ``"small"`` or ``"base"`` (see :mod:`qkv.models`).
        model_overrides: fields of the model config to change, e.g. ``{"dropout": 0.0}``.
        tokenizer: ``"char"``, ``"bpe"``, or ``"auto"`` (characters for ``dates`` and
            ``numbers``, byte-level BPE otherwise).
        vocab_size: BPE vocabulary size (default 8,000).
        shared_vocab: one vocabulary for both sides (lets the Transformer tie all embeddings).
        batch_size: pairs per batch (per process under DDP).
        max_tokens: also cap padded tokens per batch.
        max_source_length, max_target_length: longer sequences are cut (specials included).
        label_smoothing: of the cross-entropy, in ``[0, 1)``.
        metric: the validation metric early stopping watches.
        valid_size: validation pairs decoded at each validation.
        max_decode_length: most tokens generated per sentence; ``None``: from the data
            (filled in by :func:`train_translation` and saved).

    Raises:
        ValueError: a field out of range (named with its value).
    """

    data: str = "builtin:dates"
    data_options: dict[str, Any] = field(default_factory=dict)
    model: ModelKind = "transformer"
    attention: AttentionKind | None = None
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: Literal["auto", "char", "bpe"] = "auto"
    vocab_size: int | None = None
    shared_vocab: bool = True
    batch_size: int = 64
    max_tokens: int | None = None
    max_source_length: int = 256
    max_target_length: int = 256
    label_smoothing: float = 0.1
    metric: Metric = "chrf"
    valid_size: int = 500
    max_decode_length: int | None = None

    def __post_init__(self) -> None:
        _check_choice("model", self.model, ("transformer", "rnn"))
        _check_choice("tokenizer", self.tokenizer, ("auto", "char", "bpe"))
        _check_choice("metric", self.metric, ("exact_match", "chrf", "bleu", "loss"))
        if self.model == "rnn":
            _check_choice("attention", self.attention, ("bahdanau", "luong", "none", None))
        elif self.attention is not None:
            raise ValueError(
                f"attention={self.attention!r} is for model='rnn'; the Transformer always uses "
                "scaled dot-product attention (leave attention unset)"
            )
        for name in ("batch_size", "max_source_length", "max_target_length", "valid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens", "vocab_size", "max_decode_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def tokenizer_mode(self) -> Literal["char", "bpe"]:
        if self.tokenizer != "auto":
            return self.tokenizer
        name = self.data.removeprefix("builtin:") if self.data.startswith("builtin:") else ""
        return "char" if name in ("dates", "numbers") else "bpe"


#: The earlier name of :class:`TranslationSettings` (kept so existing code keeps working).
TranslationConfig = TranslationSettings


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")


# --------------------------------------------------------------------------------------------
# Model


def build_translation_model(
    config: TranslationSettings, tokenizer: PairTokenizer
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model for ``config`` sized to ``tokenizer``; returns it and its config dict
    (what :func:`qkv.models.build_model` rebuilds it from)."""
    from qkv.models import RNNConfig, TransformerConfig, build_model

    sizes = {
        "src_vocab_size": tokenizer.source.vocab_size,
        "tgt_vocab_size": tokenizer.target.vocab_size,
    }
    model_config: TransformerConfig | RNNConfig
    if config.model == "transformer":
        tie = "all" if tokenizer.shared else "decoder"
        options = {"tie_embeddings": tie, **config.model_overrides}
        model_config = TransformerConfig.from_name(config.preset, **sizes, **options)
    else:
        options = {"attention": config.attention or "bahdanau", **config.model_overrides}
        model_config = RNNConfig.from_name(config.preset, **sizes, **options)
    as_dict = model_config.to_dict()
    return build_model(as_dict), as_dict


def _build_from_dict(model_config: dict[str, Any]) -> nn.Module:
    from qkv.models import build_model

    return build_model(model_config)


# --------------------------------------------------------------------------------------------
# The task the trainer runs


def split_target(target: Tensor) -> tuple[Tensor, Tensor]:
    """``<bos> y <eos>`` ids ``(B, Nt + 1)`` -> decoder input and labels, each ``(B, Nt)``."""
    return target[:, :-1], target[:, 1:]


class TranslationTask:
    """Teacher-forced, label-smoothed cross-entropy; validation decodes greedily.

    Args:
        tokenizer: the pair tokenizer.
        validation: pairs to decode at each validation.
        config: the translation settings (label smoothing, metric, decode length).
    """

    name = TASK_NAME

    def __init__(
        self, tokenizer: PairTokenizer, validation: Sequence[Pair], config: TranslationSettings
    ) -> None:
        self.tokenizer = tokenizer
        self.validation = list(validation)
        self.config = config
        self.metric: str = config.metric
        self.higher_is_better = config.metric != "loss"

    def loss(self, model: nn.Module, batch: PairBatch) -> LossOutput:
        target_in, labels = split_target(batch.target)
        logits = model(batch.source, target_in)  # (B, Nt, V)
        total = nn.functional.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=0,
            reduction="sum",
            label_smoothing=self.config.label_smoothing,
        )
        return LossOutput(total=total, count=int((labels != 0).sum()), tokens=batch.num_tokens)

    def validate(self, model: nn.Module) -> dict[str, float]:
        from qkv.tasks.evaluation import score_translations

        device = next(model.parameters()).device
        translator = Translator(model, self.tokenizer, self.config, device=device)
        hypotheses = translator.translate([p.source for p in self.validation])
        scores = score_translations(
            hypotheses, [p.target for p in self.validation], [p.source for p in self.validation]
        )
        return {
            "exact_match": scores.exact_match,
            "chrf": scores.chrf,
            "bleu": scores.bleu,
            "loss": self._validation_loss(model, device),
        }

    def _validation_loss(self, model: nn.Module, device: torch.device) -> float:
        dataset = PairDataset.from_pairs(
            self.validation,
            self.tokenizer,
            max_source_length=self.config.max_source_length,
            max_target_length=self.config.max_target_length,
        )
        sampler = BucketBatchSampler(dataset.lengths(), batch_size=256, shuffle=False)
        total, count = 0.0, 0
        for indices in sampler:
            out = self.loss(model, collate_pairs([dataset[i] for i in indices]).to(device))
            total, count = total + float(out.total), count + out.count
        return total / max(count, 1)


# --------------------------------------------------------------------------------------------
# Training

#: What :func:`train_translation` returns (the folder, the trainer's result, the settings used
#: and the data splits).
TranslationOutcome = TrainOutcome


def _decode_length(pairs: Sequence[Pair], tokenizer: PairTokenizer, cap: int) -> int:
    """Room for the longest training target plus a margin for longer test sentences, at most
    ``cap`` (one very long target must not make every validation decode that long)."""
    longest = max(len(ids) for ids in tokenizer.target.encode_all([p.target for p in pairs]))
    return min(int(longest * 1.5) + 8, cap)


def train_translation(
    config: TranslationSettings | None,
    training: TrainConfig | None,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    on_eval: Callable[[EvalReport], None] | None = None,
) -> TranslationOutcome:
    """Train a translation model into the folder ``out`` (:func:`qkv.tasks.train_task`).

    Args:
        config: data, tokenizer and model choices (``None`` on resume: the saved ones).
        training: the training loop's settings; on resume only the limits and the device may
            differ from the saved run's (any other difference is refused, naming it).
        out: the model folder (created; must be empty, a qkv model folder with ``resume`` or
            ``overwrite``, or absent).
        resume: continue the run saved in ``out`` exactly where it stopped.
        overwrite: replace a model folder already in ``out``.
        on_step, on_eval: progress callbacks (see :class:`~qkv.train.Trainer`).

    Raises:
        ModelFolderError: ``out`` cannot be used (see :func:`~qkv.train.prepare_output_folder`).
        DataError: malformed data files (naming file and line).
        ValueError: bad settings, or settings changed on resume.
    """
    return train_task(
        SPEC,
        config,
        training,
        out,
        resume=resume,
        overwrite=overwrite,
        on_step=on_step,
        on_eval=on_eval,
    )


def _train_tokenizer(config: TranslationSettings, pairs: Sequence[Pair]) -> PairTokenizer:
    return PairTokenizer.train(
        pairs, mode=config.tokenizer_mode, vocab_size=config.vocab_size, shared=config.shared_vocab
    )


def _set_max_length(settings: TranslationSettings, value: int) -> TranslationSettings:
    return replace(settings, max_source_length=value, max_target_length=value)


def _set_separate_vocab(settings: TranslationSettings, value: bool) -> TranslationSettings:
    return replace(settings, shared_vocab=not value)


class TranslationSpec(TaskSpec[TranslationSettings, "Translator"]):
    """Translation as a :class:`~qkv.tasks.base.TaskSpec`: pairs in, BLEU/chrF/exact match out."""

    name = TASK_NAME
    settings_type = TranslationSettings
    summary = "sequence-to-sequence translation (Transformer or RNN with attention)"
    metric_name = "validation metric"
    train_flags = (
        Flag("--model", "model", "the architecture", choices=("transformer", "rnn")),
        Flag(
            "--attention",
            "attention",
            "the RNN's attention (default bahdanau); not for the Transformer",
            choices=("bahdanau", "luong", "none"),
        ),
        Flag("--preset", "preset", "model size", choices=("tiny", "small", "base")),
        Flag("--dropout", "model_overrides.dropout", "override the preset's dropout", float),
        Flag(
            "--tokenizer",
            "tokenizer",
            "auto: characters for dates/numbers, BPE otherwise",
            choices=("auto", "char", "bpe"),
        ),
        Flag("--vocab-size", "vocab_size", "BPE vocabulary size (default 8000)", int),
        Flag(
            "--separate-vocab",
            None,
            "separate source and target vocabularies",
            switch=True,
            apply=_set_separate_vocab,
        ),
        Flag("--label-smoothing", "label_smoothing", "of the cross-entropy", float),
        Flag(
            "--metric",
            "metric",
            "validation metric for early stopping",
            choices=("exact_match", "chrf", "bleu", "loss"),
        ),
        Flag("--valid-size", "valid_size", "validation pairs decoded per validation", int),
        Flag(
            "--max-length",
            None,
            "cut longer sequences (tokens; default 256)",
            int,
            apply=_set_max_length,
        ),
        Flag(
            "--source-field",
            "data_options.source_field",
            "JSONL source field (default source)",
            reader=True,
        ),
        Flag(
            "--target-field",
            "data_options.target_field",
            "JSONL target field (default target)",
            reader=True,
        ),
    )

    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[Pair]:
        return load_pairs(data, **options)

    def read_file(self, path: str, options: dict[str, Any]) -> list[Pair]:
        from qkv.data.parallel import _as_path_spec

        return read_pairs(_as_path_spec(path), **options)

    def prepare(
        self, settings: TranslationSettings, splits: Splits[Pair], *, folder: Path | None
    ) -> Prepared:
        tokenizer = (
            PairTokenizer.load(folder) if folder else _train_tokenizer(settings, splits.train)
        )
        if settings.max_decode_length is None:
            cap = 2 * settings.max_target_length
            settings = replace(
                settings, max_decode_length=_decode_length(splits.train, tokenizer, cap)
            )
        if folder is not None:
            model_config = read_config(folder)["model"]
            model = _build_from_dict(model_config)
        else:
            model, model_config = build_translation_model(settings, tokenizer)
        validation = (splits.validation or splits.train)[: settings.valid_size]
        train_set = PairDataset.from_pairs(
            splits.train,
            tokenizer,
            max_source_length=settings.max_source_length,
            max_target_length=settings.max_target_length,
        )
        logger.info(
            "training a %s (%d parameters) on %s: %d train / %d validation pairs",
            model_config["kind"],
            sum(p.numel() for p in model.parameters()),
            settings.data,
            len(splits.train),
            len(validation),
        )
        return Prepared(
            settings=settings,
            model=model,
            model_config=model_config,
            objective=TranslationTask(tokenizer, validation, settings),
            train_set=train_set,
            collate=collate_pairs,
            batch_size=settings.batch_size,
            max_tokens=settings.max_tokens,
            tokenizer=tokenizer,
        )

    def load(self, folder: Path, *, device: str = "auto") -> Translator:
        return Translator.load(folder, device=device)

    def evaluate(
        self, predictor: Translator, examples: Sequence[Pair], options: EvalOptions
    ) -> dict[str, Any]:
        from qkv.tasks.evaluation import score_translations

        sources = [p.source for p in examples]
        hypotheses = predictor.translate(sources, beam_size=options.beam_size)
        scores = score_translations(
            hypotheses, [p.target for p in examples], sources, num_buckets=options.num_buckets
        )
        return scores.to_dict()

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        from qkv.tasks.evaluation import format_translation_scores

        return format_translation_scores(evaluation.metrics)


# --------------------------------------------------------------------------------------------
# Inference


class Translator:
    """A trained model with its tokenizer: text in, text out.

    Args:
        model: a :class:`~qkv.models.Seq2SeqModel`.
        tokenizer: its tokenizer.
        config: the translation settings it was trained with.
        device: where to run (default: the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PairTokenizer,
        config: TranslationSettings,
        *,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "auto") -> Translator:
        """Load a model folder written by :func:`train_translation`.

        Raises:
            ModelFolderError: not a translation model folder, or its files do not fit.
        """
        folder = Path(path)
        model, _, settings = load_task_model(folder, TASK_NAME, _build_from_dict, device=device)
        try:
            tokenizer = PairTokenizer.load(folder)
        except FileNotFoundError as error:
            raise ModelFolderError(str(error)) from None
        return cls(model, tokenizer, settings)

    @property
    def max_length(self) -> int:
        return self.config.max_decode_length or 2 * self.config.max_target_length

    def _encode_sources(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer.source.encode_batch(
            texts, add_eos=True, max_length=self.config.max_source_length
        ).ids

    def translate(
        self,
        texts: Sequence[str],
        *,
        beam_size: int = 1,
        length_penalty: float = 0.6,
        batch_size: int = 128,
    ) -> list[str]:
        """Translations of ``texts``, in order (greedy for ``beam_size=1``).

        Sentences are decoded in batches of similar length (less padding), then put back.
        """
        from qkv.decode import beam_search, greedy_decode

        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[str] = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            source = self._encode_sources([texts[i] for i in chunk]).to(self.device)
            if beam_size == 1:
                ids = greedy_decode(self.model, source, max_len=self.max_length)  # type: ignore[arg-type]
            else:
                ids = beam_search(
                    self.model,  # type: ignore[arg-type]
                    source,
                    beam_size=beam_size,
                    length_penalty=length_penalty,
                    max_len=self.max_length,
                )
            for i, row in zip(chunk, ids, strict=True):
                results[i] = self.tokenizer.target.decode(row)
        return results

    def attention(
        self, text: str, translation: str | None = None
    ) -> tuple[Tensor, list[str], list[str]]:
        """The cross-attention of one sentence (averaged over heads, last decoder layer).

        Args:
            text: the source sentence.
            translation: the target to align with (default: the model's own translation).

        Returns:
            ``weights (Nt, Ns)`` on the CPU, the source token labels (``Ns``, with ``</s>``),
            and the target token labels (``Nt``: each row is the attention used to produce
            that token, ``</s>`` last).
        """
        if translation is None:
            translation = self.translate([text])[0]
        source_ids = self.tokenizer.source.encode(text, add_eos=True)
        target_ids = self.tokenizer.target.encode(translation, add_bos=True, add_eos=True)
        source = torch.tensor([source_ids], device=self.device)  # (1, Ns)
        target_in = torch.tensor([target_ids[:-1]], device=self.device)  # (1, Nt)
        weights = self.model.cross_attention(source, target_in)  # type: ignore[operator]
        source_labels = [*self.tokenizer.source.tokens(text), "</s>"]
        target_labels = [*self.tokenizer.target.tokens(translation), "</s>"]
        return weights.float().cpu(), source_labels, target_labels


SPEC = TranslationSpec()
