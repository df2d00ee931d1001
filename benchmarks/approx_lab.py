r"""The approximation lab: what approximate attention (:mod:`qkv.approx`) costs a trained model.

The attention-only measurements (error on synthetic inputs, time and memory vs N) are the
library's ``qkv bench approx`` (:mod:`qkv.bench.approx`); this script adds the experiments that
train or load models, all through the library's public lifecycle
(:func:`qkv.tasks.train_task`, :func:`qkv.tasks.evaluate_model`):

- **task** -- the sentiment classifier (``builtin:rt``, BPE tokens, N ~ 30) trained with each
  attention for the same wall-clock budget, several seeds; test accuracy mean and spread;
- **error** -- also on real activations: ``q, k, v`` captured from the exact classifier of the
  task part, run over real reviews concatenated to ``real_n`` tokens;
- **drop-in** -- that classifier evaluated with each approximation swapped in
  (:func:`qkv.nn.swap_attention`) without retraining. With ``--model FOLDER`` (a fine-tuned
  pretrained classifier) it is that model instead, on the Rotten Tomatoes test split, at the
  settings of :data:`PRETRAINED_METHODS` (:func:`pretrained_dropin`), and nothing is trained.
  :func:`dropin_accuracy` is the hook for any other model and score.

What each approximation runs with comes from its registry entry (``short`` settings for the
task part), so a new approximation needs no change here.

    OMP_NUM_THREADS=1 python benchmarks/approx_lab.py --out runs/approx     # all parts
    python benchmarks/approx_lab.py --quick                                 # seconds
    python benchmarks/approx_lab.py --parts dropin --model runs/rt-minilm   # (d)

Sizes: :class:`LabSizes` (defaults: under 30 minutes on a 2-core CPU); ``--quick`` for tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import qkv
from qkv.approx import APPROXIMATIONS
from qkv.bench import approx as bench
from qkv.bench.approx import (
    BenchResult,
    BenchSizes,
    error_rows,
    measure_parts,
    parse_lengths,
    save_result,
)
from qkv.data.labeled import LabeledText, load_labeled
from qkv.nn import MultiHeadAttention, swap_attention
from qkv.tasks import evaluate_model, get_task, train_task
from qkv.tasks.sentiment_settings import SentimentSettings
from qkv.tasks.text_classification import encode_texts, evaluate_classifier
from qkv.train import TrainConfig

__all__ = [
    "PARTS",
    "PRETRAINED_METHODS",
    "TASK_METHODS",
    "LabResult",
    "LabSizes",
    "capture_qkv",
    "dropin_accuracy",
    "format_tables",
    "main",
    "pretrained_dropin",
    "run_lab",
]

#: Attention settings of the task part: each approximation's registry ``short`` settings,
#: sized for reviews of ~30 tokens so that each method really approximates.
TASK_METHODS: dict[str, dict[str, Any]] = {
    "exact": {},
    **{name: dict(entry.short) for name, entry in APPROXIMATIONS.items()},
}
#: Tokens kept per review in the task part (head + tail).
MAX_LENGTH = 64
PARTS = ("task", "error", "speed", "dropin")


@dataclass(frozen=True)
class LabSizes(BenchSizes):
    """:class:`~qkv.bench.approx.BenchSizes` plus the experiments' sizes.

    Attributes:
        real_n: tokens of real text the captured activations cover.
        task_budget_s: training seconds per (attention, seed) run.
        seeds: seeds per run.
        train_limit, test_limit: examples used (None: all).
    """

    real_n: int = 512
    task_budget_s: float = 15.0
    seeds: int = 3
    train_limit: int | None = None
    test_limit: int | None = None

    @classmethod
    def quick(cls) -> LabSizes:
        """Seconds in all: for tests and a first look."""
        return replace(
            cls(**vars(BenchSizes.quick())),
            real_n=64,
            task_budget_s=0.3,
            seeds=2,
            train_limit=128,
            test_limit=64,
        )


@dataclass
class LabResult(BenchResult):
    """:class:`~qkv.bench.approx.BenchResult` plus the experiments' rows."""

    task: list[dict[str, Any]] = field(default_factory=list)
    dropin: list[dict[str, Any]] = field(default_factory=list)
    dropin_pretrained: list[dict[str, Any]] = field(default_factory=list)
    dropin_source: str = ""


# --- the task: sentiment at an equal time budget, through train_task -------------------------


def _sample(items: Sequence[Any], limit: int | None, pick: random.Random) -> list[Any]:
    return list(items) if limit is None or limit >= len(items) else pick.sample(list(items), limit)


