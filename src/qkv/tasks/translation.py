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
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    from qkv.tasks.translation_memory import TranslationMemory

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
#: The model size when ``preset`` is not given and the corpus is not small.
DEFAULT_PRESET = "tiny"


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
        preset: ``"tiny"``, ``"small"`` or ``"base"`` (see :mod:`qkv.models`); ``None``:
            sized to a small corpus (:mod:`qkv.tasks.translation_defaults`), else ``"tiny"``.
        copy: copy attention (a pointer-generator switch, :mod:`qkv.models.copy`): the model
            can copy source tokens into its output, even ones its target vocabulary lacks
            (Transformer, or an RNN with attention).
        copy_unknown_rate: with ``copy``, the probability that training hides a copyable
            source token as ``<unk>`` and asks the model to copy it from its position (so that
            it learns to copy words it has never seen).
        memory: a translation memory as extra input (neural fuzzy repair,
            :mod:`qkv.tasks.translation_memory`): each source is followed by ``<sep>`` and the
            target of the most similar training pair, so the model can repair a close match;
            saved with the model. ``None``: sized to the corpus
            (:mod:`qkv.tasks.translation_defaults`; filled in and saved).
        memory_threshold: with ``memory``, the lowest sentence chrF (0-100) of a match that is
            attached; below it the input is the source alone.
        size_defaults: below 10,000 training pairs, size the choices left open (BPE
            vocabulary, model size, dropout, step budget) to the corpus and say why
            (:mod:`qkv.tasks.translation_defaults`).
        model_overrides: fields of the model config to change, e.g. ``{"dropout": 0.0}``.
        tokenizer: ``"char"``, ``"bpe"``, or ``"auto"`` (characters for ``dates`` and
            ``numbers``, byte-level BPE otherwise).
        vocab_size: BPE vocabulary size (default 8,000).
        shared_vocab: one vocabulary for both sides (lets the Transformer tie all embeddings).
        batch_size: pairs per batch (per process under DDP); ``None``: sized to a small
            corpus (:data:`~qkv.tasks.translation_defaults.SMALL_BATCH`), else
            :data:`~qkv.tasks.translation_defaults.DEFAULT_BATCH_SIZE` (filled in and saved).
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
    preset: str | None = None
    copy: bool = False
    copy_unknown_rate: float = 0.1
    memory: bool | None = None
    memory_threshold: float = 0.0
    size_defaults: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: Literal["auto", "char", "bpe"] = "auto"
    vocab_size: int | None = None
    shared_vocab: bool = True
    batch_size: int | None = None
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
        _check_choice("preset", self.preset, (None, "tiny", "small", "base"))
        if self.copy and self.model == "rnn" and self.attention == "none":
            raise ValueError(
                "copy=True copies through the attention: an RNN with attention='none' has "
                "none to copy with"
            )
        if self.model == "rnn" and "d_model" in self.model_overrides:
            raise ValueError(
                f"model_overrides d_model={self.model_overrides['d_model']!r} (--d-model) is "
                "the Transformer's width; an RNN's sizes are embed_dim and hidden_dim"
            )
        if self.model == "rnn":
            _check_choice("attention", self.attention, ("bahdanau", "luong", "none", None))
        elif self.attention is not None:
            raise ValueError(
                f"attention={self.attention!r} is for model='rnn'; the Transformer always uses "
                "scaled dot-product attention (leave attention unset)"
            )
        for name in ("max_source_length", "max_target_length", "valid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "max_tokens", "vocab_size", "max_decode_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.copy_unknown_rate < 1.0:
            raise ValueError(f"copy_unknown_rate must be in [0, 1), got {self.copy_unknown_rate}")
        if not 0.0 <= self.memory_threshold <= 100.0:
            raise ValueError(
                f"memory_threshold must be in [0, 100] (a chrF), got {self.memory_threshold}"
            )
        if self.memory is False and self.memory_threshold > 0:
            _threshold_without_memory(self.memory_threshold)
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


def _threshold_without_memory(threshold: float) -> None:
    raise ValueError(
        f"memory_threshold={threshold} (--memory-threshold) chooses the matches of a "
        "translation memory, and this run has none: add memory=True (--memory)"
    )


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
    from qkv.models import (
        CopyRNNConfig,
        CopyTransformerConfig,
        RNNConfig,
        TransformerConfig,
        build_model,
    )

    sizes = {
        "src_vocab_size": tokenizer.source.vocab_size,
        "tgt_vocab_size": tokenizer.target.vocab_size,
    }
    model_config: TransformerConfig | RNNConfig
    if config.model == "transformer":
        tie = "all" if tokenizer.shared else "decoder"
        options = {"tie_embeddings": tie, **config.model_overrides}
        kind = CopyTransformerConfig if config.copy else TransformerConfig
        model_config = kind.from_name(config.preset or DEFAULT_PRESET, **sizes, **options)
    else:
        options = {"attention": config.attention or "bahdanau", **config.model_overrides}
        rnn_kind = CopyRNNConfig if config.copy else RNNConfig
        model_config = rnn_kind.from_name(config.preset or DEFAULT_PRESET, **sizes, **options)
    as_dict = model_config.to_dict()
    model = build_model(as_dict)
    if config.copy:
        from qkv.tasks.translation_copy import source_to_target_ids

        model.set_source_to_target(source_to_target_ids(tokenizer))  # type: ignore[operator]
    return model, as_dict


def _build_from_dict(model_config: dict[str, Any]) -> nn.Module:
    from qkv.models import build_model

    return build_model(model_config)


# --------------------------------------------------------------------------------------------
# The task the trainer runs


def _unwrap(model: nn.Module) -> Any:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def split_target(target: Tensor) -> tuple[Tensor, Tensor]:
    """``<bos> y <eos>`` ids ``(B, Nt + 1)`` -> decoder input and labels, each ``(B, Nt)``."""
    return target[:, :-1], target[:, 1:]


class TranslationTask:
    """Teacher-forced, label-smoothed cross-entropy; validation decodes greedily.

    Args:
        tokenizer: the pair tokenizer.
        validation: pairs to decode at each validation.
        config: the translation settings (label smoothing, metric, decode length).
        memory: the translation memory the validation sources are matched in (with
            ``config.memory``).
    """

    name = TASK_NAME

    def __init__(
        self,
        tokenizer: PairTokenizer,
        validation: Sequence[Pair],
        config: TranslationSettings,
        memory: TranslationMemory | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.validation = list(validation)
        self.config = config
        self.memory = memory
        sources = [p.source for p in self.validation]
        # the model's inputs of the validation sources (matched once: the memory is fixed)
        self._inputs = memory.inputs(sources) if memory is not None else sources
        self.metric: str = config.metric
        self.higher_is_better = config.metric != "loss"

    def loss(self, model: nn.Module, batch: PairBatch) -> LossOutput:
        target_in, labels = split_target(batch.target)
        if self.config.copy:
            return self._copy_loss(model, batch, target_in, labels)
        logits = model(batch.source, target_in)  # (B, Nt, V)
        total = nn.functional.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=0,
            reduction="sum",
            label_smoothing=self.config.label_smoothing,
        )
        return LossOutput(total=total, count=int((labels != 0).sum()), tokens=batch.num_tokens)

    def _copy_loss(
        self, model: nn.Module, batch: PairBatch, target_in: Tensor, labels: Tensor
    ) -> LossOutput:
        """The copy model's loss: extended log probabilities, and (training only) some source
        tokens hidden as ``<unk>`` so that copying unknown words is learned."""
        from qkv.tasks.translation_copy import copy_loss, simulate_unknowns

        vocab = self.tokenizer.target.vocab_size
        source = batch.source
        if model.training and self.config.copy_unknown_rate > 0:
            mapping = _unwrap(model).source_to_target
            source, labels = simulate_unknowns(
                source, labels, mapping, vocab, self.config.copy_unknown_rate
            )
        log_probs = model(source, target_in)  # (B, Nt, V + X)
        total = copy_loss(log_probs, labels, self.config.label_smoothing, vocab)
        return LossOutput(total=total, count=int((labels != 0).sum()), tokens=batch.num_tokens)

    def validate(self, model: nn.Module) -> dict[str, float]:
        from qkv.tasks.evaluation import score_translations

        device = next(model.parameters()).device
        translator = Translator(
            model, self.tokenizer, self.config, device=device, memory=self.memory
        )
        hypotheses = translator.translate_inputs(self._inputs)
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
        pairs = [replace(p, source=x) for p, x in zip(self.validation, self._inputs, strict=True)]
        dataset = PairDataset.from_pairs(
            pairs,
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


def _with_memory(
    settings: TranslationSettings,
    train: Sequence[Pair],
    tokenizer: PairTokenizer,
    folder: Path | None,
) -> tuple[TranslationMemory | None, Sequence[Pair]]:
    """The translation memory of a run (``None`` without ``settings.memory``) and the training
    pairs as the model reads them (each source with the match of another pair). A new run
    builds the memory from its training pairs and adds the separator to the vocabulary; a
    resumed one reads both back from its folder."""
    if not settings.memory:
        return None, train
    from qkv.tasks.translation_memory import TranslationMemory, add_separator

    if folder is None:
        memory = TranslationMemory.from_pairs(train, threshold=settings.memory_threshold)
        add_separator(tokenizer)
    else:
        memory = _load_memory(folder)
    if [p.source for p in train] != memory.sources:
        raise ValueError(
            f"the training data ({len(train)} pairs) is not the translation memory saved with "
            f"the model ({len(memory.pairs)} pairs): resume with the data the run was trained on"
        )
    inputs = memory.training_inputs()
    return memory, [replace(p, source=x) for p, x in zip(train, inputs, strict=True)]


def _with_files(tokenizer: PairTokenizer, memory: TranslationMemory) -> Any:
    """What saves the tokenizer and the memory into the model folder."""
    from qkv.tasks.translation_memory import FolderParts

    return FolderParts(tokenizer, memory)


def _load_memory(folder: Path) -> TranslationMemory:
    """The memory saved in a model folder (a :class:`ModelFolderError` when it is missing or
    unreadable)."""
    from qkv.tasks.translation_memory import TranslationMemory

    try:
        return TranslationMemory.load(folder)
    except (FileNotFoundError, ValueError) as error:
        raise ModelFolderError(f"{error} (the model was trained with --memory)") from None


def _set_max_length(settings: TranslationSettings, value: int) -> TranslationSettings:
    return replace(settings, max_source_length=value, max_target_length=value)


def _no_size_defaults(settings: TranslationSettings, value: bool) -> TranslationSettings:
    return replace(settings, size_defaults=not value)


def _no_memory(settings: TranslationSettings, value: bool) -> TranslationSettings:
    if value and settings.memory:
        raise ValueError("--memory and --no-memory contradict each other: give one")
    return replace(settings, memory=False) if value else settings


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
        Flag(
            "--preset",
            "preset",
            "model size (default: sized to a small corpus, else tiny)",
            choices=("tiny", "small", "base"),
        ),
        Flag(
            "--copy",
            "copy",
            "copy attention: the model may copy source tokens (names, numbers) into its output",
            switch=True,
        ),
        Flag(
            "--copy-unknown-rate",
            "copy_unknown_rate",
            "with --copy: how often training hides a source token as <unk> to be copied",
            float,
        ),
        Flag(
            "--memory",
            "memory",
            "translation memory (neural fuzzy repair): give the model the target of the most "
            "similar training pair after the source, saved with the model (default off: "
            "docs/small-corpus.md)",
            switch=True,
        ),
        Flag(
            "--no-memory",
            None,
            "no translation memory (the default)",
            switch=True,
            apply=_no_memory,
        ),
        Flag(
            "--memory-threshold",
            "memory_threshold",
            "with --memory: the lowest chrF (0-100) of a match that is given to the model",
            float,
        ),
        Flag("--dropout", "model_overrides.dropout", "override the preset's dropout", float),
        Flag(
            "--d-model",
            "model_overrides.d_model",
            "override the Transformer preset's width (d_model, a multiple of its heads)",
            int,
        ),
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
        Flag(
            "--no-size-defaults",
            None,
            "keep vocabulary, model size, dropout and step budget at their defaults on a "
            "small corpus",
            switch=True,
            apply=_no_size_defaults,
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
        from qkv.tasks.translation_defaults import DEFAULT_BATCH_SIZE, SizedChoices, size_to_data

        # a resumed run keeps the settings, model and training it saved
        choices = SizedChoices(settings)
        if folder is None:
            choices = size_to_data(settings, len(splits.train))
        settings = choices.settings
        batch_size = DEFAULT_BATCH_SIZE if settings.batch_size is None else settings.batch_size
        settings = replace(settings, batch_size=batch_size, memory=bool(settings.memory))
        if not settings.memory and settings.memory_threshold > 0:
            _threshold_without_memory(settings.memory_threshold)
        tokenizer = (
            PairTokenizer.load(folder) if folder else _train_tokenizer(settings, splits.train)
        )
        memory, train_pairs = _with_memory(settings, splits.train, tokenizer, folder)
        if settings.max_decode_length is None:
            cap = 2 * settings.max_target_length
            settings = replace(
                settings, max_decode_length=_decode_length(splits.train, tokenizer, cap)
            )
        if folder is not None:
            model_config = read_config(folder)["model"]
            model = _build_from_dict(model_config)
        else:
            overrides = {**choices.model_overrides, **settings.model_overrides}
            model, model_config = build_translation_model(
                replace(settings, model_overrides=overrides), tokenizer
            )
        validation = (splits.validation or splits.train)[: settings.valid_size]
        train_set = PairDataset.from_pairs(
            train_pairs,
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
            objective=TranslationTask(tokenizer, validation, settings, memory),
            train_set=train_set,
            collate=collate_pairs,
            batch_size=batch_size,
            max_tokens=settings.max_tokens,
            tokenizer=tokenizer if memory is None else _with_files(tokenizer, memory),
            notes=choices.notes,
            training=choices.training,
        )

    def load(self, folder: Path, *, device: str = "auto") -> Translator:
        return Translator.load(folder, device=device)

    def evaluate(
        self, predictor: Translator, examples: Sequence[Pair], options: EvalOptions
    ) -> dict[str, Any]:
        from qkv.tasks.evaluation import score_translations
        from qkv.tasks.translation_baselines import translation_baselines

        sources = [p.source for p in examples]
        references = [p.target for p in examples]
        hypotheses = predictor.translate(sources, beam_size=options.beam_size)
        scores = score_translations(
            hypotheses, references, sources, num_buckets=options.num_buckets
        ).to_dict()
        train_pairs: list[tuple[str, str]] | None
        if predictor.memory is not None:  # the pairs the model was trained on, saved with it
            train_pairs, note = list(predictor.memory.pairs), None
        else:
            train_pairs, note = self._training_pairs(predictor.config)
        scores["baselines"] = translation_baselines(
            sources, references, train_pairs, num_buckets=options.num_buckets
        )
        scores["baselines_note"] = note
        return scores

    def _training_pairs(
        self, settings: TranslationSettings
    ) -> tuple[list[tuple[str, str]] | None, str | None]:
        """The pairs the model was trained on (what retrieval searches), or ``None`` and why
        not (the training data moved or cannot be read)."""
        from qkv.data import DataError

        try:
            train = self.load_splits(settings.data, dict(settings.data_options)).train
        except (OSError, DataError, ValueError) as error:
            return None, f"no retrieval baseline: the training data cannot be read ({error})"
        return [(p.source, p.target) for p in train], None

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        from qkv.tasks.evaluation import format_translation_scores
        from qkv.tasks.translation_baselines import format_baselines

        return [
            *format_translation_scores(evaluation.metrics),
            *format_baselines(evaluation.metrics),
        ]


# --------------------------------------------------------------------------------------------
# Inference


class Translator:
    """A trained model with its tokenizer: text in, text out.

    Args:
        model: a :class:`~qkv.models.Seq2SeqModel`.
        tokenizer: its tokenizer.
        config: the translation settings it was trained with.
        device: where to run (default: the model's).
        memory: the translation memory of a model trained with ``config.memory`` (each source
            is given with its fuzzy match, :mod:`qkv.tasks.translation_memory`).

    Raises:
        ValueError: ``memory`` missing for a model trained with one, or given to one trained
            without.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PairTokenizer,
        config: TranslationSettings,
        *,
        device: torch.device | None = None,
        memory: TranslationMemory | None = None,
    ) -> None:
        if bool(config.memory) != (memory is not None):
            raise ValueError(
                f"memory is {'None' if memory is None else 'given'} but the model was trained "
                f"with memory={config.memory}: a model reads fuzzy matches exactly when it was "
                "trained with them"
            )
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.config = config
        self.memory = memory

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
        memory = _load_memory(folder) if settings.memory else None
        return cls(model, tokenizer, settings, memory=memory)

    @property
    def max_length(self) -> int:
        return self.config.max_decode_length or 2 * self.config.max_target_length

    def inputs(self, texts: Sequence[str]) -> list[str]:
        """What the model reads for ``texts``: the texts, or with a translation memory each
        followed by ``<sep>`` and its fuzzy match."""
        return list(texts) if self.memory is None else self.memory.inputs(texts)

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
        return self.translate_inputs(
            self.inputs(texts),
            beam_size=beam_size,
            length_penalty=length_penalty,
            batch_size=batch_size,
        )

    def translate_inputs(
        self,
        texts: Sequence[str],
        *,
        beam_size: int = 1,
        length_penalty: float = 0.6,
        batch_size: int = 128,
    ) -> list[str]:
        """:meth:`translate` of model inputs already built by :meth:`inputs`."""
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
            texts_of_chunk = [texts[i] for i in chunk]
            for i, text in zip(chunk, self._decode_rows(texts_of_chunk, source, ids), strict=True):
                results[i] = text
        return results

    def _decode_rows(
        self, texts: Sequence[str], source: Tensor, ids: Sequence[Sequence[int]]
    ) -> list[str]:
        """Texts of generated ``ids``; with copy attention, ids past the target vocabulary are
        copied source tokens, written as the source has them."""
        target = self.tokenizer.target
        if not self.config.copy:
            return [target.decode(row) for row in ids]
        from qkv.tasks.translation_copy import decode_copied, source_pieces

        positions = self.model.extended_positions(source)  # type: ignore[operator]
        return [
            decode_copied(target, row, source_pieces(self.tokenizer.source, text), where)
            for text, row, where in zip(texts, ids, positions, strict=True)
        ]

    def copy_probabilities(
        self, text: str, translation: str | None = None
    ) -> tuple[Tensor, list[str]]:
        """How much of each target token was copied: ``1 - p_gen`` per step ``(Nt,)`` on the
        CPU, and the target token labels (``</s>`` last), for a picture of which tokens the
        model copied rather than generated.

        Raises:
            ValueError: the model has no copy attention (trained without ``--copy``).
        """
        if not self.config.copy:
            raise ValueError(
                "copy_probabilities needs a model trained with copy attention (--copy)"
            )
        if translation is None:
            translation = self.translate([text])[0]
        source = self._encode_sources(self.inputs([text])).to(self.device)  # (1, Ns)
        target_ids = self.tokenizer.target.encode(translation, add_bos=True, add_eos=True)
        target_in = torch.tensor([target_ids[:-1]], device=self.device)  # (1, Nt)
        with torch.no_grad():
            out = self.model.copy_forward(source, target_in)  # type: ignore[operator]
        labels = [*self.tokenizer.target.tokens(translation), "</s>"]
        return (1.0 - out.p_gen[0]).float().cpu(), labels

    def attention(
        self, text: str, translation: str | None = None
    ) -> tuple[Tensor, list[str], list[str]]:
        """The cross-attention of one sentence (averaged over heads, last decoder layer).

        Args:
            text: the source sentence.
            translation: the target to align with (default: the model's own translation).

        Returns:
            ``weights (Nt, Ns)`` on the CPU, the source token labels (``Ns``, with ``</s>``;
            with a translation memory, the fuzzy match after ``<sep>`` too), and the target
            token labels (``Nt``: each row is the attention used to produce
            that token, ``</s>`` last).
        """
        if translation is None:
            translation = self.translate([text])[0]
        text = self.inputs([text])[0]
        source_ids = self.tokenizer.source.encode(text, add_eos=True)
        target_ids = self.tokenizer.target.encode(translation, add_bos=True, add_eos=True)
        source = torch.tensor([source_ids], device=self.device)  # (1, Ns)
        target_in = torch.tensor([target_ids[:-1]], device=self.device)  # (1, Nt)
        weights = self.model.cross_attention(source, target_in)  # type: ignore[operator]
        source_labels = [*self.tokenizer.source.tokens(text), "</s>"]
        target_labels = [*self.tokenizer.target.tokens(translation), "</s>"]
        return weights.float().cpu(), source_labels, target_labels


SPEC = TranslationSpec()
