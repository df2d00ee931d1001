"""``qkv evaluate --model DIR [--model DIR2 ...] [--data SPEC]``: score model folders of any task.

Parse -> :func:`qkv.tasks.evaluate_model` -> print. The policy is the library's: a file given
to ``--data`` is the evaluation set (every example is scored); ``--split`` picks a split of a
built-in set, a data folder or the training data (the default). ``--json`` prints, per model,
one object with the same keys for every task: ``task``, ``model``, ``data``, ``split``,
``examples``, ``metrics``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qkv.cli.train import add_runtime_args
    from qkv.tasks.base import get_task, task_names

    p = commands.add_parser(
        "evaluate",
        help="score model folders on held-out data or on a file (any task)",
        description="qkv evaluate --model dates-model [--data test.tsv] [--json] [--plot scores.png]",
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        required=True,
        help="model folder (repeat to compare several)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="a file (every example is scored), builtin:NAME or a data folder (its --split); "
        "default: the data the model was trained on",
    )
    p.add_argument(
        "--split",
        choices=["test", "validation", "train"],
        default=None,
        help="of a built-in set, a data folder or the training data (default test); not for a file",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument(
        "--buckets", type=int, default=6, help="source-length buckets (default %(default)s)"
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="translation: score vs source length, one line per model",
    )
    p.add_argument("--plot-metric", choices=["chrf", "bleu", "exact_match"], default="chrf")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from qkv.cli.outputs import add_overwrite_arg

    add_overwrite_arg(p)
    readers = p.add_argument_group("reader options (default: those saved in the model folder)")
    seen: set[str] = set()
    for name in task_names():
        for flag in get_task(name).train_flags:
            if flag.reader and flag.name not in seen:
                seen.add(flag.name)
                readers.add_argument(flag.name, default=None, help=f"{name}: {flag.help}")
    add_runtime_args(p)
    p.set_defaults(run=_run)


def _reader_options(args: argparse.Namespace) -> dict[str, Any]:
    from qkv.tasks.base import get_task, task_names

    options = {}
    for name in task_names():
        for flag in get_task(name).train_flags:
            value = getattr(args, flag.dest, None)
            if flag.reader and value is not None and flag.field is not None:
                options[flag.field.partition(".")[2]] = value
    return options


def _plot(args: argparse.Namespace, reports: list[dict[str, Any]]) -> Path | None:
    from qkv.tasks.evaluation import BucketScores, TranslationScores, plot_scores_by_length

    translations = [r for r in reports if r["task"] == "translation"]
    names = [Path(r["model"]).name or r["model"] for r in translations]
    if len(set(names)) < len(names):  # e.g. a/model and b/model: show the paths
        names = [r["model"] for r in translations]
    if len(set(names)) < len(names):  # the same folder twice
        names = [f"{name} ({i})" for i, name in enumerate(names, start=1)]
    series = {}
    for name, r in zip(names, translations, strict=True):
        m = r["metrics"]
        buckets = [BucketScores(**b) for b in m["by_length"]]
        series[name] = TranslationScores(
            m["count"], m["bleu"], m["chrf"], m["exact_match"], buckets
        )
    if not series:
        return None
    return plot_scores_by_length(series, args.plot, metric=args.plot_metric)


def _run(args: argparse.Namespace) -> int:
    from qkv.tasks.base import EvalOptions, evaluate_model
    from qkv.train import seed_everything

    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    seed_everything(args.seed)
    if args.plot is not None:
        from qkv.cli.outputs import check_outputs

        inputs = [args.data] if args.data is not None and Path(args.data).is_file() else []
        check_outputs([("--plot", args.plot)], inputs=inputs, overwrite=args.overwrite)
    options = EvalOptions(beam_size=args.beam, num_buckets=args.buckets)
    evaluations = [
        evaluate_model(
            folder,
            data=args.data,
            split=args.split,
            limit=args.limit,
            reader_options=_reader_options(args),
            device=args.device,
            backend=args.backend,
            options=options,
        )
        for folder in args.model
    ]
    reports = [e.to_dict() for e in evaluations]
    plotted = _plot(args, reports) if args.plot is not None else None
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        for evaluation in evaluations:
            print(evaluation.table())
        if plotted is not None:
            print(f"plot: {plotted}")
    return 0