def write_data(sizes: LabSizes, folder: Path) -> list[LabeledText]:
    """A data folder (``train.jsonl``, ``test.jsonl``) of Rotten Tomatoes subsets sampled with
    seed 0 (a split may be ordered by label); returns the test examples."""
    splits = load_labeled("builtin:rt")
    pick = random.Random(0)
    train = _sample(splits.train, sizes.train_limit, pick)
    test = _sample(splits.test, sizes.test_limit, pick)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        lines = [json.dumps({"text": e.text, "label": e.label}) for e in rows]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return test


def train_for(
    data: Path, attention: str, seed: int, budget_s: float, out: Path
) -> tuple[Any, float, int]:
    """Train the sentiment task's small transformer classifier with ``attention`` for
    ``budget_s`` seconds (AdamW 2e-3, batches of 32) into ``out``; return its predictor,
    its test accuracy and the steps it took."""
    options = dict(TASK_METHODS[attention])
    if attention == "linformer":
        options["max_len"] = MAX_LENGTH
    settings = SentimentSettings(
        data=str(data),
        preset="transformer-small",
        max_length=MAX_LENGTH,
        batch_size=32,
        model_overrides={
            "embed_dim": 64,
            "hidden_dim": 128,
            "pool_dim": 64,
            "dropout": 0.1,
            "attention": attention,
            "attention_options": options or None,
        },
    )
    training = TrainConfig(
        lr=2e-3,
        warmup_steps=0,
        schedule="constant",
        max_steps=None,
        max_minutes=budget_s / 60,
        eval_every=10**9,  # validate once, at the end
        log_every=10**9,
        seed=seed,
        device="cpu",
    )
    outcome = train_task("sentiment", settings, training, out, overwrite=True)
    accuracy = evaluate_model(out, split="test", device="cpu").metrics["accuracy"]
    classifier = get_task("sentiment").load(out, device="cpu")
    return classifier, float(accuracy), outcome.result.state.step


# --- drop-in: swapping approximations into a trained model ---------------------------------


