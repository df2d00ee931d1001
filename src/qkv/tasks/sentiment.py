"""Sentiment analysis (any text classification) end to end: train, save, classify, evaluate.

::

    from qkv.tasks import train_task
    from qkv.tasks.sentiment import SentimentSettings, TextClassifier, evaluate_classifier

    train_task("sentiment", SentimentSettings(data="builtin:rt"), TrainConfig(max_minutes=20),
               "runs/rt")
    clf = TextClassifier.load("runs/rt")
    clf.classify(["a gorgeous, witty film"])[0].label          # 'positive'
    evaluate_classifier(clf, load_labeled("builtin:rt").test)  # accuracy, macro-F1, confusion

Training is :func:`qkv.tasks.train_task` with :data:`SPEC` (:class:`SentimentTask`: summed
cross-entropy per example, validation accuracy for early stopping); the model folder holds
``config.json`` (``"task": "sentiment"``, the :class:`SentimentSettings` under
``"sentiment"``, the model config, the label list), ``model.safetensors``, ``tokenizer.json``.

The task has two model recipes (:class:`Recipe`): :data:`SCRATCH`
(:mod:`qkv.tasks.sentiment_scratch`) trains an
:class:`~qkv.models.AttentionClassifier` with its own BPE tokenizer; with ``pretrained`` set
(``qkv train sentiment --pretrained minilm``), :data:`~qkv.tasks.pretrained_sentiment.PRETRAINED`
fine-tunes a pretrained encoder with a classification head. The spec picks one recipe per
call and hands it everything; the batches, metrics, objective and predictions both use are
in :mod:`qkv.tasks.text_classification` and :mod:`qkv.tasks.classification`.

Long texts keep their head and tail (:func:`head_tail`): the verdict of a review is often in its
last sentences (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?", found
head+tail truncation best on IMDB).

Shapes: ``B`` texts, ``N`` tokens of the longest, ``C`` classes, ``r`` pooling queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from qkv.data.labeled import LabeledText, load_labeled, read_labeled
from qkv.data.registry import Splits
from qkv.tasks.base import (
    EvalOptions,
    Evaluation,
    Flag,
    Prepared,
    TaskSpec,
)
from qkv.tasks.classification import (
    classification_metrics,
    evaluation_metrics,
    format_classification,
)
from qkv.tasks.pretrained_sentiment import PRETRAINED
from qkv.tasks.sentiment_scratch import SCRATCH, TextClassifier
from qkv.tasks.sentiment_settings import SentimentSettings, SentimentSetup
from qkv.tasks.text_classification import (
    LabeledBatch,
    LabeledDataset,
    Prediction,
    TextObjective,
    collate_labeled,
    evaluate_classifier,
    head_tail,
)
from qkv.train import read_config

__all__ = [
    "SCRATCH",
    "SPEC",
    "LabeledBatch",
    "LabeledDataset",
    "Prediction",
    "Recipe",
    "SentimentSettings",
    "SentimentSetup",
    "SentimentSpec",
    "SentimentTask",
    "TextClassifier",
    "classification_metrics",
    "collate_labeled",
    "evaluate_classifier",
    "evaluation_metrics",
    "format_classification",
    "head_tail",
    "recipe_for",
    "recipe_of_folder",
]

TASK_NAME = "sentiment"

#: The text objective (summed cross-entropy, validation accuracy), by its sentiment name.
SentimentTask = TextObjective


class Recipe(Protocol):
    """How the sentiment task builds, checks and loads one kind of model."""

    def check_flags(self, given: dict[str, Any]) -> None:
        """Refuse ``qkv train`` flags (``given``: field -> value) this recipe cannot use."""

    def training_defaults(self, max_steps: int | None) -> dict[str, Any]:
        """Training settings a new run takes unless given."""
        ...

    def prepare(
        self, settings: SentimentSettings, splits: Splits[LabeledText], *, folder: Path | None
    ) -> Prepared:
        """Build the run (see :meth:`qkv.tasks.base.TaskSpec.prepare`)."""
        ...

    def owns(self, config: dict[str, Any]) -> bool:
        """Whether a sentiment folder's ``config.json`` holds this recipe's model."""
        ...

    def load(self, folder: Path, config: dict[str, Any], *, device: str) -> Any:
        """The predictor of ``folder``, whose ``config.json`` is ``config``."""
        ...


def recipe_for(pretrained: str | None) -> Recipe:
    """The recipe of settings whose ``pretrained`` is ``pretrained``."""
    return SCRATCH if pretrained is None else PRETRAINED


def recipe_of_folder(config: dict[str, Any]) -> Recipe:
    """The recipe whose model a sentiment folder's ``config.json`` holds."""
    return PRETRAINED if PRETRAINED.owns(config) else SCRATCH


