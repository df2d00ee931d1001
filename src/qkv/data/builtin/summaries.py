"""Built-in summarization sets: ``aclsum-title``, ``aclsum-summary`` (alias ``aclsum``) and
``docstrings``. Examples are :class:`~qkv.data.Pair` ``(source=document, target=summary)``.

- **aclsum** (Takeshita et al. 2024, the ``aclsum`` package): 250 ACL papers split 100/50/100 as
  shipped. ``aclsum-title`` maps the abstract to the paper's title; ``aclsum-summary`` maps the
  abstract, introduction and conclusion sentences (~1,000 words) to the three one-sentence
  summaries (challenge, approach, outcome) joined in that order. The package is located with
  ``find_spec`` and never imported (its ``__init__`` needs ``sienna``).
- **docstrings**: the docstrings of the installed Python standard library, parsed with ``ast``:
  the summary line (PEP 257: the first paragraph, joined into one line) is the target, the rest
  of the docstring the source. Tests, ``idlelib``, ``lib2to3`` and ``site-packages`` are left out;
  a body shorter than ``min_body_words`` is dropped. Pairs are split by a seeded hash of the
  module path (so one module's docstrings never straddle splits); the set depends only on the
  Python version, not on the machine.
"""

from __future__ import annotations

import ast
import json
import logging
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal

from qkv.data._util import package_dir, stable_hash
from qkv.data.parallel import DataError, Pair
from qkv.data.registry import Splits, register_builtin

__all__ = [
    "ACLSUM_REQUIREMENT",
    "AclsumVariant",
    "load_aclsum",
    "load_aclsum_summary",
    "load_aclsum_title",
    "load_docstrings",
]

logger = logging.getLogger(__name__)

ACLSUM_REQUIREMENT = "aclsum==0.1.2"
INSTALL = f"pip install --no-deps '{ACLSUM_REQUIREMENT}'"
AclsumVariant = Literal["title", "summary"]
ACLSUM_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
     "turtledemo", "ensurepip", "venv"}
)  # fmt: skip
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


# --------------------------------------------------------------------------------------------
# aclsum


def _aclsum_pair(record: dict[str, object], variant: AclsumVariant) -> Pair:
    sentences = record["sentences"]
    summary = record["summary"]
    if not isinstance(sentences, dict) or not isinstance(summary, dict):
        raise TypeError("record lacks 'sentences'/'summary' objects")
    if variant == "title":
        return Pair(" ".join(sentences["abstract"]), str(record["title"]).strip())
    document = " ".join(s for section in SECTIONS for s in sentences[section])
    return Pair(document, " ".join(summary[aspect].strip() for aspect in ASPECTS))


def _read_aclsum(path: Path, variant: AclsumVariant) -> list[Pair]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                pairs.append(_aclsum_pair(json.loads(line), variant))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(path, number, f"not an aclsum record: {e!r}") from None
    return pairs


def load_aclsum(*, variant: AclsumVariant = "summary") -> Splits[Pair]:
    """The aclsum papers as shipped: 100 train, 50 validation, 100 test.

    Args:
        variant: ``"summary"`` (sections -> three-sentence summary) or ``"title"`` (abstract
            -> title).

    Raises:
        MissingPackageError: ``aclsum`` is not installed.
        ValueError: an unknown variant.
    """
    if variant not in ("title", "summary"):
        raise ValueError(f"variant must be 'title' or 'summary', got {variant!r}")
    folder = package_dir("aclsum", INSTALL, needed_for="the builtin 'aclsum' data sets")
    parts = {
        name: _read_aclsum(folder / "dataset" / f, variant) for name, f in ACLSUM_FILES.items()
    }
    return Splits(parts["train"], parts["validation"], parts["test"])


# --------------------------------------------------------------------------------------------
# docstrings


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def _docstring_pairs(source: str, min_body_words: int) -> Iterator[Pair]:
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, _DOCUMENTED):
            continue
        docstring = ast.get_docstring(node)  # cleaned: common indentation removed (PEP 257)
        if not docstring or "\n\n" not in docstring:
            continue
        summary, body = docstring.split("\n\n", 1)
        summary, body = " ".join(summary.split()), body.strip()
        if summary and len(body.split()) >= min_body_words:
            yield Pair(body, summary)


@lru_cache(maxsize=4)
def _all_docstrings(min_body_words: int) -> tuple[tuple[str, Pair], ...]:
    """``(module path, pair)`` for every usable docstring, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Pair]] = []
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
            pairs = list(_docstring_pairs(text, min_body_words))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (test data, other encodings)
        module = path.relative_to(root).as_posix()
        found.extend((module, pair) for pair in pairs)
    return tuple(found)


def load_docstrings(
    *, validation: float = 0.1, test: float = 0.1, seed: int = 0, min_body_words: int = 5
) -> Splits[Pair]:
    """Standard-library docstring bodies -> their summary lines (about 3,000 pairs).

    Args:
        validation, test: fractions of *modules* held out (their docstrings go together).
        seed: seed of the split.
        min_body_words: drop docstrings whose body has fewer words.
    """
    pairs = _all_docstrings(min_body_words)
    modules = sorted({m for m, _ in pairs}, key=lambda m: (stable_hash(seed, "docstrings", m), m))
    n_test, n_validation = round(test * len(modules)), round(validation * len(modules))
    split_of = dict.fromkeys(modules[:n_test], "test")
    split_of.update(dict.fromkeys(modules[n_test : n_test + n_validation], "validation"))
    out: dict[str, list[Pair]] = {"train": [], "validation": [], "test": []}
    for module, pair in pairs:
        out[split_of.get(module, "train")].append(pair)
    return Splits(out["train"], out["validation"], out["test"])


def load_aclsum_title() -> Splits[Pair]:
    """``aclsum`` with ``variant="title"``: abstract -> title."""
    return load_aclsum(variant="title")


def load_aclsum_summary() -> Splits[Pair]:
    """``aclsum`` with ``variant="summary"``: sections -> three-sentence summary."""
    return load_aclsum(variant="summary")


register_builtin(
    "aclsum",
    load_aclsum,
    task="summarization",
    description="ACL papers (100/50/100): sections -> 3-sentence summary; variant='title' too",
    requires=(ACLSUM_REQUIREMENT,),
)
register_builtin(
    "aclsum-summary",
    load_aclsum_summary,
    task="summarization",
    description="ACL papers (100/50/100): abstract+introduction+conclusion -> 3-sentence summary",
    requires=(ACLSUM_REQUIREMENT,),
)
register_builtin(
    "aclsum-title",
    load_aclsum_title,
    task="summarization",
    description="ACL papers (100/50/100): abstract -> title",
    requires=(ACLSUM_REQUIREMENT,),
)
register_builtin(
    "docstrings",
    load_docstrings,
    task="summarization",
    description="Python standard-library docstring bodies -> summary lines (~3,000), by module",
)
