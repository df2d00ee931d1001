"""One lifecycle for every task: settings, data, model folder, resume, DDP, evaluation.

A task is a :class:`TaskSpec`: it says how to read its data, how to build a model, a loss and
a validation from its settings, how to load a trained folder into a predictor, and how to score
one on examples. Everything around that is here, once, for every task:

- :func:`train_task` owns the model folder (checked before any work; ``config.json`` holds
  ``task``, the task's settings under the task's name, ``model``, ``training``), applies the
  **one resume rule** (:data:`RESUMABLE`: only the limits and the device may change; any other
  differing setting is an error naming it and both values), runs every task under ``torchrun``
  (each process takes every ``world_size``-th batch), and passes keep-best and early stopping
  to the :class:`~qkv.train.Trainer`.
- :func:`evaluate_model` is the evaluation policy: a file given to it is the evaluation set
  (every line is scored); a built-in set, a data folder or the training data (the default)
  gives its ``split``; reader options default to the ones saved in the folder. It returns an
  :class:`Evaluation` with the same top-level keys for every task.

Adding a task (one module, plus one line in :data:`TASKS`)::

    @dataclass(frozen=True)
    class MySettings(Settings):           # frozen; JSON-ready fields; saved in config.json
        data: str = "builtin:..."         # required: the data spec
        data_options: dict = field(default_factory=dict)   # required: loader/reader options
        batch_size: int = 32              # required
        ...                               # anything else the task needs (all of it is
                                          # checked by the resume rule)

    class MyTask(TaskSpec[MySettings, MyPredictor]):
        name = "mytask"; settings_type = MySettings; summary = "one line for --help"
        train_flags = (Flag("--preset", "preset", "model size", choices=(...)), ...)
        def load_splits(self, data, options): ...       # -> Splits of examples
        def read_file(self, path, options): ...         # -> every example of a user's file
        def prepare(self, settings, splits, *, folder): # -> Prepared (model, loss, batches)
        def load(self, folder, *, device="auto"): ...   # -> a predictor
        def evaluate(self, predictor, examples, options): ...  # -> {metric: value}
        def format_metrics(self, evaluation): ...       # -> lines of the table

    SPEC = MyTask()          # and "mytask": "my.module" in TASKS

``qkv train mytask``, ``qkv evaluate --model M`` and ``--resume`` then work with no other
change; a ``qkv <verb>`` that uses the predictor (like ``qkv classify``) is a CLI module of its
own.
"""

from __future__ import annotations

import importlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch.distributed as dist
from torch import nn

from qkv.data.batching import BucketBatchSampler
from qkv.data.registry import Splits
from qkv.nn.surgery import check_backend, set_attention_backend
from qkv.parallel import ContextParallel
from qkv.train import (
    DistributedContext,
    EvalReport,
    LossOutput,
    ModelFolderError,
    SamplerBatches,
    StepReport,
    Task,
    TrainConfig,
    Trainer,
    TrainResult,
    init_from_env,
    load_model,
    load_training_state,
    load_weights,
    prepare_output_folder,
    read_config,
    release_output_folder,
    resolve_device,
    save_model_folder,
    seed_everything,
)
from qkv.train.checkpoint import SavesToFolder

__all__ = [
    "RESUMABLE",
    "TASKS",
    "EvalOptions",
    "Evaluation",
    "Flag",
    "Prepared",
    "Settings",
    "TaskSpec",
    "TrainOutcome",
    "check_backend",
    "evaluate_model",
    "get_task",
    "is_builtin",
    "load_task_model",
    "read_task_config",
    "resolve_data_spec",
    "set_attention_backend",
    "task_names",
    "train_task",
]

logger = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT")
PredictorT = TypeVar("PredictorT")

#: The task table: name -> module defining ``SPEC`` (imported when the task is used).
TASKS: dict[str, str] = {
    "translation": "qkv.tasks.translation",
    "sentiment": "qkv.tasks.sentiment",
    "summarization": "qkv.tasks.summarization",
    "image": "qkv.tasks.image",
}

