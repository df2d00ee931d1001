"""The summarizer's word vocabulary, with per-document ids for out-of-vocabulary words.

The vocabulary is **word-level** (lowercased; ``\\w+`` runs and punctuation runs, a
``tokenizers`` ``WordLevel`` model saved as ``tokenizer.json``) because copying needs words the
fixed vocabulary lacks: each document's out-of-vocabulary words get the extended ids
``V, V + 1, ...`` (:func:`encode_with_oov`), a summary word found among them is trained as a
copy, and decoding maps an extended id back to the document's word (:func:`ids_to_words`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qkv.data.tokenizer import EOS_ID, SPECIAL_TOKENS, UNK_ID, TextTokenizer

__all__ = [
    "EncodedText",
    "detokenize",
    "encode_target",
    "encode_with_oov",
    "ids_to_words",
    "train_word_tokenizer",
]

_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}'])")
_NO_SPACE_AFTER = re.compile(r"([(\[{]) ")


def _word_tokenizer(vocab: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def train_word_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 20_000, min_frequency: int = 1
) -> TextTokenizer:
    """A lowercased word-level tokenizer of the ``vocab_size`` most frequent words.

    Ties in frequency are broken by the word, so the vocabulary is the same on every run.

    Raises:
        ValueError: ``vocab_size`` does not exceed the four special tokens.
    """
    from tokenizers import pre_tokenizers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size ({vocab_size}) must exceed the {len(SPECIAL_TOKENS)} specials"
        )
    split = pre_tokenizers.Whitespace()
    counts = Counter(w for text in texts for w, _ in split.pre_tokenize_str(text.lower()))
    words = sorted(
        (w for w, n in counts.items() if n >= min_frequency and w not in SPECIAL_TOKENS),
        key=lambda w: (-counts[w], w),
    )[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    return TextTokenizer(_word_tokenizer(vocab))


@dataclass(frozen=True)
class EncodedText:
    """One text in the fixed and the extended vocabulary.

    Attributes:
        ids: fixed-vocabulary ids (OOV words as ``<unk>``).
        ext_ids: the same with OOV word ``j`` as ``V + j``.
        oovs: the OOV words, in order of first appearance.
        words: every word as read (lowercased), one per id.
    """

    ids: list[int]
    ext_ids: list[int]
    oovs: list[str]
    words: list[str]


def encode_with_oov(
    tokenizer: TextTokenizer, text: str, max_length: int | None = None
) -> EncodedText:
    """Tokenize ``text`` (cut to ``max_length`` words) with per-text OOV ids (See et al.)."""
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    V = tokenizer.vocab_size
    ids = list(encoding.ids[:max_length])
    words = [text[a:b].lower() for a, b in encoding.offsets[: len(ids)]]
    oovs: list[str] = []
    ext_ids = []
    for i, word in zip(ids, words, strict=True):
        if i == UNK_ID:
            if word not in oovs:
                oovs.append(word)
            ext_ids.append(V + oovs.index(word))
        else:
            ext_ids.append(i)
    return EncodedText(ids, ext_ids, oovs, words)


def encode_target(
    tokenizer: TextTokenizer, text: str, oovs: Sequence[str], max_length: int | None
) -> list[int]:
    """Summary ids in the source's extended vocabulary, ending with ``<eos>``: a word outside
    the vocabulary is ``V + j`` if it is the source's OOV word ``j``, else ``<unk>``."""
    encoded = encode_with_oov(tokenizer, text, None if max_length is None else max_length - 1)
    V = tokenizer.vocab_size
    out = []
    for i, word in zip(encoded.ids, encoded.words, strict=True):
        out.append(V + oovs.index(word) if i == UNK_ID and word in oovs else i)
    return [*out, EOS_ID]


def detokenize(words: Sequence[str]) -> str:
    """Join words with spaces, then drop the space before closing punctuation and after
    opening brackets."""
    text = " ".join(words)
    return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))


def ids_to_words(ids: Sequence[int], tokenizer: TextTokenizer, oovs: Sequence[str]) -> list[str]:
    """Words of extended ids (``V + j`` is the source's OOV word ``j``)."""
    V = tokenizer.vocab_size
    return [oovs[i - V] if i >= V else str(tokenizer.hf.id_to_token(i)) for i in ids]
