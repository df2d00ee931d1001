"""Score vs source length for an RNN without attention, an RNN with Bahdanau attention and a
Transformer, in the shape of Bahdanau et al. (ICLR 2015), figure 2.

The three models train on the same built-in ``numbers`` pairs (English number words ->
digits, 1 to ``--max-digits`` digits, so sources run from ``zero`` to about a hundred
characters at 8 digits), with one shared byte-level BPE vocabulary of 300 tokens (number
words in one to three pieces, digits one token each: a third of the character count, which
keeps the RNNs affordable on a CPU), the same seed and the same budget (``--steps`` each, or
``--minutes``), then translate the same held-out pairs greedily. Scores are cut into buckets
of about equally many held-out pairs by source length in characters (the same buckets for
every model). The sizes are chosen so that the three have about the same number of
parameters; the RNN without attention gets the largest recurrent state, since that state is
all it has. Each model trains at its own peak learning rate (see :data:`MODELS`).

Writes into ``--out``: one model folder per model, ``results.json`` (settings, parameter
counts, steps, training times, scores overall and by length, some errors), ``by_length.png``
(exact match vs source length, one line per model) and ``table.md``.

    OMP_NUM_THREADS=1 python benchmarks/length_experiment.py --out length-experiment
    python benchmarks/length_experiment.py --steps 30 --n-train 500 --out /tmp/toy   # seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkv.train import StepReport

__all__ = ["MODELS", "ModelSpec", "markdown_tables", "run_experiment"]

logger = logging.getLogger("length_experiment")


@dataclass(frozen=True)
class ModelSpec:
    """One of the compared models: the translation settings that differ between them."""

    name: str
    model: str  # "transformer" or "rnn"
    attention: str | None
    preset: str
    overrides: dict[str, Any]
    lr: float  # peak learning rate (the RNNs learn far slower at the Transformer's 2e-3)


#: About 0.24-0.25 M parameters each with the ``numbers`` character vocabulary.
MODELS: tuple[ModelSpec, ...] = (
    # Sutskever et al. / Cho et al.: the final encoder states (2 x 128) are all the decoder gets
    # of the source; ``input_feeding`` hands that summary to every decoder step, as in Cho et
    # al. (2014), the baseline of Bahdanau et al.
    ModelSpec(
        "RNN, no attention",
        "rnn",
        "none",
        "tiny",
        {"embed_dim": 32, "hidden_dim": 104, "input_feeding": True, "dropout": 0.0},
        1e-2,
    ),
    ModelSpec(
        "RNN + Bahdanau attention",
        "rnn",
        "bahdanau",
        "tiny",
        {"embed_dim": 32, "hidden_dim": 96, "dropout": 0.0},
        1e-2,
    ),
    ModelSpec(
        "Transformer",
        "transformer",
        None,
        "tiny",
        {"positional": "rope", "dropout": 0.0},
        2e-3,  # as in ``qkv demo``
    ),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("length-experiment"))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="training time per model")
    budget.add_argument(
        "--steps", type=int, default=None, help="training steps per model (default 1000)"
    )
    parser.add_argument("--max-digits", type=int, default=8, help="longest number (digits)")
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--buckets", type=int, default=8, help="source-length buckets")
    parser.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe")
    parser.add_argument("--vocab-size", type=int, default=300, help="BPE vocabulary (shared)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="one peak learning rate for all (default: each model's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models",
        default="all",
        help="comma-separated indices into MODELS (0: no attention, 1: Bahdanau, 2: Transformer)",
    )
    args = parser.parse_args(argv)
    if args.minutes is None and args.steps is None:
        args.steps = 1000
    return args


def _configs(args: argparse.Namespace, spec: ModelSpec) -> tuple[Any, Any]:
    from qkv.tasks.translation import TranslationConfig
    from qkv.train import TrainConfig

    translation = TranslationConfig(
        data="builtin:numbers",
        data_options={
            "n_train": args.n_train,
            "n_validation": 200,
            "n_test": args.n_test,
            "max_digits": args.max_digits,
            "seed": args.seed,
        },
        model=spec.model,
        attention=spec.attention,
        preset=spec.preset,
        model_overrides=spec.overrides,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size if args.tokenizer == "bpe" else None,
        label_smoothing=0.0,
        metric="exact_match",
        batch_size=args.batch_size,
        valid_size=200,
    )
    limit = args.steps if args.steps is not None else 10**9
    training = TrainConfig(
        lr=spec.lr if args.lr is None else args.lr,
        warmup_steps=min(100, max(1, limit // 10)),
        schedule="cosine",  # anneals by whichever limit is nearer, steps or minutes
        max_steps=limit,
        max_minutes=args.minutes,
        eval_every=limit,  # validate once, at the end: the budget goes to training
        log_every=50,
        seed=args.seed,
        device="cpu",
    )
    return translation, training


def train_and_score(args: argparse.Namespace, spec: ModelSpec, folder: Path) -> dict[str, Any]:
    """Train one model into ``folder`` and score it on the held-out split by source length."""
    from qkv.tasks.evaluation import score_translations
    from qkv.tasks.translation import Translator, train_translation

    translation, training = _configs(args, spec)
    outcome = train_translation(
        translation, training, folder, overwrite=True, on_step=_log_step(spec.name)
    )
    state = outcome.result.state
    translator = Translator.load(folder, device="cpu")
    test = outcome.splits.test
    started = time.perf_counter()
    hypotheses = translator.translate([p.source for p in test])
    decode_s = time.perf_counter() - started
    scores = score_translations(
        hypotheses,
        [p.target for p in test],
        [p.source for p in test],
        num_buckets=args.buckets,
    )
    errors = [
        {"source": p.source, "reference": p.target, "translation": h}
        for p, h in zip(test, hypotheses, strict=True)
        if h.strip() != p.target.strip()
    ]
    return {
        "name": spec.name,
        "model": translator.model.__class__.__name__,
        "settings": {"model": spec.model, "attention": spec.attention, **spec.overrides},
        "parameters": sum(p.numel() for p in translator.model.parameters()),
        "steps": state.step,
        "train_seconds": state.elapsed_s,
        "stopped": outcome.result.stopped,
        "final_loss": state.losses[-1] if state.losses else None,
        "decode_seconds": decode_s,
        "scores": scores.to_dict(),
        "error_samples": errors[:: max(1, len(errors) // 10)][:10],
    }


def _log_step(name: str) -> Callable[[StepReport], None]:
    def log(report: StepReport) -> None:
        logger.info(
            "%s: step %d  loss %.4f  %.0f s", name, report.step, report.loss, report.elapsed_s
        )

    return log


def markdown_tables(results: Sequence[dict[str, Any]]) -> str:
    """The models (parameters, steps, time, overall scores) and exact match / chrF by source
    length, as Markdown. Every result must have been scored on the same buckets.

    Raises:
        ValueError: the results' length buckets differ.
    """
    if not results:
        return ""
    buckets = [(b["low"], b["high"], b["count"]) for b in results[0]["scores"]["by_length"]]
    for r in results[1:]:
        other = [(b["low"], b["high"], b["count"]) for b in r["scores"]["by_length"]]
        if other != buckets:
            raise ValueError(f"{r['name']!r} was scored on other buckets: {other} vs {buckets}")
    lines = [
        "| model | parameters | steps | training (s) | exact match | chrF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["scores"]
        lines.append(
            f"| {r['name']} | {r['parameters']:,} | {r['steps']:,} | {r['train_seconds']:.0f} "
            f"| {100 * s['exact_match']:.1f}% | {s['chrf']:.1f} |"
        )
    lines += ["", _by_length_header(results)]
    lines.append("|---:|---:|" + "---:|" * (2 * len(results)))
    for i, (low, high, count) in enumerate(buckets):
        ems = [f"{100 * r['scores']['by_length'][i]['exact_match']:.1f}%" for r in results]
        chrfs = [f"{r['scores']['by_length'][i]['chrf']:.1f}" for r in results]
        lines.append(f"| {low}-{high} | {count} | " + " | ".join(ems + chrfs) + " |")
    return "\n".join(lines) + "\n"


def _by_length_header(results: Sequence[dict[str, Any]]) -> str:
    names = [r["name"] for r in results]
    cells = [f"exact match: {n}" for n in names] + [f"chrF: {n}" for n in names]
    return "| source characters | pairs | " + " | ".join(cells) + " |"


def plot(results: Sequence[dict[str, Any]], path: Path, *, max_digits: int) -> Path:
    """Exact match vs source length, one line per model (via ``qkv.tasks.evaluation``)."""
    from qkv.tasks.evaluation import BucketScores, TranslationScores, plot_scores_by_length

    series = {}
    for r in results:
        s = r["scores"]
        buckets = [BucketScores(**b) for b in s["by_length"]]
        series[r["name"]] = TranslationScores(
            s["count"], s["bleu"], s["chrf"], s["exact_match"], buckets
        )
    title = f"numbers (1-{max_digits} digits): held-out exact match by source length"
    return plot_scores_by_length(series, path, metric="exact_match", title=title)


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score the chosen models; write ``results.json``, ``by_length.png`` and
    ``table.md`` into ``args.out``."""
    chosen = MODELS if args.models == "all" else [MODELS[int(i)] for i in args.models.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, spec in enumerate(chosen):
        logger.info("training %s", spec.name)
        result = train_and_score(args, spec, args.out / f"model-{index}")
        logger.info(
            "%s: %d parameters, %d steps in %.0f s, exact match %.3f",
            spec.name,
            result["parameters"],
            result["steps"],
            result["train_seconds"],
            result["scores"]["exact_match"],
        )
        results.append(result)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"settings": settings, "results": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "table.md").write_text(markdown_tables(results))
    plot(results, args.out / "by_length.png", max_digits=args.max_digits)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = run_experiment(parse_args(argv))
    print(markdown_tables(report["results"]))


if __name__ == "__main__":
    main()
