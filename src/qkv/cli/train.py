"""``qkv train <task>``: shared training flags, progress printing, and the translation task.

Other tasks add a sub-command by listing a module in :data:`TRAIN_TASK_MODULES` that defines
``register_train(tasks)`` (``tasks`` is the ``train`` command's sub-parser collection) and can
reuse :func:`add_training_args`, :func:`training_config` and :class:`TrainProgress`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkv.cli.progress import ProgressBar

if TYPE_CHECKING:
    from qkv.train import EvalReport, StepReport, TrainConfig

__all__ = [
    "TRAIN_TASK_MODULES",
    "TrainProgress",
    "add_training_args",
    "register",
    "training_config",
]

#: Modules defining ``register_train(tasks)``, each adding ``qkv train <its task>``.
TRAIN_TASK_MODULES: tuple[str, ...] = ("qkv.cli.classify", "qkv.cli.summarize")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv train`` and its task sub-commands."""
    train = commands.add_parser("train", help="train a model for a task into a model folder")
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    _register_translation(tasks)
    for name in TRAIN_TASK_MODULES:
        importlib.import_module(name).register_train(tasks)


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


def add_training_args(p: argparse.ArgumentParser, *, steps: int = 2000) -> None:
    """The flags every ``qkv train <task>`` shares (limits, optimizer, schedule, output)."""
    g = p.add_argument_group("training")
    g.add_argument("--out", type=Path, required=True, help="model folder to write")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    g.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"step limit (default {steps} unless --minutes)",
    )
    g.add_argument("--minutes", type=_positive_float, default=None, help="time limit")
    g.add_argument(
        "--batch-size", type=_positive_int, default=64, help="pairs per batch (default %(default)s)"
    )
    g.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="peak learning rate (default %(default)s)"
    )
    g.add_argument("--warmup", type=int, default=200, help="warmup steps (default %(default)s)")
    g.add_argument(
        "--schedule", choices=["inverse_sqrt", "cosine", "constant"], default="inverse_sqrt"
    )
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument(
        "--clip-norm",
        type=_positive_float,
        default=1.0,
        help="gradient norm clip (default %(default)s)",
    )
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        default=500,
        help="validate every N steps (default %(default)s)",
    )
    g.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        help="stop after N validations without improvement",
    )
    g.add_argument(
        "--keep-best",
        action="store_true",
        help="the model folder keeps the best-validated weights, not the last step's",
    )
    g.add_argument(
        "--log-every", type=_positive_int, default=20, help="progress line every N steps"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    p.set_defaults(default_steps=steps)


def training_config(args: argparse.Namespace) -> TrainConfig:
    """A :class:`~qkv.train.TrainConfig` from :func:`add_training_args`'s flags."""
    from qkv.train import TrainConfig

    steps = args.steps
    if steps is None and args.minutes is None:
        steps = args.default_steps
    return TrainConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        schedule=args.schedule,
        max_steps=steps,
        max_minutes=args.minutes,
        clip_norm=args.clip_norm,
        eval_every=args.eval_every,
        patience=args.patience,
        keep_best=args.keep_best,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
    )


class TrainProgress:
    """Training progress on stderr: a bar over steps (or minutes) with loss, learning rate and
    tokens/s, and one line per validation."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.bar: ProgressBar | None = None
        self.quiet = quiet

    def on_step(self, report: StepReport) -> None:
        if self.quiet:
            return
        by_steps = report.max_steps is not None
        total = report.max_steps if by_steps else int(report.max_seconds or 1)
        if self.bar is None:
            self.bar = ProgressBar(total or 1)
        done = report.step if by_steps else int(report.elapsed_s)
        note = (
            f"step {report.step}  loss {report.loss:.3f}  lr {report.lr:.1e}  "
            f"{report.tokens_per_s:,.0f} tok/s"
        )
        self.bar.update(done, note, elapsed=report.elapsed_s)

    def on_eval(self, report: EvalReport) -> None:
        if self.quiet:
            return
        scores = "  ".join(f"{k} {v:.4g}" for k, v in report.metrics.items())
        mark = " (best)" if report.improved else ""
        line = f"  validation at step {report.step}: {scores}{mark}"
        if self.bar is not None:
            self.bar.message(line)
        else:
            print(line, file=sys.stderr)


def _register_translation(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = tasks.add_parser(
        "translation",
        help="sequence-to-sequence translation (Transformer or RNN with attention)",
        description="Train a translation model: qkv train translation --data builtin:dates --out dates-model",
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data", required=True, help="builtin:NAME, a .tsv/.jsonl file, SRC,TGT files or a folder"
    )
    g.add_argument("--model", choices=["transformer", "rnn"], default="transformer")
    g.add_argument(
        "--attention",
        choices=["bahdanau", "luong", "none"],
        default=None,
        help="the RNN's attention (default bahdanau); not for the Transformer",
    )
    g.add_argument("--preset", choices=["tiny", "small", "base"], default="tiny")
    g.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    g.add_argument(
        "--tokenizer",
        choices=["auto", "char", "bpe"],
        default="auto",
        help="auto: characters for dates/numbers, BPE otherwise",
    )
    g.add_argument("--vocab-size", type=_positive_int, default=None, help="BPE vocabulary size")
    g.add_argument(
        "--separate-vocab", action="store_true", help="separate source and target vocabularies"
    )
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument(
        "--metric",
        choices=["exact_match", "chrf", "bleu", "loss"],
        default="chrf",
        help="validation metric for early stopping",
    )
    g.add_argument(
        "--valid-size",
        type=_positive_int,
        default=500,
        help="validation pairs decoded per validation",
    )
    g.add_argument(
        "--max-length", type=_positive_int, default=256, help="cut longer sequences (tokens)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_training_args(p)
    p.set_defaults(run=_run_translation)


def _translation_config(args: argparse.Namespace) -> Any:
    from qkv.tasks.translation import TranslationConfig

    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    return TranslationConfig(
        data=args.data,
        model=args.model,
        attention=args.attention,
        preset=args.preset,
        model_overrides=overrides,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        shared_vocab=not args.separate_vocab,
        batch_size=args.batch_size,
        max_source_length=args.max_length,
        max_target_length=args.max_length,
        label_smoothing=args.label_smoothing,
        metric=args.metric,
        valid_size=args.valid_size,
    )


def _resume_limits(args: argparse.Namespace, training: TrainConfig) -> TrainConfig:
    """On ``--resume`` without ``--steps``/``--minutes``, keep the saved run's limits."""
    if not args.resume or args.steps is not None or args.minutes is not None:
        return training
    from dataclasses import replace

    from qkv.train import TrainConfig, read_config

    saved = TrainConfig.from_dict(read_config(args.out)["training"])
    return replace(training, max_steps=saved.max_steps, max_minutes=saved.max_minutes)


def _run_translation(args: argparse.Namespace) -> int:
    import logging

    from qkv.tasks.translation import train_translation

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    progress = TrainProgress(quiet=args.quiet)
    outcome = train_translation(
        _translation_config(args),
        _resume_limits(args, training_config(args)),
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        on_step=progress.on_step,
        on_eval=progress.on_eval,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the main process reports
        return 0
    state = outcome.result.state
    best = (
        ""
        if state.best_metric is None
        else f", best {outcome.config.metric} {state.best_metric:.4g} at step {state.best_step}"
    )
    print(
        f"trained {state.step} steps in {state.elapsed_s:.0f}s ({outcome.result.stopped}{best}); model folder: {outcome.out}"
    )
    return 0
