"""Small helpers shared by the data layer: stable seeding and optional-package lookup.

Everything here must give the same answer on every machine and in every process, so nothing uses
Python's ``hash`` (randomised per process for strings) or global random state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from pathlib import Path

__all__ = ["MissingPackageError", "package_dir", "require_module", "seeded_rng", "stable_hash"]


class MissingPackageError(ImportError):
    """An optional package that a data set or tokenizer needs is not installed.

    The message names the ``pip install`` command that fixes it.
    """


def seeded_rng(seed: int, *names: object) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and a path of names, e.g. ``(0, "dates", "test")``.

    ``random.Random`` seeded with a string hashes it with SHA-512 (not Python's per-process
    ``hash``), so each named stream is reproducible across machines and independent of the others.
    """
    return random.Random("/".join([str(seed), *map(str, names)]))


def stable_hash(seed: int, *names: object) -> int:
    """A 64-bit integer that depends only on ``seed`` and ``names`` (BLAKE2b, machine-independent)."""
    key = "/".join([str(seed), *map(str, names)]).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def require_module(module: str, install: str, *, needed_for: str) -> None:
    """Raise :class:`MissingPackageError` unless ``module`` can be imported.

    Args:
        module: the importable name, e.g. ``"babel"``.
        install: what to run, e.g. ``"pip install 'babel>=2.14'"``.
        needed_for: what needs it, for the message, e.g. ``"the builtin 'dates' data set"``.

    Raises:
        MissingPackageError: the module is not installed.
    """
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"{needed_for} needs the package {module!r}, which is not installed; run: {install}"
        )


def package_dir(module: str, install: str, *, needed_for: str) -> Path:
    """The folder of an installed package, found *without importing it*.

    Some data packages pull heavy dependencies they do not need for their files (they are
    installed with ``pip install --no-deps``), so importing them could fail; locating their
    folder with ``importlib.util.find_spec`` cannot.

    Raises:
        MissingPackageError: the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"{needed_for} needs the package {module!r}, which is not installed; run: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))
