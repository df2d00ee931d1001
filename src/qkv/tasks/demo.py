"""``qkv demo``: train a small attention model on built-in ``dates`` on the CPU, report the
held-out exact match, and draw what the attention learned.

The settings below were tuned on a shared 2-core CPU (see docs/training.md): a tiny
Transformer with rotary positions (with sinusoidal ones the only errors left were years copied
from the end of the longest sources; relative positions fixed them and learned about three times
faster), without dropout or label smoothing (50,000 pairs are plenty of data for it, and dropout
alone cost about a quarter of each step), batches of 64, a cosine decay over 2,000 steps or 5
minutes, whichever ends first (so a slower machine trains fewer steps but still anneals),
and one CPU thread: these matrices are too small for a second thread to pay, and on a busy
machine two threads per process made each step several times slower.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkv.train import EvalReport, StepReport, TrainConfig

__all__ = ["DEMO_SENTENCES", "DemoResult", "demo_configs", "run_demo"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "demo.json"
MODEL_DIR = "model"
ATTENTION_DIR = "attention"

#: Sentences whose attention is drawn: four languages, three word orders.
DEMO_SENTENCES = (
    "mardi 3 mars 1998",
    "Saturday, July 4, 2026",
    "17. Oktober 1978",
    "1 de abril de 1996",
)


@dataclass(frozen=True)
class DemoResult:
    """What the demo did.

    Attributes:
        out: the demo folder.
        model_dir: the trained model folder inside it.
        exact_match: held-out exact match (a fraction).
        test_size: held-out pairs scored.
        samples: ``(source, reference, translation)`` of some held-out pairs.
        heatmaps: the attention pictures written.
        steps: training steps taken.
        train_seconds: training wall time.
        stopped: why training stopped (``"max_steps"`` or ``"max_minutes"``).
    """

    out: Path
    model_dir: Path
    exact_match: float
    test_size: int
    samples: list[tuple[str, str, str]]
    heatmaps: list[Path]
    steps: int
    train_seconds: float
    stopped: str


def demo_configs(*, quick: bool, seed: int = 0, device: str = "auto") -> tuple[Any, TrainConfig]:
    """The demo's translation and training settings (``quick``: seconds, for CI)."""
    from qkv.tasks.translation import TranslationSettings

    data_options: dict[str, Any] = {"n_train": 2_000, "n_test": 100} if quick else {}
    translation = TranslationSettings(
        data="builtin:dates",
        data_options=data_options,
        model="transformer",
        preset="tiny",
        model_overrides={"dropout": 0.0, "positional": "rope"},
        label_smoothing=0.0,
        metric="exact_match",
        batch_size=64,
        valid_size=100 if quick else 500,
    )
    steps = 40 if quick else 2000
    training = TrainConfig(
        lr=2e-3,
        warmup_steps=10 if quick else 100,
        schedule="cosine",
        max_steps=steps,
        max_minutes=None if quick else 5.0,
        eval_every=steps,  # validate once, at the end: the time goes to training
        log_every=10 if quick else 25,
        seed=seed,
        device=device,
    )
    return translation, training


def _check_demo_folder(out: Path, *, overwrite: bool) -> None:
    """Refuse a folder that holds anything but a previous demo's files, and a previous demo's
    trained model unless ``overwrite`` (the rule of ``qkv train``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    if entries and not (
        RESULTS_FILE in entries and entries <= {RESULTS_FILE, MODEL_DIR, ATTENTION_DIR}
    ):
        raise ValueError(
            f"{out}: not empty and not a previous qkv demo folder; refusing to write into it "
            "(choose another with --out)"
        )
    model_dir = out / MODEL_DIR
    if not overwrite and model_dir.is_dir() and any(model_dir.iterdir()):
        raise ValueError(
            f"{model_dir}: already holds a trained model; pass --overwrite to replace it, or "
            "choose another folder with --out"
        )


def _draw(translator: Any, folder: Path, sentences: tuple[str, ...]) -> list[Path]:
    from qkv.viz import attention_heatmap, save_figure

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(sentences, start=1):
        weights, source_tokens, target_tokens = translator.attention(text)
        title = f"{text}  ->  {''.join(target_tokens[:-1])}"
        figure = attention_heatmap(weights, source_tokens, target_tokens, title=title)
        paths.append(save_figure(figure, folder / f"attention-{i}.png"))
    return paths


def run_demo(
    out: str | os.PathLike[str] = "qkv-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    on_eval: Callable[[EvalReport], None] | None = None,
    threads: int = 1,
) -> DemoResult:
    """Train on ``dates``, score the held-out test split, draw attention heat maps.

    Args:
        out: the demo folder (created; a previous demo's folder is replaced only with
            ``overwrite``, any other non-empty folder is refused).
        quick: a reduced run for CI (2,000 training pairs, 40 steps, 100 test pairs).
        seed: seeds the model, the data order and the generated data's split.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        overwrite: replace the model of a previous demo in ``out``.
        on_step, on_eval: training progress callbacks.
        threads: CPU threads while training (default 1, see the module's docstring).

    Raises:
        ValueError: ``out`` holds other files, or a previous demo's model and not
            ``overwrite``.
    """
    from qkv.tasks.evaluation import score_translations
    from qkv.tasks.translation import Translator, train_translation

    folder = Path(out)
    _check_demo_folder(folder, overwrite=overwrite)
    model_dir = folder / MODEL_DIR
    for stale in (model_dir, folder / ATTENTION_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    translation, training = demo_configs(quick=quick, seed=seed, device=device)
    threads = torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1; got {threads}")
    torch.set_num_threads(threads)
    try:
        outcome = train_translation(
            translation, training, model_dir, on_step=on_step, on_eval=on_eval
        )
    finally:
        torch.set_num_threads(threads)
    translator = Translator.load(model_dir, device=device)
    test = outcome.splits.test
    hypotheses = translator.translate([p.source for p in test])
    scores = score_translations(hypotheses, [p.target for p in test], [p.source for p in test])
    samples = [(p.source, p.target, h) for p, h in zip(test[:8], hypotheses[:8], strict=True)]
    heatmaps = _draw(translator, folder / ATTENTION_DIR, DEMO_SENTENCES[: 2 if quick else 4])
    state = outcome.result.state
    result = DemoResult(
        folder,
        model_dir,
        scores.exact_match,
        scores.count,
        samples,
        heatmaps,
        state.step,
        state.elapsed_s,
        outcome.result.stopped,
    )
    _write_results(result, scores.to_dict())
    return result


def _rounded(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` decimals (sacrebleu's BLEU of a perfect
    run is 100.00000000000004: float noise, not a figure anyone should read)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, digits) for v in value]
    return value


def _write_results(result: DemoResult, scores: dict[str, Any]) -> None:
    document = {
        "exact_match": result.exact_match,
        "test_size": result.test_size,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "stopped": result.stopped,
        "scores": scores,
        "samples": [list(s) for s in result.samples],
        "heatmaps": [p.name for p in result.heatmaps],
    }
    text = json.dumps(_rounded(document), indent=2) + "\n"
    (result.out / RESULTS_FILE).write_text(text, encoding="utf-8")
