"""Tokenizers trained with Hugging Face ``tokenizers``, wrapped thinly for seq2seq batches.

Two modes, each a plain ``tokenizers.Tokenizer`` saved as one ``tokenizer.json`` that loads
anywhere the library does:

- ``"bpe"``: **byte-level** BPE (GPT-2's pre-tokenizer and decoder). Chosen over whitespace
  pre-tokenized BPE because it is lossless: ``decode(encode(x)) == x`` for any text, spaces, tabs
  and newlines included, and no input ever maps to ``<unk>`` (every byte is in the base alphabet),
  which matters for Japanese and Chichewa verses full of rare characters. Its cost: a character
  unseen in training splits into its UTF-8 bytes, shown as ``�`` by :meth:`TextTokenizer.tokens`.
- ``"char"``: one token per Unicode code point (a ``WordLevel`` model over single characters, its
  vocabulary built in sorted order so it is identical on every machine). Right for dates, number
  digits and classical Japanese, where characters are the natural unit. Characters unseen in
  training map to ``<unk>``.

Special tokens have the same ids in every tokenizer: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2,
``<unk>`` 3. The wrapper adds ``<bos>``/``<eos>`` itself (no post-processor), so what a model sees
is decided at the call site. As in every ``tokenizers`` tokenizer, a text that literally contains
``<eos>`` (etc.) reads it as that special token.

Shapes: ``B`` texts per batch, ``N`` the longest sequence in the batch (with specials).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from qkv.data._util import require_module

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

    from qkv.data.parallel import Pair

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "EncodedBatch",
    "PairTokenizer",
    "TextTokenizer",
    "TokenizerMode",
]

logger = logging.getLogger(__name__)

TokenizerMode = Literal["bpe", "char"]
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
INSTALL = "pip install 'tokenizers>=0.19'  (or: pip install -e '.[data]')"
TOKENIZER_FILE = "tokenizer.json"
TARGET_TOKENIZER_FILE = "target_tokenizer.json"


def _require_tokenizers() -> None:
    require_module("tokenizers", INSTALL, needed_for="training or loading a tokenizer")


@dataclass(frozen=True)
class EncodedBatch:
    """Padded token ids.

    Attributes:
        ids: ``(B, N)`` int64, right-padded with ``PAD_ID``.
        lengths: ``(B,)`` int64, the number of real tokens (specials included) in each row.
    """

    ids: Tensor
    lengths: Tensor

    @property
    def padding_mask(self) -> Tensor:
        """``(B, N)`` bool, True at real tokens (the qkv convention: True = attend)."""
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)  # (N,)
        return positions[None, :] < self.lengths[:, None]  # (B, N)


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> EncodedBatch:
    """Right-pad lists of ids into an :class:`EncodedBatch` (``(B, N)`` ids, ``(B,)`` lengths)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
    width = int(lengths.max()) if len(rows) else 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, N)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return EncodedBatch(ids, lengths)


