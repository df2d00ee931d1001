"""A registry of built-in data sets: name -> loader returning fixed train/validation/test splits.

Every task (translation, sentiment, summarization) registers its built-in sets here the same way,
and :func:`qkv.data.load_pairs` resolves ``builtin:NAME`` through it::

    >>> from qkv.data import register_builtin, load_builtin
    >>> register_builtin("tiny", lambda **kw: Splits(train=[...], validation=[], test=[]),
    ...                  task="translation", description="three pairs for a demo")
    >>> load_builtin("tiny").sizes()

A loader takes keyword options only (sizes, ``seed``, ...) and must return the same splits for
the same options on every machine: seeded streams from :func:`qkv.data._util.seeded_rng`, never
``hash`` or global random state. Optional packages are imported inside the loader, never at
registration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = [
    "BuiltinDataset",
    "Splits",
    "available_builtins",
    "get_builtin",
    "load_builtin",
    "register_builtin",
]

T = TypeVar("T")

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits(Generic[T]):
    """Fixed train / validation / test splits of a data set.

    Attributes:
        train: examples to fit on.
        validation: examples for early stopping and model selection.
        test: held-out examples, disjoint from the other two, for the reported score.
    """

    train: list[T]
    validation: list[T]
    test: list[T]

    def __getitem__(self, name: str) -> list[T]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; splits are {', '.join(SPLIT_NAMES)}")
        split: list[T] = getattr(self, name)
        return split

    def items(self) -> Iterator[tuple[str, list[T]]]:
        """``(name, examples)`` for train, validation and test, in that order."""
        for name in SPLIT_NAMES:
            yield name, self[name]

    def sizes(self) -> dict[str, int]:
        """Number of examples per split, e.g. ``{"train": 50000, "validation": 1000, ...}``."""
        return {name: len(examples) for name, examples in self.items()}


Loader = Callable[..., Splits[Any]]


@dataclass(frozen=True)
class BuiltinDataset:
    """One registered data set.

    Attributes:
        name: what follows ``builtin:`` in a data spec, e.g. ``"dates"``.
        loader: ``loader(**options) -> Splits``.
        task: which task its examples serve, e.g. ``"translation"`` or ``"sentiment"``.
        description: one line for listings (``qkv data list`` and error messages).
        requires: the ``pip install`` arguments it needs, for documentation.
    """

    name: str
    loader: Loader
    task: str
    description: str
    requires: tuple[str, ...] = field(default=())

    def load(self, **options: Any) -> Splits[Any]:
        """Call the loader with ``options``."""
        return self.loader(**options)


_REGISTRY: dict[str, BuiltinDataset] = {}


def register_builtin(
    name: str,
    loader: Loader,
    *,
    task: str,
    description: str,
    requires: tuple[str, ...] = (),
    replace: bool = False,
) -> BuiltinDataset:
    """Register a built-in data set under ``name``.

    Raises:
        ValueError: ``name`` is empty, contains ``:`` or whitespace, or is taken and
            ``replace`` is false.
    """
    if not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"data set name {name!r} must be non-empty, without ':' or spaces")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a builtin data set named {name!r} is already registered")
    entry = BuiltinDataset(name, loader, task, description, tuple(requires))
    _REGISTRY[name] = entry
    return entry


def available_builtins(task: str | None = None) -> list[str]:
    """Registered names, sorted; only those of ``task`` when given."""
    return sorted(n for n, d in _REGISTRY.items() if task is None or d.task == task)


def get_builtin(name: str) -> BuiltinDataset:
    """The registered data set ``name``.

    Raises:
        ValueError: no data set of that name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_builtins()) or "none"
        raise ValueError(f"unknown builtin data set {name!r}; available: {known}") from None


def load_builtin(name: str, **options: Any) -> Splits[Any]:
    """Load the built-in data set ``name`` with the loader's keyword ``options``."""
    return get_builtin(name).load(**options)