#: The training settings a resumed run may change: its limits and where it runs.
RESUMABLE: tuple[str, ...] = ("max_steps", "max_minutes", "device")


@dataclass(frozen=True)
class Flag:
    """A ``qkv train <task>`` option that sets one of the task's settings.

    Args:
        name: the option, e.g. ``"--preset"``.
        field: the settings field it sets; ``"data_options.KEY"`` and
            ``"model_overrides.KEY"`` set one key of those dicts (``None``: ``apply`` does it).
        help: the help text (the default is appended from the settings dataclass).
        type: converts the text (``None``: a string).
        choices: the allowed values.
        switch: a flag without a value (sets ``True``).
        apply: ``(settings, value) -> settings`` for options that are not one field.
        reader: a reader option (a column or field name): ``qkv evaluate`` takes it too.
    """

    name: str
    field: str | None
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    switch: bool = False
    apply: Callable[[Any, Any], Any] | None = None
    reader: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def set(self, settings: Any, value: Any) -> Any:
        """``settings`` with this option's ``value`` applied."""
        if self.apply is not None:
            return self.apply(settings, value)
        assert self.field is not None, f"{self.name}: a Flag needs a field or apply"
        section, _, key = self.field.partition(".")
        if key:
            return replace(settings, **{section: {**getattr(settings, section), key: value}})
        return replace(settings, **{self.field: value})

    def default(self, settings: Any) -> Any:
        """The value ``settings`` holds for this option (for the help text)."""
        if self.field is None:
            return None
        section, _, key = self.field.partition(".")
        value = getattr(settings, section, None)
        return value.get(key) if key and isinstance(value, dict) else value


