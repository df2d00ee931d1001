"""``qkv evaluate --model DIR [--model DIR2 ...] --data SPEC``: score model folders on held-out
data, overall and by source length, as a table, JSON, and a PNG.

The folder's ``config.json`` names its task; translation is scored here (BLEU, chrF, exact
match). Other tasks register a scorer in :data:`EVALUATORS`: task name -> ``"module:function"``,
the function taking ``(args, folder)`` and returning a JSON-ready dict (printed by this command).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

__all__ = ["EVALUATORS", "register"]

#: Scorers of the other tasks: ``{"sentiment": "qkv.cli.classify:evaluate_folder"}``.
EVALUATORS: dict[str, str] = {
    "sentiment": "qkv.cli.classify:evaluate_folder",
    "summarization": "qkv.cli.summarize:evaluate_folder",
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "evaluate",
        help="score model folders on held-out data (translation: BLEU, chrF, exact match)",
        description="qkv evaluate --model dates-model --data builtin:dates --plot scores.png",
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        required=True,
        help="model folder (repeat to compare several)",
    )
    p.add_argument(
        "--data", default=None, help="data spec (default: the data the model was trained on)"
    )
    p.add_argument("--split", choices=["test", "validation", "train"], default="test")
    p.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument(
        "--buckets", type=int, default=6, help="source-length buckets (default %(default)s)"
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="score vs source length, one line per model",
    )
    p.add_argument("--plot-metric", choices=["chrf", "bleu", "exact_match"], default="chrf")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_run)


def _task_of(folder: Path) -> str:
    from qkv.train import read_config

    return str(read_config(folder).get("task"))


def evaluate_translation(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Scores of one translation model folder (see :func:`qkv.tasks.evaluation.score_translations`)."""
    from qkv.data import load_pairs
    from qkv.tasks.evaluation import score_translations
    from qkv.tasks.translation import Translator

    translator = Translator.load(folder, device=args.device)
    options = translator.config.data_options if args.data is None else {}
    splits = load_pairs(args.data or translator.config.data, **options)
    pairs = splits[args.split][: args.limit]
    if not pairs:
        raise ValueError(
            f"--split {args.split}: no pairs in {args.data or translator.config.data!r}"
        )
    hypotheses = translator.translate([p.source for p in pairs], beam_size=args.beam)
    scores = score_translations(
        hypotheses, [p.target for p in pairs], [p.source for p in pairs], num_buckets=args.buckets
    )
    return {"model": str(folder), "task": "translation", "split": args.split, **scores.to_dict()}


def _evaluate(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    task = _task_of(folder)
    if task == "translation":
        return evaluate_translation(args, folder)
    if task not in EVALUATORS:
        known = ", ".join(["translation", *EVALUATORS])
        raise ValueError(f"--model {folder}: no evaluator for task {task!r} (known: {known})")
    module, _, function = EVALUATORS[task].partition(":")
    result: dict[str, Any] = getattr(importlib.import_module(module), function)(args, folder)
    return result


def _print_translation(report: dict[str, Any]) -> None:
    print(
        f"{report['model']}: {report['count']} pairs ({report['split']}): "
        f"BLEU {report['bleu']:.2f}  chrF {report['chrf']:.2f}  "
        f"exact match {100 * report['exact_match']:.2f}%"
    )
    print(f"  {'source chars':>14} {'pairs':>6} {'BLEU':>7} {'chrF':>7} {'exact':>8}")
    for b in report["by_length"]:
        print(
            f"  {str(b['low']) + '-' + str(b['high']):>14} {b['count']:>6} {b['bleu']:7.2f} "
            f"{b['chrf']:7.2f} {100 * b['exact_match']:7.2f}%"
        )


def _plot(args: argparse.Namespace, reports: list[dict[str, Any]]) -> Path | None:
    from qkv.tasks.evaluation import BucketScores, TranslationScores, plot_scores_by_length

    translations = [r for r in reports if r.get("task") == "translation"]
    names = [Path(r["model"]).name or r["model"] for r in translations]
    if len(set(names)) < len(names):  # e.g. a/model and b/model: show the paths
        names = [r["model"] for r in translations]
    if len(set(names)) < len(names):  # the same folder twice
        names = [f"{name} ({i})" for i, name in enumerate(names, start=1)]
    series = {}
    for name, r in zip(names, translations, strict=True):
        buckets = [BucketScores(**b) for b in r["by_length"]]
        series[name] = TranslationScores(
            r["count"], r["bleu"], r["chrf"], r["exact_match"], buckets
        )
    if not series:
        return None
    return plot_scores_by_length(series, args.plot, metric=args.plot_metric)


def _print_sentiment(report: dict[str, Any]) -> None:
    """Accuracy, macro-F1, the majority-class baseline and the confusion matrix."""
    print(f"{report['model']} on {report['data']} ({report['split']}, {report['count']} texts)")
    print(
        f"  accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   "
        f"majority class {report['majority_baseline']:.4f}   loss {report['loss']:.4f}"
    )
    labels = [str(label) for label in report["labels"]]
    width = max(8, *(len(label) for label in labels))
    print("  confusion (rows: gold, columns: predicted)")
    print("  " + " " * width + "".join(f" {label:>{width}}" for label in labels))
    for label, row in zip(labels, report["confusion"], strict=True):
        print(f"  {label:>{width}}" + "".join(f" {count:>{width}}" for count in row))


def _print_summarization(report: dict[str, Any]) -> None:
    """ROUGE-1/2/L F1 of the model and of the lead baseline, one row each."""
    print(
        f"{report['folder']} on {report['data']} ({report['split']}, {report['count']} documents)"
    )
    print(f"  {'':<12} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}")
    rows = [("model", report["model"]), (f"lead-{report['lead_sentences']}", report["lead"])]
    for name, scores in rows:
        print(
            f"  {name:<12} {scores['rouge1']:>8.2f} {scores['rouge2']:>8.2f} {scores['rougeL']:>8.2f}"
        )


_PRINTERS = {
    "translation": _print_translation,
    "sentiment": _print_sentiment,
    "summarization": _print_summarization,
}


def _run(args: argparse.Namespace) -> int:
    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    reports = [_evaluate(args, folder) for folder in args.model]
    plotted = _plot(args, reports) if args.plot is not None else None
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        for report in reports:
            printer = _PRINTERS.get(str(report.get("task")))
            if printer is not None:
                printer(report)
            else:
                print(json.dumps(report, indent=2))
    if plotted is not None and not args.json:
        print(f"plot: {plotted}")
    return 0
