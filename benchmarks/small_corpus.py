"""Translation on small corpora: the default model with and without copy attention, against the
copy-the-source and retrieval baselines (the table of docs/small-corpus.md).

Each corpus is cut from a built-in set into TSV files (the first N training pairs of a seeded
shuffle, and a fixed held-out test set), then ``qkv train translation`` is run with a fixed step
budget (not minutes: the result must not depend on the machine's load) and ``qkv evaluate``
scores the test file. One training at a time, on one thread::

    OMP_NUM_THREADS=1 python benchmarks/small_corpus.py --out runs/small --steps 1500

Writes ``RESULTS.md`` (the table) and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

TEST_PAIRS = 200


def corpora(sizes: list[int]) -> dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """name -> (training pairs, test pairs)."""
    from qkv.data import load_pairs

    out = {}
    sources = {
        "numbers-en-fr": load_pairs(
            "builtin:numbers", n_train=max(sizes), n_test=TEST_PAIRS, target_lang="fr"
        ),
        "bible-ny-en": load_pairs("builtin:bible-ny-en"),
    }
    for name, splits in sources.items():
        train = [(p.source, p.target) for p in splits.train]
        random.Random(0).shuffle(train)
        test = [(p.source, p.target) for p in splits.test][:TEST_PAIRS]
        for n in sizes:
            out[f"{name} {n}"] = (train[:n], test)
    return out


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")


def run(argv: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "qkv.cli.main", *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"qkv {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--only", nargs="*", default=None, help="corpus names to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name, (train, test) in corpora(args.sizes).items():
        if args.only and name not in args.only:
            continue
        folder = args.out / name.replace(" ", "-")
        folder.mkdir(exist_ok=True)
        write_tsv(folder / "train.tsv", train)
        write_tsv(folder / "test.tsv", test)
        for copy in (False, True):
            model = folder / ("copy" if copy else "plain")
            train_argv = ["train", "translation", "--data", str(folder / "train.tsv")]
            train_argv += ["--out", str(model), "--overwrite", "--steps", str(args.steps)]
            train_argv += ["--eval-every", str(args.steps // 2), "--keep-best", "--quiet"]
            train_argv += ["--valid-size", "100", "--device", "cpu"]
            train_argv += ["--copy"] if copy else []
            run(train_argv)
            report = json.loads(
                run(
                    [
                        "evaluate",
                        "--model",
                        str(model),
                        "--data",
                        str(folder / "test.tsv"),
                        "--json",
                    ]
                )
            )
            metrics = report["metrics"]
            results.append(
                {
                    "corpus": name,
                    "copy": copy,
                    "steps": args.steps,
                    "bleu": metrics["bleu"],
                    "chrf": metrics["chrf"],
                    "baselines": {
                        k: {"bleu": v["bleu"], "chrf": v["chrf"]}
                        for k, v in metrics["baselines"].items()
                    },
                }
            )
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
            print(name, "copy" if copy else "plain", metrics["bleu"], metrics["chrf"], flush=True)
    lines = [
        "| corpus (train pairs) | model | BLEU | chrF | copy BLEU | copy chrF | retrieval BLEU "
        "| retrieval chrF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["baselines"]
        lines.append(
            f"| {r['corpus']} | {'--copy' if r['copy'] else 'default'} | {r['bleu']:.2f} | "
            f"{r['chrf']:.1f} | {b['copy']['bleu']:.2f} | {b['copy']['chrf']:.1f} | "
            f"{b['retrieval']['bleu']:.2f} | {b['retrieval']['chrf']:.1f} |"
        )
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
