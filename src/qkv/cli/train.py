"""``qkv train <task>``: one sub-command per task of :data:`qkv.tasks.base.TASKS`.

Each sub-command has the shared training flags (:func:`add_training_args`), ``--data``,
``--batch-size`` and the task's own :attr:`~qkv.tasks.base.TaskSpec.train_flags`; running it is
parse -> :func:`qkv.tasks.train_task` -> print. A task needs nothing here to get its command.

Every setting flag defaults to "not given" (``None``): a new run fills in the defaults shown in
``--help``; a ``--resume`` starts from the saved run's settings, and a flag given with another
value than the saved one is refused by the resume rule (:data:`qkv.tasks.base.RESUMABLE`).

A spec may also define ``check_train_flags(given, base)`` (refuse flags that do not go
together; ``given`` maps the settings fields of the task flags that were set to their values,
``base`` is the settings they apply to: the defaults, or a resumed run's saved ones) and
``training_defaults(settings, max_steps) -> {field: value}`` (training defaults of its own for a
new run, e.g. fine-tuning ones for ``qkv train sentiment --pretrained``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkv.cli.progress import ProgressBar

if TYPE_CHECKING:
    from qkv.tasks.base import TaskSpec
    from qkv.train import EvalReport, StepReport, TrainConfig

__all__ = [
    "TRAINING_DEFAULTS",
    "TrainProgress",
    "add_runtime_args",
    "add_training_args",
    "register",
    "training_config",
    "training_given",
]

#: What a new run uses for a training flag that is not given (shown in ``--help``).
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "warmup_steps": 200,
    "schedule": "inverse_sqrt",
    "weight_decay": 0.01,
    "clip_norm": 1.0,
    "eval_every": 500,
    "patience": None,
    "keep_best": False,
    "log_every": 20,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv train`` and one sub-command per task."""
    from qkv.tasks.base import get_task, task_names

    train = commands.add_parser("train", help="train a model for a task into a model folder")
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in task_names():
        _register_task(tasks, get_task(name))


def _register_task(
    tasks: argparse._SubParsersAction[argparse.ArgumentParser], spec: TaskSpec[Any, Any]
) -> None:
    defaults = spec.settings_type()
    p = tasks.add_parser(
        spec.name,
        help=spec.summary,
        description=f"{spec.summary}: qkv train {spec.name} --data {defaults.data} --out MODEL",
        allow_abbrev=False,  # a resumed run must know exactly which flags were given
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data",
        default=None,
        help=f"builtin:NAME, a file or a folder (e.g. {defaults.data}); not needed with --resume",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="examples per batch per process (default "
        + (
            "sized to the data by the task)"
            if defaults.batch_size is None
            else f"{defaults.batch_size})"
        ),
    )
    add_task_flags(g, spec)
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_training_args(p, steps=spec.default_steps)
    p.add_argument(
        "--backend", default="auto", help="attention backend of the model (default %(default)s)"
    )
    p.add_argument(
        "--context-parallel",
        type=int,
        default=0,
        metavar="P",
        help="under torchrun, shard each sequence across P processes (all of them, or a data x "
        "context mesh); docs/parallel.md. The model must support it",
    )
    p.set_defaults(run=_run)


def add_task_flags(group: argparse._ArgumentGroup, spec: TaskSpec[Any, Any]) -> None:
    """The task's :attr:`~qkv.tasks.base.TaskSpec.train_flags`, each defaulting to None."""
    defaults = spec.settings_type()
    for flag in spec.train_flags:
        shown = flag.default(defaults)
        help_text = flag.help if shown in (None, {}, "") else f"{flag.help} (default {shown})"
        if flag.switch:
            group.add_argument(flag.name, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(
                flag.name,
                type=flag.type or str,
                choices=flag.choices,
                default=None,
                help=help_text,
            )


def add_training_args(p: argparse.ArgumentParser, *, steps: int = 2000) -> None:
    """The flags every ``qkv train <task>`` shares (limits, optimizer, schedule, output)."""
    d = TRAINING_DEFAULTS
    g = p.add_argument_group("training")
    g.add_argument("--out", type=Path, required=True, help="model folder to write")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out (only --steps, --minutes and --device may change)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    g.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"step limit (default {steps} unless --minutes)",
    )
    g.add_argument("--minutes", type=_positive_float, default=None, help="time limit")
    g.add_argument("--lr", type=_positive_float, help=f"peak learning rate (default {d['lr']})")
    g.add_argument(
        "--warmup",
        type=int,
        dest="warmup_steps",
        help=f"warmup steps (default {d['warmup_steps']})",
    )
    g.add_argument(
        "--schedule",
        choices=["inverse_sqrt", "cosine", "constant"],
        help=f"decay after the warmup (default {d['schedule']})",
    )
    g.add_argument("--weight-decay", type=float, help=f"AdamW's (default {d['weight_decay']})")
    g.add_argument(
        "--clip-norm", type=_positive_float, help=f"gradient norm clip (default {d['clip_norm']})"
    )
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        help=f"validate every N steps (default {d['eval_every']})",
    )
    g.add_argument(
        "--patience", type=_positive_int, help="stop after N validations without improvement"
    )
    g.add_argument(
        "--keep-best",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model folder keeps the best-validated weights, not the last step's "
        "(default: not kept, unless the task sizes it to the data)",
    )
    g.add_argument(
        "--log-every",
        type=_positive_int,
        help=f"progress line every N steps (default {d['log_every']})",
    )
    g.add_argument("--seed", type=int, help=f"seeds weights and data order (default {d['seed']})")
    g.add_argument("--device", help="auto (CUDA if present, default), cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="auto (default): bf16 autocast on CUDA, fp32 on CPU",
    )
    add_threads_arg(g)
    p.set_defaults(default_steps=steps)