def _char_tokenizer(texts: Iterable[str], vocab_size: int | None, min_frequency: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    counts = Counter(c for text in texts for c in text)
    chars = [c for c, n in counts.items() if n >= min_frequency and c not in SPECIAL_TOKENS]
    if vocab_size is not None and len(chars) > vocab_size - len(SPECIAL_TOKENS):
        # Keep the most frequent; ties broken by the character so the choice is stable.
        chars = sorted(chars, key=lambda c: (-counts[c], c))[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(chars)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # [\s\S] rather than '.': the dot does not match a newline.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x (no invented leading space).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: never <unk>
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class TextTokenizer:
    """One vocabulary: a ``tokenizers.Tokenizer`` plus batching to tensors.

    Build with :meth:`train` or :meth:`load`; wrap an existing tokenizer whose first four ids are
    ``<pad> <bos> <eos> <unk>`` with the constructor.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.

    Raises:
        ValueError: the special tokens are missing or not at ids 0..3.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [PAD_ID, BOS_ID, EOS_ID, UNK_ID]:
            found = dict(zip(SPECIAL_TOKENS, ids, strict=True))
            raise ValueError(
                f"special tokens must have ids 0..3 in order {SPECIAL_TOKENS}, got {found}"
            )
        self.hf = tokenizer

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        mode: TokenizerMode = "bpe",
        vocab_size: int | None = None,
        min_frequency: int | None = None,
    ) -> TextTokenizer:
        """Train on ``texts``.

        Args:
            texts: training text (iterated once).
            mode: ``"bpe"`` (byte-level BPE) or ``"char"`` (one token per character).
            vocab_size: at most this many tokens, specials included; BPE default 8,000, char
                default unlimited (every character seen).
            min_frequency: a merge (BPE, default 2) or character (char, default 1) must occur
                this often to enter the vocabulary.

        Raises:
            MissingPackageError: ``tokenizers`` is not installed.
            ValueError: an unknown mode or a vocabulary too small to hold the specials.
        """
        _require_tokenizers()
        if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size ({vocab_size}) must exceed the {len(SPECIAL_TOKENS)} specials"
            )
        if mode == "char":
            return cls(_char_tokenizer(texts, vocab_size, min_frequency or 1))
        if mode == "bpe":
            return cls(_bpe_tokenizer(texts, vocab_size or 8_000, min_frequency or 2))
        raise ValueError(f"mode must be 'bpe' or 'char', got {mode!r}")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save` (or by ``tokenizers`` itself)."""
        _require_tokenizers()
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(os.fspath(path)))
        except Exception as error:  # tokenizers raises a bare Exception for a corrupt file
            if isinstance(error, OSError):
                raise
            raise ValueError(f"{path}: not a readable tokenizer file ({error})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` (one JSON file holding vocabulary, merges and settings)."""
        self.hf.save(os.fspath(path))

    # -- properties --------------------------------------------------------------------------

    @property
    def mode(self) -> TokenizerMode:
        """``"char"`` for a character vocabulary, ``"bpe"`` otherwise."""
        return "char" if type(self.hf.model).__name__ == "WordLevel" else "bpe"

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the embedding table's size)."""
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def __repr__(self) -> str:
        return f"TextTokenizer(mode={self.mode!r}, vocab_size={self.vocab_size})"

    # -- encoding ----------------------------------------------------------------------------

    def encode_all(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = False,
        add_eos: bool = True,
        max_length: int | None = None,
    ) -> list[list[int]]:
        """Token ids of each text, as lists.

        Args:
            texts: the texts.
            add_bos: start each sequence with ``<bos>`` (decoder inputs).
            add_eos: end each sequence with ``<eos>``.
            max_length: cut the text's tokens so that each sequence, specials included, has at
                most this many ids (``<eos>`` is kept at the end).

        Raises:
            ValueError: ``max_length`` leaves no room for a text token.
        """
        n_special = int(add_bos) + int(add_eos)
        if max_length is not None and max_length <= n_special:
            raise ValueError(
                f"max_length ({max_length}) must exceed the {n_special} special tokens"
            )
        keep = None if max_length is None else max_length - n_special
        bos, eos = [BOS_ID] * add_bos, [EOS_ID] * add_eos
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [bos + e.ids[:keep] + eos for e in encodings]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of one text (no specials unless asked)."""
        return self.encode_all([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = False,
        add_eos: bool = True,
        max_length: int | None = None,
    ) -> EncodedBatch:
        """Encode and right-pad: ``ids (B, N)`` int64 and ``lengths (B,)``; options as in
        :meth:`encode_all`."""
        return pad_ids(
            self.encode_all(texts, add_bos=add_bos, add_eos=add_eos, max_length=max_length)
        )

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of one sequence: stops at the first ``<eos>``, drops ``<pad>`` and ``<bos>``
        (``<unk>`` stays visible as ``<unk>``)."""
        row = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if EOS_ID in row:
            row = row[: row.index(EOS_ID)]
        kept = [i for i in row if i not in (PAD_ID, BOS_ID)]
        return str(self.hf.decode(kept, skip_special_tokens=False))

    def decode_batch(
        self, ids: Tensor | Sequence[Sequence[int]], lengths: Tensor | None = None
    ) -> list[str]:
        """Texts of a batch.

        Args:
            ids: ``(B, N)`` int ids, or a list of lists.
            lengths: ``(B,)``: only the first ``lengths[i]`` ids of row ``i`` are read.
        """
        rows = ids.tolist() if isinstance(ids, Tensor) else [list(r) for r in ids]
        if lengths is not None:
            rows = [row[:n] for row, n in zip(rows, lengths.tolist(), strict=True)]
        return [self.decode(row) for row in rows]

    def tokens(self, text: str) -> list[str]:
        """The readable pieces of ``text``, one per token (labels for attention heat maps).

        Each id is decoded on its own, so byte-level BPE shows words with their spaces rather
        than its internal ``Ġ`` symbols.
        """
        return [self.hf.decode([i], skip_special_tokens=False) for i in self.encode(text)]


class PairTokenizer:
    """Source and target tokenizers: one shared vocabulary or two separate ones.

    Saved as a folder holding ``tokenizer.json`` (the shared or source vocabulary) and, when
    separate, ``target_tokenizer.json``.

    Args:
        source: the source-side tokenizer.
        target: the target side; ``None`` (or the same object) shares the source's.
    """

    def __init__(self, source: TextTokenizer, target: TextTokenizer | None = None) -> None:
        self.source = source
        self.target = source if target is None else target

    @property
    def shared(self) -> bool:
        """Whether both sides use one vocabulary (a prerequisite for tied embeddings)."""
        return self.source is self.target

    def __repr__(self) -> str:
        if self.shared:
            return f"PairTokenizer(shared={self.source!r})"
        return f"PairTokenizer(source={self.source!r}, target={self.target!r})"

    @classmethod
    def train(
        cls,
        pairs: Sequence[Pair],
        *,
        shared: bool = True,
        mode: TokenizerMode = "bpe",
        target_mode: TokenizerMode | None = None,
        vocab_size: int | None = None,
        target_vocab_size: int | None = None,
        min_frequency: int | None = None,
    ) -> PairTokenizer:
        """Train on the sources and targets of ``pairs``.

        Args:
            pairs: training pairs.
            shared: one vocabulary trained on both sides.
            mode: ``"bpe"`` or ``"char"`` (of the shared or source vocabulary).
            target_mode: the target's mode when separate (default: ``mode``), e.g. ``"char"``
                for Japanese sources and ``"bpe"`` for English targets.
            vocab_size: size of the shared or source vocabulary.
            target_vocab_size: size of the target vocabulary when separate (default:
                ``vocab_size``).
            min_frequency: as in :meth:`TextTokenizer.train`.

        Raises:
            ValueError: ``target_mode`` or ``target_vocab_size`` given with ``shared=True``.
        """
        if shared:
            if target_mode not in (None, mode) or target_vocab_size is not None:
                raise ValueError(
                    "a shared vocabulary has one mode and size: drop target_mode/target_vocab_size"
                )
            texts = [t for p in pairs for t in (p.source, p.target)]
            return cls(
                TextTokenizer.train(
                    texts, mode=mode, vocab_size=vocab_size, min_frequency=min_frequency
                )
            )
        source = TextTokenizer.train(
            [p.source for p in pairs], mode=mode, vocab_size=vocab_size, min_frequency=min_frequency
        )
        target = TextTokenizer.train(
            [p.target for p in pairs],
            mode=target_mode or mode,
            vocab_size=target_vocab_size or vocab_size,
            min_frequency=min_frequency,
        )
        return cls(source, target)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` (and ``target_tokenizer.json`` when separate) into
        ``directory``, creating it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.source.save(directory / TOKENIZER_FILE)
        target_file = directory / TARGET_TOKENIZER_FILE
        if not self.shared:
            self.target.save(target_file)
        elif target_file.exists():
            target_file.unlink()  # a stale separate target would be loaded back otherwise

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> PairTokenizer:
        """Load what :meth:`save` wrote.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``directory``.
        """
        directory = Path(directory)
        source_file = directory / TOKENIZER_FILE
        if not source_file.is_file():
            raise FileNotFoundError(f"{source_file}: no tokenizer saved here")
        source = TextTokenizer.load(source_file)
        target_file = directory / TARGET_TOKENIZER_FILE
        return cls(source, TextTokenizer.load(target_file) if target_file.is_file() else None)
