"""``qkv demo``: the README's main job (see :mod:`qkv.tasks.demo`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qkv.cli.train import add_runtime_args

    p = commands.add_parser(
        "demo",
        help="train a small attention model on built-in dates, report held-out exact match, draw attention",
        description="Trains a tiny Transformer on 50,000 generated date strings (a few minutes on "
        "a laptop CPU), translates the 2,000 held-out ones and writes attention heat maps.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("qkv-demo"), help="output folder (default %(default)s)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a seconds-long reduced run (default when CI=true)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the model of a previous demo in --out"
    )
    add_runtime_args(p, backend=False)
    p.set_defaults(run=_run)


def _quick(args: argparse.Namespace) -> bool:
    return bool(args.quick) or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _run(args: argparse.Namespace) -> int:
    import logging

    from qkv.cli.train import TrainProgress
    from qkv.tasks.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    quick = _quick(args)
    # One thread unless told: the demo's matrices are too small for a second one to pay.
    threads = 1 if args.threads is None else args.threads
    print(
        "qkv demo: teaching a tiny Transformer to read dates written in 19 languages "
        f"({'quick CI run' if quick else 'a few minutes on a CPU, 5 at most'}; "
        f"{threads} CPU thread{'s' if threads != 1 else ''}, --threads to change)",
        flush=True,
    )
    progress = TrainProgress()
    result = run_demo(
        args.out,
        quick=quick,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        on_step=progress.on_step,
        on_eval=progress.on_eval,
        threads=threads,
    )
    print(f"\ntrained {result.steps} steps in {result.train_seconds:.0f}s ({result.stopped})")
    print("\nheld-out samples:")
    for source, reference, translation in result.samples:
        mark = "ok" if translation == reference else f"WRONG (expected {reference})"
        print(f"  {source:<36} -> {translation:<12} {mark}")
    hits = round(result.exact_match * result.test_size)
    print(
        f"\nexact match on the {result.test_size:,} held-out pairs: "
        f"{hits:,}/{result.test_size:,} = {100 * result.exact_match:.2f}%"
    )
    print(f"attention heat maps: {', '.join(str(p) for p in result.heatmaps)}")
    print(
        f'model folder: {result.model_dir}  (try: qkv translate --model {result.model_dir} "3 mars 1998")'
    )
    return 0