def add_runtime_args(p: argparse.ArgumentParser, *, backend: bool = True) -> None:
    """``--device``, ``--seed`` (and ``--backend``) of the commands that run a model."""
    p.add_argument(
        "--device", default="auto", help="auto (CUDA if present), cpu, cuda ... (default auto)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the random generators (default 0)")
    if backend:
        p.add_argument("--backend", default="auto", help="attention backend (default %(default)s)")
    add_threads_arg(p)


def add_threads_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--threads N``: CPU threads (default: OMP_NUM_THREADS, else half the CPUs)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: OMP_NUM_THREADS if set, else half the CPUs, "
        "which behaves on a shared machine)",
    )


def training_config(
    args: argparse.Namespace,
    saved: TrainConfig | None = None,
    defaults: Callable[[int | None], dict[str, Any]] | None = None,
) -> TrainConfig:
    """The :class:`~qkv.train.TrainConfig` of the flags: the given ones over ``saved`` (a
    resumed run) or over :data:`TRAINING_DEFAULTS` updated with ``defaults(max_steps)`` (a
    task's own); without ``--steps``/``--minutes``, a new run takes the task's default step
    limit and a resumed one its saved limits."""
    from qkv.train import TrainConfig

    given = {
        name: getattr(args, name)
        for name in TRAINING_DEFAULTS
        if getattr(args, name, None) is not None
    }
    steps, minutes = args.steps, args.minutes
    if saved is not None:
        if steps is None and minutes is None:
            steps, minutes = saved.max_steps, saved.max_minutes
        return replace(saved, **given, max_steps=steps, max_minutes=minutes)
    if steps is None and minutes is None:
        steps = args.default_steps
    own = defaults(steps) if defaults is not None else {}
    return TrainConfig(
        **{**TRAINING_DEFAULTS, **own, **given}, max_steps=steps, max_minutes=minutes
    )


def training_given(args: argparse.Namespace) -> set[str]:
    """The :class:`~qkv.train.TrainConfig` fields the flags chose (``--steps`` or
    ``--minutes`` chooses both limits): a task may size the others to its data."""
    given = {name for name in TRAINING_DEFAULTS if getattr(args, name, None) is not None}
    if args.steps is not None or args.minutes is not None:
        given |= {"max_steps", "max_minutes"}
    return given


def task_settings(spec: TaskSpec[Any, Any], args: argparse.Namespace, base: Any) -> Any:
    """``base`` with every task flag that was given applied (after the spec's
    ``check_train_flags``)."""
    spec.check_train_flags(
        {
            flag.field: getattr(args, flag.dest)
            for flag in spec.train_flags
            if flag.field is not None and getattr(args, flag.dest) is not None
        },
        base,
    )
    settings = base
    if args.data is not None:
        settings = replace(settings, data=args.data)
    if args.batch_size is not None:
        settings = replace(settings, batch_size=args.batch_size)
    for flag in spec.train_flags:
        value = getattr(args, flag.dest)
        if value is not None:
            settings = flag.set(settings, value)
    return settings


#: Metrics that are rates: printed as percentages, as the evaluation tables print them.
RATE_METRICS = frozenset({"accuracy", "exact_match", "macro_f1", "majority_baseline"})