class SentimentSpec(TaskSpec[SentimentSettings, Any]):
    """Text classification as a :class:`~qkv.tasks.base.TaskSpec`: an
    :class:`~qkv.models.AttentionClassifier` from scratch, or a pretrained encoder fine-tuned
    (``pretrained``); the predictor is a :class:`TextClassifier` or a
    :class:`~qkv.tasks.pretrained_sentiment.PretrainedTextClassifier`.

    The two differ only in their :class:`Recipe` (:data:`SCRATCH` or
    :data:`~qkv.tasks.pretrained_sentiment.PRETRAINED`), chosen once per call by
    :func:`recipe_for` (from the settings) or :func:`recipe_of_folder` (from a saved folder).
    """

    name = TASK_NAME
    settings_type = SentimentSettings
    summary = (
        "text classification (sentiment) with an attention-pooling classifier, or a "
        "fine-tuned pretrained encoder (--pretrained minilm)"
    )
    metric_name = "accuracy"
    train_flags = (
        Flag(
            "--text-column",
            "data_options.text_column",
            "text column or field (default text)",
            reader=True,
        ),
        Flag(
            "--label-column",
            "data_options.label_column",
            "label column or field (default label)",
            reader=True,
        ),
        Flag(
            "--preset",
            "preset",
            "model",
            choices=("tiny", "bigru-fast", "bigru-small", "bigru-base", "transformer-small"),
        ),
        Flag("--dropout", "model_overrides.dropout", "override the preset's dropout", float),
        Flag("--pool-queries", "model_overrides.pool_queries", "attention-pooling queries r", int),
        Flag("--vocab-size", "vocab_size", "BPE vocabulary", int),
        Flag("--max-length", "max_length", "tokens kept per text, head + tail", int),
        Flag("--penalty", "penalty", "Lin et al.'s pooling penalty weight", float),
        Flag(
            "--pretrained",
            "pretrained",
            "fine-tune a pretrained encoder with a classification head: minilm or an HF-layout "
            "folder (not with --preset/--vocab-size); unless given, training then uses --lr "
            "1e-4, --schedule cosine and --warmup a tenth of --steps",
        ),
        Flag(
            "--pooling",
            "pooling",
            "head pooling over the pretrained encoder (only with --pretrained)",
            choices=("mean", "attention"),
        ),
    )

    def check_train_flags(self, given: dict[str, Any], base: SentimentSettings) -> None:
        """Refuse flags that do not go together (``given``: the flags set, by settings field;
        ``base``: the settings they apply to, a resumed run's saved ones or the defaults).

        Raises:
            ValueError: ``--preset``/``--vocab-size`` with ``--pretrained``, or ``--pooling``
                without it.
            PretrainedError: a ``--pretrained`` that is no folder or named model, or whose
                package is missing (checked before the data is read).
        """
        recipe_for(given.get("pretrained", base.pretrained)).check_flags(given)

    def training_defaults(
        self, settings: SentimentSettings, max_steps: int | None
    ) -> dict[str, Any]:
        """Training settings a new run takes unless given: fine-tuning ones with
        ``pretrained`` (see :data:`qkv.tasks.pretrained_sentiment.FINETUNE_DEFAULTS`)."""
        return recipe_for(settings.pretrained).training_defaults(max_steps)

    def legacy_settings(self, config: dict[str, Any]) -> dict[str, Any] | None:
        # Folders written before the settings had a section kept a few of them under "data".
        data = config.get("data")
        if not isinstance(data, dict) or "spec" not in data:
            return None
        values = {
            "data": data["spec"],
            "data_options": data.get("options") or {},
            "max_length": data.get("max_length"),
            "preset": data.get("preset", SentimentSettings.preset),
        }
        model = config.get("model")
        if data.get("pretrained") is not None and isinstance(model, dict):
            values["pretrained"] = data["pretrained"]
            values["pooling"] = model.get("pooling", "mean")
        return values

    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[LabeledText]:
        return load_labeled(data, **options)

    def read_file(self, path: str, options: dict[str, Any]) -> list[LabeledText]:
        return read_labeled(path, **options)

    def prepare(
        self, settings: SentimentSettings, splits: Splits[LabeledText], *, folder: Path | None
    ) -> Prepared:
        return recipe_for(settings.pretrained).prepare(settings, splits, folder=folder)

    def load(self, folder: Path, *, device: str = "auto") -> Any:
        """A :class:`TextClassifier`, or a
        :class:`~qkv.tasks.pretrained_sentiment.PretrainedTextClassifier` for a fine-tuned
        pretrained folder (both classify into :class:`Prediction`); ``config.json`` is read
        once and handed to the recipe."""
        config = read_config(folder)
        return recipe_of_folder(config).load(Path(folder), config, device=device)

    def evaluate(
        self, predictor: Any, examples: Sequence[LabeledText], options: EvalOptions
    ) -> dict[str, Any]:
        return evaluate_classifier(predictor, examples, batch_size=options.batch_size)

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        return format_classification(evaluation.metrics)


SPEC = SentimentSpec()