def dropin_accuracy(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    methods: dict[str, dict[str, Any]] | Sequence[tuple[str, dict[str, Any]]],
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` as trained (exact) and with each approximation swapped into every
    :class:`qkv.nn.MultiHeadAttention` (no retraining), then restore exact attention.

    This is the hook for a pretrained encoder: ``dropin_accuracy(loaded, my_eval, methods)``
    (:func:`pretrained_dropin` does it for a fine-tuned pretrained classifier).

    Args:
        model: any module tree holding qkv ``MultiHeadAttention``.
        evaluate: ``evaluate(model) -> accuracy`` (or any score).
        methods: name -> options, e.g. :data:`TASK_METHODS`, or ``(name, options)`` pairs when
            one method appears with several settings (:data:`PRETRAINED_METHODS`).
        progress: called with each method's name before it is evaluated.

    Returns:
        One row per setting: ``method``, ``options``, ``score``, ``change`` (vs exact).
    """
    say = progress or (lambda text: None)
    pairs = list(methods.items()) if isinstance(methods, dict) else list(methods)
    swap_attention(model, "exact")
    say("exact")
    base = evaluate(model)
    rows: list[dict[str, Any]] = [{"method": "exact", "options": {}, "score": base, "change": 0.0}]
    try:
        for name, options in pairs:
            if name == "exact":
                continue
            say(f"{name} {options}")
            torch.manual_seed(0)  # the same random features / projections on every run
            swap_attention(model, name, **options)
            score = evaluate(model)
            rows.append(
                {"method": name, "options": dict(options), "score": score, "change": score - base}
            )
    finally:
        swap_attention(model, "exact")
    return rows


#: Drop-in settings for a pretrained encoder on short sentences (Rotten Tomatoes: N ~ 25
#: wordpieces, 60 at most): each knob from far below N to about N.
PRETRAINED_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("linear", {}),
    ("performer", {"num_features": 16}),
    ("performer", {"num_features": 64}),
    ("performer", {"num_features": 256}),
    ("nystrom", {"num_landmarks": 8}),
    ("nystrom", {"num_landmarks": 16}),
    ("nystrom", {"num_landmarks": 32}),
    ("linformer", {"max_len": 512, "rank": 32}),  # untrained projections: a floor, not a method
    ("local", {"window": 4}),
    ("local", {"window": 8}),
    ("local", {"window": 16}),
    ("bigbird", {"block_size": 4}),
    ("bigbird", {"block_size": 8}),
)


def pretrained_dropin(
    classifier: Any,
    examples: Sequence[Any],
    methods: Sequence[tuple[str, dict[str, Any]]] = PRETRAINED_METHODS,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`dropin_accuracy` of a fine-tuned pretrained classifier on labelled texts.

    Args:
        classifier: a ``qkv.tasks.pretrained_sentiment.PretrainedTextClassifier``.
        examples: ``LabeledText`` items (e.g. the Rotten Tomatoes test split).
        methods: ``(name, options)`` pairs.
        progress: called with each method before it is evaluated.

    Returns:
        :func:`dropin_accuracy`'s rows (``score`` is the accuracy).
    """

    def accuracy(model: nn.Module) -> float:
        return float(evaluate_classifier(classifier, examples)["accuracy"])

    return dropin_accuracy(classifier.model, accuracy, methods, progress)


def _pretrained_rows(folder: Path, limit: int | None, say: Callable[[str], None]) -> list[Any]:
    classifier = get_task("sentiment").load(folder, device="cpu")
    test = _sample(load_labeled("builtin:rt").test, limit, random.Random(0))
    return pretrained_dropin(classifier, test, progress=lambda t: say(f"drop-in pretrained {t}"))


# --- capturing real activations --------------------------------------------------------------


def capture_qkv(model: nn.Module, ids: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(q, k, v)`` of every qkv ``MultiHeadAttention`` call while ``model(ids, mask)`` runs
    (after projection and RoPE, exactly what attention sees), in call order."""
    seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def spy(q: Tensor, k: Tensor, v: Tensor, *, mask: Any = None, causal: Any = False) -> Tensor:
        seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return qkv.attention(q, k, v, mask=mask, causal=causal)

    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    before = [(m.attention_name, m.attention_impl) for m in modules]
    for m in modules:
        m.set_attention(spy)
    try:
        model.eval()
        with torch.no_grad():
            model(ids, mask)
    finally:
        for m, (name, impl) in zip(modules, before, strict=True):
            m.set_attention("exact" if impl is None else impl)
            m.attention_name = name
    return seen


def _long_text(classifier: Any, examples: Sequence[LabeledText], n: int) -> tuple[Tensor, Tensor]:
    """Test reviews concatenated into one sequence of ``n`` tokens: ``(1, n)`` ids and mask."""
    tokens: list[int] = []
    for row in encode_texts(classifier.tokenizer, [e.text for e in examples], MAX_LENGTH):
        tokens.extend(row)
        if len(tokens) >= n:
            break
    row = torch.tensor([tokens[:n]])
    return row, row != 0


# --- the lab ---------------------------------------------------------------------------------


def run_lab(
    sizes: LabSizes,
    parts: Sequence[str] = PARTS,
    progress: Callable[[str], None] | None = None,
    model_folder: Path | None = None,
) -> LabResult:
    """Run the chosen parts (the error and drop-in parts reuse the exact model of the task part,
    which then trains at least that one model). With ``model_folder`` (a fine-tuned pretrained
    classifier's folder), the drop-in part evaluates that model on the Rotten Tomatoes test split
    (``sizes.test_limit`` sentences) instead, and trains nothing."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    say = progress or (lambda text: None)
    started = time.perf_counter()
    result = LabResult(sizes, os.getloadavg(), torch.get_num_threads())
    trains_for = {"task", "error"} | (set() if model_folder is not None else {"dropin"})
    with tempfile.TemporaryDirectory(prefix="approx-lab-") as tmp:
        exact, test = None, []
        if trains_for & set(parts):
            exact, test = _task_part(result, sizes, parts, Path(tmp), say)
        if "dropin" in parts and model_folder is not None:
            result.dropin_pretrained = _pretrained_rows(model_folder, sizes.test_limit, say)
            result.dropin_source = str(model_folder)
        elif "dropin" in parts and exact is not None:
            say("drop-in")
            swaps = {n: o for n, o in TASK_METHODS.items() if n != "linformer"}  # learned E, F
            clf = exact
            result.dropin = dropin_accuracy(
                clf.model, lambda m: float(evaluate_classifier(clf, test)["accuracy"]), swaps
            )
        if "error" in parts and exact is not None:
            ids, mask = _long_text(exact, test, sizes.real_n)
            captured = capture_qkv(exact.model, ids, mask)
            for layer in (0, len(captured) - 1):
                q, k, v = captured[layer]
                say(f"error real layer {layer}")
                source = f"real (bpe, N={ids.shape[1]}, layer {layer + 1})"
                result.error += error_rows(source, q, k, v)
    measure_parts(result, sizes, [p for p in parts if p in ("error", "speed")], progress)
    result.seconds = time.perf_counter() - started
    return result


def _task_part(
    result: LabResult,
    sizes: LabSizes,
    parts: Sequence[str],
    tmp: Path,
    say: Callable[[str], None],
) -> tuple[Any, list[LabeledText]]:
    """Train every attention (only exact, seed 0, unless the task part runs); return the
    exact classifier of seed 0 and the test examples."""
    test = write_data(sizes, tmp / "data")
    methods = list(TASK_METHODS) if "task" in parts else ["exact"]
    exact = None
    for name in methods:
        for seed in range(sizes.seeds if "task" in parts else 1):
            say(f"task {name} seed {seed}")
            out = tmp / f"{name}-{seed}"
            clf, acc, steps = train_for(tmp / "data", name, seed, sizes.task_budget_s, out)
            if "task" in parts:
                mean_len = statistics.fmean(len(r) for r in clf.dataset(test).ids)
                result.task.append(
                    {
                        "tokens": "bpe",
                        "mean_len": mean_len,
                        "method": name,
                        "seed": seed,
                        "accuracy": acc,
                        "steps": steps,
                    }
                )
            if name == "exact" and seed == 0:
                exact = clf
    return exact, test


# --- tables ----------------------------------------------------------------------------------


def format_tables(result: LabResult) -> str:
    """Markdown tables of every part that ran (the library's, then the experiments')."""
    out = [bench.format_tables(result), ""]
    if result.task:
        out += ["### Task accuracy at an equal time budget", ""]
        out += [
            f"sentiment (builtin:rt), {result.sizes.task_budget_s:g} s of training per run, "
            f"{result.sizes.seeds} seeds; test accuracy mean ± std (steps taken, mean)",
            "",
            "| tokens (mean N) | method | accuracy | steps |",
            "|---|---|---|---|",
        ]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in result.task:
            groups.setdefault((r["tokens"], r["method"]), []).append(r)
        for (mode, method), rs in groups.items():
            accs = [r["accuracy"] for r in rs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            steps = statistics.fmean(r["steps"] for r in rs)
            out.append(
                f"| {mode} ({rs[0]['mean_len']:.0f}) | {method} | "
                f"{statistics.fmean(accs):.3f} ± {spread:.3f} | {steps:.0f} |"
            )
        out.append("")
    if result.dropin:
        out += ["### Drop-in without retraining (classifier trained with exact attention)", ""]
        out += ["| method | accuracy | change |", "|---|---|---|"]
        for r in result.dropin:
            out.append(f"| {r['method']} | {r['score']:.3f} | {r['change']:+.3f} |")
        out.append("")
    if result.dropin_pretrained:
        n = result.sizes.test_limit
        out += [
            "### Drop-in on the fine-tuned pretrained encoder, without retraining",
            "",
            f"{result.dropin_source}; Rotten Tomatoes test, "
            + ("all sentences" if n is None else f"{n} sentences sampled with seed 0"),
            "",
            "| method | setting | accuracy | change |",
            "|---|---|---|---|",
        ]
        for r in result.dropin_pretrained:
            setting = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
            out.append(f"| {r['method']} | {setting} | {r['score']:.3f} | {r['change']:+.3f} |")
        out.append("")
    return "\n".join(out)


# --- the command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="approx_lab.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts from {','.join(PARTS)} (default all)",
    )
    p.add_argument("--n", default=None, help="speed part's sequence lengths, comma-separated")
    p.add_argument("--budget", type=float, default=None, help="training seconds per task run")
    p.add_argument("--seeds", type=int, default=None, help="seeds per task run")
    p.add_argument("--out", type=Path, default=None, help="folder for approx.json and the plot")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a fine-tuned pretrained classifier's folder: the dropin part swaps into it "
        "(Rotten Tomatoes test) instead of training one",
    )
    p.add_argument("--limit", type=int, default=None, help="test sentences used (default all)")
    return p


def _sizes(args: argparse.Namespace) -> LabSizes:
    sizes = LabSizes.quick() if args.quick else LabSizes()
    if args.n:
        sizes = replace(sizes, speed_ns=parse_lengths(args.n))
    if args.budget is not None:
        if not args.budget > 0:
            raise ValueError(f"--budget must be > 0 seconds; got {args.budget}")
        sizes = replace(sizes, task_budget_s=args.budget)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1; got {args.seeds}")
        sizes = replace(sizes, seeds=args.seeds)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1; got {args.limit}")
        sizes = replace(sizes, test_limit=args.limit)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/approx_lab.py [options]``; a bad option is one line on stderr and
    exit code 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        sizes = _sizes(args)
        if args.model is not None and not args.model.is_dir():
            raise ValueError(f"--model: {args.model} is not a folder")
        parts = [p for p in args.parts.split(",") if p]
        result = run_lab(
            sizes,
            parts,
            progress=lambda text: print(f"  {text} ...", file=sys.stderr),
            model_folder=args.model,
        )
    except ValueError as error:
        print(f"approx_lab.py: error: {error}", file=sys.stderr)
        return 2
    print(format_tables(result))
    if args.out is not None:
        print("wrote " + " and ".join(str(path) for path in save_result(result, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