def format_metric(name: str, value: float) -> str:
    """``exact match 97.40%`` for a rate, ``chrf 91.3`` / ``loss 0.4121`` otherwise."""
    if name in RATE_METRICS:
        return f"{name.replace('_', ' ')} {100 * value:.2f}%"
    return f"{name.replace('_', ' ')} {value:.4g}"


class TrainProgress:
    """Training progress on stderr: a bar over steps (or over the time limit: elapsed/limit)
    with loss, learning rate and tokens/s, one line per validation, and the run's messages."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.bar: ProgressBar | None = None
        self.quiet = quiet
        self._header: str | None = None

    def header(self, line: str, *, setup: str) -> None:
        """The run's first line. On a terminal it is shown at once with ``setup`` (what the
        seconds before the first step are spent on); in a pipe or log it waits for the run's
        first message or step, so that an error found while setting up stays one line."""
        if self.quiet:
            return
        if sys.stderr.isatty():
            print(f"{line}; {setup}", file=sys.stderr, flush=True)
        else:
            self._header = line

    def _flush_header(self) -> None:
        if self._header is not None:
            header, self._header = self._header, None
            print(header, file=sys.stderr, flush=True)

    def on_step(self, report: StepReport) -> None:
        if self.quiet:
            return
        self._flush_header()
        by_steps = report.max_steps is not None
        if self.bar is None:
            if by_steps:
                self.bar = ProgressBar(report.max_steps or 1)
            else:
                self.bar = ProgressBar(int(report.max_seconds or 1), unit="s")
        done = report.step if by_steps else int(report.elapsed_s)
        note = (
            f"step {report.step}  loss {report.loss:.3f}  lr {report.lr:.1e}  "
            f"{report.tokens_per_s:,.0f} tok/s"
        )
        self.bar.update(done, note, elapsed=report.elapsed_s)

    def on_eval(self, report: EvalReport) -> None:
        scores = "  ".join(format_metric(k, v) for k, v in report.metrics.items())
        mark = " (best)" if report.improved else ""
        self.message(f"  validation at step {report.step}: {scores}{mark}")

    def message(self, line: str) -> None:
        """A line of its own (data sizes, "resuming from step N", a validation)."""
        if self.quiet:
            return
        self._flush_header()
        if self.bar is not None:
            self.bar.message(line)
        else:
            print(line, file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from qkv.tasks.base import get_task, train_task
    from qkv.train import TrainConfig, read_config

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    spec = get_task(args.task)
    if args.resume:
        saved = read_config(args.out)
        if saved.get("task") != spec.name:
            raise ValueError(
                f"{args.out}: holds a {saved.get('task')!r} model, not a {spec.name} one"
            )
        settings = task_settings(spec, args, spec.settings_from_dict(saved[spec.name]))
        training = training_config(args, TrainConfig.from_dict(saved["training"]))
    else:
        if args.data is None:
            raise ValueError(f"qkv train {spec.name}: --data is required (except with --resume)")
        settings = task_settings(spec, args, spec.settings_type())
        training = training_config(
            args, defaults=lambda steps: spec.training_defaults(settings, steps)
        )
    progress = TrainProgress(quiet=args.quiet)
    if os.environ.get("RANK", "0") == "0":
        # the run header: on a terminal, said before the seconds of data and model setup
        import torch

        threads = torch.get_num_threads()
        source = getattr(args, "threads_source", "torch's default")
        plural = "s" if threads != 1 else ""
        device = training.device or "auto"
        progress.header(
            f"qkv train {spec.name}: {'resuming ' if args.resume else ''}into {args.out}, "
            f"device {device}, {threads} CPU thread{plural} "
            f"({'from --threads' if source == '--threads' else source + '; --threads N to change'})",
            setup="reading the data and building the model ...",
        )
    outcome = train_task(
        spec,
        settings,
        training,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        backend=args.backend,
        context_parallel=args.context_parallel,
        training_given=training_given(args),
        on_step=progress.on_step,
        on_eval=progress.on_eval,
        on_message=progress.message,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the main process reports
        return 0
    state = outcome.result.state
    metric = getattr(outcome.settings, "metric", spec.metric_name)
    best = (
        ""
        if state.best_metric is None
        else f", best {metric} {state.best_metric:.4g} at step {state.best_step}"
    )
    used = outcome.training or training  # with the choices sized to the data
    kept = f" (the weights of step {state.best_step})" if used.keep_best else ""
    print(
        f"trained {state.step} steps in {state.elapsed_s:.0f}s ({outcome.result.stopped}{best}); "
        f"model folder: {outcome.out}{kept}"
    )
    return 0