@dataclass
class Prepared:
    """What :meth:`TaskSpec.prepare` builds for a run.

    Attributes:
        settings: the final settings (e.g. a length derived from the data filled in); saved.
        model: the freshly initialised model (its weights are replaced on resume).
        model_config: what rebuilds ``model`` (``config.json``'s ``"model"``).
        objective: the loss and validation the Trainer runs (:class:`qkv.train.Task`).
        train_set: the training examples, indexable, with ``lengths()`` for bucketing.
        collate: list of ``train_set`` items -> a batch with ``.to(device)``.
        batch_size: examples per batch per process.
        max_tokens: also cap the padded tokens of a batch (``None``: no cap).
        tokenizer: saved into the folder (``None``: nothing to save).
        extra: more ``config.json`` keys (e.g. the labels of a classifier).
        notes: lines for the user about choices the task made (shown once, by the main
            process).
        training: :class:`~qkv.train.TrainConfig` fields the task sized to its data (a small
            corpus's step budget, say). When the caller left the step and time limits open,
            each replaces the run's value unless the caller chose that field
            (``training_given`` of :func:`train_task`); with limits of the caller's, none
            does. A resumed run keeps its saved training, so this is for a new run only.
    """

    settings: Any
    model: nn.Module
    model_config: dict[str, Any]
    objective: Task
    train_set: Any
    collate: Callable[[list[Any]], Any]
    batch_size: int
    max_tokens: int | None = None
    tokenizer: SavesToFolder | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalOptions:
    """Evaluation choices; a task uses those that apply to it.

    Attributes:
        beam_size: beam search width for generating tasks (1: greedy).
        num_buckets: source-length buckets in a translation report.
        batch_size: examples per forward pass.
    """

    beam_size: int = 1
    num_buckets: int = 6
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("beam_size", "num_buckets", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Evaluation:
    """One model scored on one set of examples.

    Attributes:
        task: the task name.
        model: the model folder.
        data: the data spec scored (a file, ``builtin:NAME``, a folder).
        split: ``"train"``, ``"validation"``, ``"test"``, or ``"all"`` for a whole file.
        examples: how many examples were scored.
        metrics: the task's scores (JSON-ready).
    """

    task: str
    model: str
    data: str
    split: str
    examples: int
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The same top-level keys for every task: task, model, data, split, examples, metrics."""
        return {
            "task": self.task,
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "examples": self.examples,
            "metrics": self.metrics,
        }

    def table(self) -> str:
        """The report as text lines (a heading, then the task's table)."""
        heading = f"{self.model} on {self.data} ({self.split}, {self.examples} examples)"
        return "\n".join([heading, *get_task(self.task).format_metrics(self)])


@dataclass(frozen=True)
class TrainOutcome:
    """What :func:`train_task` returns.

    Attributes:
        out: the model folder.
        result: the Trainer's result (final state, why it stopped).
        settings: the task settings the run used (saved in the folder).
        splits: the data the run read.
        resumed_from: the step a resumed run continued from (``None``: a new run).
        training: the training settings the run used (saved in the folder; with a task's
            choices sized to the data applied).
    """

    out: Path
    result: TrainResult
    settings: Any
    splits: Splits[Any]
    resumed_from: int | None = None
    training: TrainConfig | None = None


class TaskSpec(ABC, Generic[SettingsT, PredictorT]):
    """What a task supplies; see the module docstring for how a new one plugs in.

    Class attributes:
        name: the task's name (``qkv train NAME``, ``config.json``'s ``task``).
        settings_type: its settings dataclass (fields ``data``, ``data_options``,
            ``batch_size``; ``to_dict``/``from_dict``).
        summary: one line for ``qkv train --help``.
        metric_name: how the CLI names the early-stopping metric in its last line.
        train_flags: the task's own ``qkv train NAME`` options.
        default_steps: the step limit when neither ``--steps`` nor ``--minutes`` is given.
    """

    name: ClassVar[str]
    settings_type: ClassVar[type[Any]]
    summary: ClassVar[str] = ""
    metric_name: ClassVar[str] = "metric"
    train_flags: ClassVar[tuple[Flag, ...]] = ()
    default_steps: ClassVar[int] = 2000

    @abstractmethod
    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[Any]:
        """Train/validation/test examples of a data spec (``options``: the loader's)."""

    @abstractmethod
    def read_file(self, path: str, options: dict[str, Any]) -> list[Any]:
        """Every example of a user's file, in file order (``options``: reader options)."""

    @abstractmethod
    def prepare(self, settings: SettingsT, splits: Splits[Any], *, folder: Path | None) -> Prepared:
        """Build the run: tokenizer, model, loss and validation, training examples.

        Args:
            settings: the run's settings.
            splits: the data of ``settings.data``.
            folder: when resuming, the model folder: reuse its tokenizer, labels and model
                config (the weights and training state are loaded by :func:`train_task`).
        """

    @abstractmethod
    def load(self, folder: Path, *, device: str = "auto") -> PredictorT:
        """The trained model of ``folder``, ready to predict on ``device``."""

    @abstractmethod
    def evaluate(
        self, predictor: PredictorT, examples: Sequence[Any], options: EvalOptions
    ) -> dict[str, Any]:
        """Scores of ``predictor`` on ``examples`` (JSON-ready)."""

    @abstractmethod
    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        """The lines of the evaluation table, below the heading."""

    # -- hooks with defaults: a task overrides those it needs --------------------------------

    def check_train_flags(self, given: dict[str, Any], base: SettingsT) -> None:
        """Refuse a combination of ``qkv train`` flags before any work (default: none).

        Args:
            given: the settings fields the user's flags set (field -> value), flags not
                given left out.
            base: the settings the flags apply to (the defaults, or a resumed run's).

        Raises:
            ValueError: flags that do not go together, naming them.
        """

    def training_defaults(self, settings: SettingsT, max_steps: int | None) -> dict[str, Any]:
        """:class:`~qkv.train.TrainConfig` fields this task's ``settings`` train best with
        when the user does not give them (default: none, the CLI's defaults)."""
        return {}

    def run_classify(self, args: Any) -> int:
        """``qkv classify --model M ...`` for a folder of this task, given the command's
        parsed arguments; returns the exit code. The built-in classifying tasks are handled
        by :mod:`qkv.cli.classify` itself; a task added from outside overrides this.

        Raises:
            ValueError: this task does not classify (the default).
        """
        raise ValueError(f"--model {args.model}: a {self.name} model does not classify")

    # -- shared by every task ----------------------------------------------------------------

    def reader_option_names(self) -> list[str]:
        """The ``data_options`` keys that are reader options (columns, fields)."""
        return [
            f.field.partition(".")[2]
            for f in self.train_flags
            if f.reader and f.field is not None and f.field.startswith("data_options.")
        ]

    def settings_from_dict(self, values: dict[str, Any]) -> SettingsT:
        settings: SettingsT = self.settings_type.from_dict(values)
        return settings

    def settings_from_config(
        self, config: dict[str, Any], folder: str | os.PathLike[str]
    ) -> SettingsT:
        """The settings saved in a folder's ``config.json`` (or read from an older layout by
        :meth:`legacy_settings`).

        Raises:
            ModelFolderError: no settings section, or settings this version cannot read.
        """
        values = config.get(self.name)
        if values is None:
            values = self.legacy_settings(config)
        where = Path(folder) / "config.json"
        if not isinstance(values, dict):
            raise ModelFolderError(f"{where}: no {self.name!r} settings section")
        try:
            return self.settings_from_dict(values)
        except (TypeError, ValueError) as error:
            raise ModelFolderError(f"{where}: bad {self.name} settings: {error}") from None

    def legacy_settings(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """Settings of a folder written before the settings had their own section (``None``:
        there is no older layout to read)."""
        return None


def read_task_config(folder: str | os.PathLike[str], task: str) -> dict[str, Any]:
    """``config.json`` of a model folder that must hold a ``task`` model.

    Raises:
        ModelFolderError: not a model folder, or one of another task (naming it).
    """
    config = read_config(folder)
    if config.get("task") != task:
        raise ModelFolderError(
            f"{folder}: holds a {config.get('task')!r} model, not a {task} model"
        )
    return config


def load_task_model(
    folder: str | os.PathLike[str],
    task: str,
    build: Callable[[dict[str, Any]], nn.Module],
    *,
    device: str = "auto",
    model_type: type[nn.Module] = nn.Module,
    config: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any], Any]:
    """The model (on ``device``, eval mode), ``config.json`` and task settings of a ``task``
    model folder (what each task's predictor ``load`` starts from); ``config``: the folder's
    ``config.json`` when the caller has read it already (it is then not read again).

    Raises:
        ModelFolderError: not a folder of ``task``, a model that is not a ``model_type``, or
            weights that do not fit.
    """
    config = read_task_config(folder, task) if config is None else config
    if config.get("task") != task:
        raise ModelFolderError(
            f"{folder}: holds a {config.get('task')!r} model, not a {task} model"
        )
    model, config = load_model(folder, build, config=config)
    if not isinstance(model, model_type):
        raise ModelFolderError(f"{folder}: the model is not a {model_type.__name__}")
    settings = get_task(task).settings_from_config(config, folder)
    return model.to(resolve_device(device)).eval(), config, settings


def get_task(name: str) -> TaskSpec[Any, Any]:
    """The spec of the task ``name`` (imports its module).

    Raises:
        ValueError: an unknown task, naming the known ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    spec: TaskSpec[Any, Any] = importlib.import_module(TASKS[name]).SPEC
    return spec


def task_names() -> list[str]:
    return list(TASKS)


# --------------------------------------------------------------------------------------------
# Data specs


def is_builtin(spec: str) -> bool:
    return spec.startswith("builtin:")


def resolve_data_spec(spec: str) -> str:
    """``spec`` with its file paths made absolute (a model folder is used from anywhere):
    ``builtin:NAME`` unchanged, ``SRC,TGT`` resolved on both sides."""
    if is_builtin(spec):
        return spec
    if "," in spec and not Path(spec).exists():
        return ",".join(str(Path(part.strip()).resolve()) for part in spec.split(","))
    return str(Path(spec).resolve())


def _missing_data_files(spec: str) -> list[str]:
    if is_builtin(spec):
        return []
    parts = [spec] if Path(spec).exists() or "," not in spec else spec.split(",")
    return [p for p in parts if not Path(p.strip()).exists()]


# --------------------------------------------------------------------------------------------
# Training


def _differences(
    saved: Any, given: Any, *, allowed: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, given value)`` of every field that differs, except ``allowed``
    ones; a given ``None`` where the saved run has a value means "not given" (the value the
    saved run derived)."""
    out = []
    for f in fields(saved):
        if f.name in allowed:
            continue
        old, new = getattr(saved, f.name), getattr(given, f.name)
        if new is None and old is not None:
            continue
        if old != new:
            out.append((f.name, old, new))
    return out


def resumed_settings(
    spec: TaskSpec[Any, Any],
    folder: Path,
    settings: Any | None,
    training: TrainConfig | None,
) -> tuple[Any, TrainConfig]:
    """The saved run's settings, with the limits and device of ``training``.

    Raises:
        ModelFolderError: the folder holds another task's model.
        ValueError: a setting other than :data:`RESUMABLE` differs from the saved run's; the
            message names it and both values.
    """
    saved = read_config(folder)
    if saved.get("task") != spec.name:
        raise ModelFolderError(
            f"{folder}: holds a {saved.get('task')!r} model, not a {spec.name} one"
        )
    saved_settings = spec.settings_from_dict(saved[spec.name])
    saved_training = TrainConfig.from_dict(saved["training"])
    differing: list[tuple[str, Any, Any]] = []
    if settings is not None:
        given = replace(settings, data=resolve_data_spec(settings.data))
        differing += _differences(saved_settings, given)
    if training is not None:
        differing += _differences(saved_training, training, allowed=RESUMABLE)
    if differing:
        name, old, new = differing[0]
        others = f" (and {', '.join(d[0] for d in differing[1:])})" if differing[1:] else ""
        raise ValueError(
            f"--resume: {name} is {new!r} but the run saved in {folder} used {old!r}{others}; "
            f"only {', '.join(RESUMABLE)} may change when resuming (train a new model with "
            "--overwrite or another --out to change it)"
        )
    if training is None:
        return saved_settings, saved_training
    limits = {name: getattr(training, name) for name in RESUMABLE}
    return saved_settings, replace(saved_training, **limits)


def train_task(
    spec: TaskSpec[Any, Any] | str,
    settings: Any | None,
    training: TrainConfig | None,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    backend: str = "auto",
    context_parallel: int = 0,
    training_given: Collection[str] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_eval: Callable[[EvalReport], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Train a task's model into the folder ``out`` (new, or resumed exactly).

    Args:
        spec: the task (or its name).
        settings: the task's settings (``None``: its defaults, or the saved ones on resume).
        training: the Trainer's settings (``None``: defaults, or the saved ones on resume).
        out: the model folder: absent, empty, a qkv model folder with ``resume`` or
            ``overwrite``.
        resume: continue the run saved in ``out``; settings that differ from the saved ones
            are refused, except :data:`RESUMABLE`.
        overwrite: replace a model folder already in ``out``.
        backend: the attention backend of the model's attention layers (not saved).
        context_parallel: under ``torchrun``, shard every sequence across this many processes
            (:mod:`qkv.parallel`, zigzag ring; 0: off): each group of ``context_parallel``
            consecutive processes takes the same batches and computes its share of each
            sequence, for sequences too long for one process; the groups share out the batches
            as DDP's processes do (a data x context mesh; all the processes: context
            parallelism alone). The steps are those of data parallelism over the groups (not
            saved). Needs a model with ``set_context_parallel`` (the sentiment task's
            transformer classifier, dropout 0).
        training_given: the :class:`~qkv.train.TrainConfig` fields the caller chose. When
            the limits (``max_steps``, ``max_minutes``) are not among them, the task's
            training choices sized to the data (:attr:`Prepared.training`) replace the other
            fields. ``None``: every field when ``training`` is given, none when it is ``None``
            (``qkv train`` passes the fields of the flags given).
        on_step, on_eval: progress callbacks (see :class:`~qkv.train.Trainer`).
        on_message: called with lines worth showing a user (data sizes of a split file, the
            step a run resumes from).

    Raises:
        ModelFolderError: ``out`` cannot be used.
        DataError: malformed data (naming file and line).
        ValueError: bad or (on resume) changed settings.
    """
    spec = get_task(spec) if isinstance(spec, str) else spec
    check_backend(backend)
    folder = Path(out)
    say = on_message or (lambda text: logger.info("%s", text))
    prepare_output_folder(folder, resume=resume, overwrite=overwrite)
    try:
        return _train_in_folder(
            spec,
            settings,
            training,
            folder,
            resume,
            backend,
            _given_fields(training, training_given),
            say,
            on_step,
            on_eval,
            context_parallel,
        )
    finally:  # a long-lived process (a notebook) must not keep the folder locked
        release_output_folder(folder)


def _train_in_folder(
    spec: TaskSpec[Any, Any],
    settings: Any | None,
    training: TrainConfig | None,
    folder: Path,
    resume: bool,
    backend: str,
    given: frozenset[str],
    say: Callable[[str], None],
    on_step: Callable[[StepReport], None] | None,
    on_eval: Callable[[EvalReport], None] | None,
    context_parallel: int = 0,
) -> TrainOutcome:
    """:func:`train_task` once ``folder`` is checked and locked."""
    if resume:
        settings, training = resumed_settings(spec, folder, settings, training)
    else:
        settings = settings if settings is not None else spec.settings_type()
        settings = replace(settings, data=resolve_data_spec(settings.data))
        training = training or TrainConfig()
    # Under torchrun every process checks the folder and reads the same settings (only the
    # main one writes); the checks above run before any process has written anything.
    context = init_from_env(resolve_device(training.device))
    splits = spec.load_splits(settings.data, dict(settings.data_options))
    if not splits.train:
        raise ValueError(f"data {settings.data!r}: no training examples")
    if not is_builtin(settings.data) and context.is_main:
        sizes = splits.sizes()
        say(
            f"data {settings.data}: {sizes['train']} train / {sizes['validation']} validation "
            f"/ {sizes['test']} test examples"
        )
    seed_everything(training.seed)  # the model's initial weights
    prepared = spec.prepare(settings, splits, folder=folder if resume else None)
    set_attention_backend(prepared.model, backend)
    objective: Task = prepared.objective
    replicas, replica = context.world_size, context.rank  # who shares out the batches
    if context_parallel:
        objective = _context_parallel(spec, prepared.model, objective, context, context_parallel)
        replicas, replica = replicas // context_parallel, replica // context_parallel
    for note in prepared.notes if context.is_main else []:
        say(note)
    if not resume:
        training, note = _sized_training(training, prepared.training, given)
        if note and context.is_main:
            say(note)
    state, resumed_from = None, None
    if resume:
        resumed_from = load_weights(prepared.model, folder)
        state = load_training_state(folder, expected_step=resumed_from)
        if context.is_main:
            say(f"resuming from step {resumed_from}")
    sections = {
        "task": spec.name,
        spec.name: prepared.settings.to_dict(),
        "model": prepared.model_config,
        "training": training.to_dict(),
        **prepared.extra,
    }

    def save(module: nn.Module, training_state: dict[str, Any], step: int) -> None:
        save_model_folder(
            folder,
            model=module,
            config=sections,
            tokenizer=prepared.tokenizer,
            training_state=training_state,
            step=step,
        )

    sampler = BucketBatchSampler(
        prepared.train_set.lengths(),
        batch_size=prepared.batch_size,
        max_tokens=prepared.max_tokens,
        seed=training.seed,
        # each process (each context-parallel group) takes every replicas-th batch
        num_replicas=replicas,
        rank=replica,
    )
    if not sampler.batches():  # under DDP the batch count is cut to a multiple of the processes
        raise ValueError(
            f"{len(prepared.train_set)} training examples make fewer batches of "
            f"{prepared.batch_size} than the {context.world_size} processes need one each; "
            "lower --batch-size or use fewer processes"
        )
    trainer = Trainer(
        prepared.model,
        objective,
        SamplerBatches(prepared.train_set, sampler, prepared.collate),
        training,
        save=save,
        on_step=on_step,
        on_eval=on_eval,
        distributed=context,
    )
    result = trainer.fit(resume=state)
    return TrainOutcome(folder, result, prepared.settings, splits, resumed_from, training)


def _given_fields(training: TrainConfig | None, given: Collection[str] | None) -> frozenset[str]:
    """The TrainConfig fields a run must not change (see ``training_given``)."""
    if given is not None:
        return frozenset(given)
    return frozenset() if training is None else frozenset(f.name for f in fields(TrainConfig))


def _sized_training(
    training: TrainConfig, sized: dict[str, Any], given: frozenset[str]
) -> tuple[TrainConfig, str]:
    """``training`` with the task's sized fields, and a note when they are not applied.

    The sized fields go together with the step budget they size (a validation interval and
    checkpoint selection fit a budget): with a step or time limit of the caller's, none
    applies; otherwise each applies unless the caller chose that field.
    """
    if not sized:
        return training, ""
    if given & {"max_steps", "max_minutes"}:
        shown = ", ".join(f"{k}={v!r}" for k, v in sized.items())
        return training, f"  the limits given replace the training sized to the data ({shown})"
    return replace(training, **{k: v for k, v in sized.items() if k not in given}), ""


def _context_parallel(
    spec: TaskSpec[Any, Any],
    model: nn.Module,
    objective: Task,
    context: DistributedContext,
    size: int,
) -> Task:
    """Put ``model`` under context parallelism over groups of ``size`` consecutive processes
    (groups of their own, so their messages never interleave with DDP's), validating on the
    main process alone."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"context_parallel must be a positive number of processes; got {size!r}")
    setter = getattr(model, "set_context_parallel", None)
    if not callable(setter):
        raise ValueError(
            f"task {spec.name!r}: its model ({type(model).__name__}) cannot run "
            "context-parallel; leave out --context-parallel"
        )
    setter(ContextParallel(layout="zigzag"))  # raises, naming what the model lacks
    setter(None)
    if context.world_size % size:
        raise ValueError(
            f"--context-parallel {size} needs a multiple of {size} processes (torchrun "
            f"--nproc_per_node); this run has {context.world_size}"
        )
    if size == 1:
        return objective  # one process per sequence: data parallelism alone
    groups = [  # every process creates every group, in the same order
        dist.new_group(list(range(start, start + size)))
        for start in range(0, context.world_size, size)
    ]
    setting = ContextParallel(groups[context.rank // size], "zigzag", "ring")
    setter(setting)
    return _ContextParallelTask(objective, setter, setting)


class _ContextParallelTask:
    """A task under context parallelism: every process counts its share of the batch's tokens
    (it computes only those), and validation (on the main process only) runs the model
    without context parallelism, which would wait for the other processes."""

    def __init__(
        self,
        task: Task,
        setter: Callable[[ContextParallel | None], None],
        setting: ContextParallel,
    ) -> None:
        self.task, self.setter, self.setting = task, setter, setting
        self.name, self.metric = task.name, task.metric
        self.higher_is_better = task.higher_is_better

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        out = self.task.loss(model, batch)  # the whole batch's loss, the same in the group
        share, extra = divmod(out.tokens, self.setting.world_size())
        return replace(out, tokens=share + (extra if self.setting.rank() == 0 else 0))

    def validate(self, model: nn.Module) -> dict[str, float]:
        self.setter(None)
        try:
            return self.task.validate(model)
        finally:
            self.setter(self.setting)


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate_model(
    folder: str | os.PathLike[str],
    *,
    data: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    reader_options: dict[str, Any] | None = None,
    device: str = "auto",
    backend: str = "auto",
    options: EvalOptions | None = None,
) -> Evaluation:
    """Score the model in ``folder``.

    Args:
        folder: a model folder of any task.
        data: what to score: a file (every example of it is scored), a data folder or
            ``builtin:NAME`` (its ``split``); ``None``: the data the model was trained on
            (its ``split``, which a training file's seeded carving reproduces).
        split: ``"test"`` (default), ``"validation"`` or ``"train"``; not for a file.
        limit: score only the first ``limit`` examples.
        reader_options: column or field names (default: the ones saved in the folder).
        device, backend: where to run and the attention backend.
        options: beam size, buckets, batch size.

    Raises:
        ModelFolderError: not a model folder; DataError: malformed data; ValueError: a missing
            training file (saying how to pass ``--data``), ``split`` with a file, nothing to
            score, an option the task does not read.
    """
    folder = Path(folder)
    saved = read_config(folder)
    spec = get_task(str(saved.get("task")))
    settings = spec.settings_from_config(saved, folder)
    options = options or EvalOptions()
    check_backend(backend)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    given_reader = dict(reader_options or {})
    unknown = sorted(set(given_reader) - set(spec.reader_option_names()))
    if unknown:
        names = ", ".join("--" + name.replace("_", "-") for name in unknown)
        raise ValueError(f"{names}: not an option of a {spec.name} model's data")
    saved_options = dict(settings.data_options)
    saved_reader = {k: v for k, v in saved_options.items() if k in spec.reader_option_names()}
    reader = {**saved_reader, **given_reader}
    if data is None:
        missing = _missing_data_files(settings.data)
        if missing:
            raise ValueError(
                f"{folder} was trained on {missing[0]}, which is missing (moved or deleted?); "
                "pass the data to score with --data FILE"
            )
        source, split = settings.data, split or "test"
        examples = spec.load_splits(source, {**saved_options, **given_reader})[split]
    elif is_builtin(data) or Path(data).is_dir():
        source, split = data, split or "test"
        if resolve_data_spec(data) == settings.data:  # the training data, as it was loaded
            loader_options = {**saved_options, **given_reader}
        elif is_builtin(data):  # another built-in set: its loader takes no reader options
            loader_options = given_reader
        else:
            loader_options = reader
        examples = spec.load_splits(data, loader_options)[split]
    else:
        if split is not None:
            raise ValueError(
                f"--split selects a split of a built-in data set, a data folder or the "
                f"training data; the file {data} is scored whole (every example)"
            )
        source, split = data, "all"
        examples = spec.read_file(data, reader)
    examples = list(examples)[:limit]
    if not examples:
        raise ValueError(f"no examples to score in {source!r} ({split})")
    predictor = spec.load(folder, device=device)
    model = getattr(predictor, "model", None)
    if isinstance(model, nn.Module):
        set_attention_backend(model, backend)
    metrics = spec.evaluate(predictor, examples, options)
    return Evaluation(spec.name, str(folder), source, split, len(examples), metrics)


class Settings:
    """Mixin of the task settings dataclasses: ``to_dict`` for config.json and a
    ``from_dict`` that refuses unknown keys (naming them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_SettingsT], values: dict[str, Any]) -> _SettingsT:
        return from_dict_checked(cls, values, cls.__name__)


_SettingsT = TypeVar("_SettingsT", bound=Settings)


def from_dict_checked(cls: type[SettingsT], values: dict[str, Any], what: str) -> SettingsT:
    """``cls(**values)`` for a settings dataclass; unknown keys raise ``ValueError`` naming
    them (a folder from a newer qkv, or a typo in a hand-written config)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(known)}")
    return cls(**values)
