"""Translation on small corpora: the default model (and others, by their flags) against the
copy-the-source and retrieval baselines (the table of docs/small-corpus.md).

Each corpus is cut from a built-in set into a folder as a user would bring it: ``train.tsv``
(the first N pairs of a seeded shuffle of the training split; qkv carves its validation pairs
out of it) and ``test.tsv`` (a fixed held-out set). ``qkv train translation --data FOLDER`` is
run with the flags of each variant (none for ``default``: the choices sized to the corpus,
its step budget included), and ``qkv evaluate`` scores ``test.tsv``. One training at a time,
on one thread::

    OMP_NUM_THREADS=1 python benchmarks/small_corpus.py --out runs/small
    OMP_NUM_THREADS=1 python benchmarks/small_corpus.py --out runs/small \\
        --only "bible-ny-en 500" --variant copy=--copy --variant bpe500=--vocab-size,500
    OMP_NUM_THREADS=1 python benchmarks/small_corpus.py --out runs/small \\
        --variant memory=--memory --variant memory-t35=--memory,--memory-threshold,35

Writes ``RESULTS.md`` (the table) and ``results.json`` into ``--out`` (results already there
for other corpora or variants are kept, so runs can be split).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
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


def run(argv: list[str], log: Path | None = None) -> str:
    """The stdout of ``qkv ARGV`` (its stderr, the progress and validations, into ``log``)."""
    done = subprocess.run(
        [sys.executable, "-m", "qkv.cli.main", *argv], capture_output=True, text=True, check=False
    )
    if log is not None:
        log.write_text(done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise RuntimeError(f"qkv {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def variant(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAG,VALUE,...`` -> (name, flags)."""
    name, _, flags = text.partition("=")
    return name, [f for f in flags.split(",") if f]


def train_and_score(folder: Path, name: str, flags: list[str], beam: int) -> dict[str, Any]:
    model = folder / name
    argv = ["train", "translation", "--data", str(folder), "--out", str(model), "--overwrite"]
    started = time.perf_counter()
    said = run([*argv, "--device", "cpu", *flags], log=folder / f"{name}.log")
    seconds = time.perf_counter() - started
    steps = re.search(r"trained (\d+) steps", said)
    evaluate = ["evaluate", "--model", str(model), "--data", str(folder / "test.tsv"), "--json"]
    report = json.loads(run([*evaluate, "--beam", str(beam)]))
    metrics = report["metrics"]
    return {
        "variant": name,
        "flags": flags,
        "beam": beam,
        "steps": int(steps.group(1)) if steps else None,
        "train_s": round(seconds),
        "bleu": metrics["bleu"],
        "chrf": metrics["chrf"],
        "baselines": {
            k: {"bleu": v["bleu"], "chrf": v["chrf"]} for k, v in metrics["baselines"].items()
        },
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| corpus (train pairs) | model | steps | BLEU | chrF | copy BLEU | copy chrF "
        "| retrieval BLEU | retrieval chrF | beats both |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["baselines"]
        best_bleu = max(b["copy"]["bleu"], b["retrieval"]["bleu"])
        best_chrf = max(b["copy"]["chrf"], b["retrieval"]["chrf"])
        beats = "yes" if r["bleu"] > best_bleu and r["chrf"] > best_chrf else "**no**"
        shown = r["variant"] if not r["flags"] else f"{r['variant']} (`{' '.join(r['flags'])}`)"
        lines.append(
            f"| {r['corpus']} | {shown} | {r['steps']} | {r['bleu']:.2f} | {r['chrf']:.1f} | "
            f"{b['copy']['bleu']:.2f} | {b['copy']['chrf']:.1f} | "
            f"{b['retrieval']['bleu']:.2f} | {b['retrieval']['chrf']:.1f} | {beats} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--only", nargs="*", default=None, help="corpus names to run")
    parser.add_argument(
        "--variant",
        action="append",
        type=variant,
        default=None,
        help="NAME=FLAG,VALUE,... of qkv train (default: default= and copy=--copy)",
    )
    parser.add_argument("--beam", type=int, default=1, help="qkv evaluate's --beam")
    args = parser.parse_args()
    variants = args.variant or [("default", []), ("copy", ["--copy"])]
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results: list[dict[str, Any]] = json.loads(saved.read_text()) if saved.exists() else []
    for name, (train, test) in corpora(args.sizes).items():
        if args.only and name not in args.only:
            continue
        folder = args.out / name.replace(" ", "-")
        folder.mkdir(exist_ok=True)
        write_tsv(folder / "train.tsv", train)
        write_tsv(folder / "test.tsv", test)
        for label, flags in variants:
            row = {"corpus": name, **train_and_score(folder, label, flags, args.beam)}
            key = (name, label, args.beam)
            results = [r for r in results if (r["corpus"], r["variant"], r["beam"]) != key]
            results.append(row)
            saved.write_text(json.dumps(results, indent=2))
            print(name, label, row["steps"], row["bleu"], row["chrf"], flush=True)
    (args.out / "RESULTS.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
