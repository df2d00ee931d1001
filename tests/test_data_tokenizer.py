"""Tokenizers (char and byte-level BPE), and batches of pairs they encode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from qkv.data import (
    Pair,
    PairDataset,
    PairTokenizer,
    TextTokenizer,
    collate_pairs,
    make_loader,
)
from qkv.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

pytest.importorskip("tokenizers")

TEXTS = [
    "mardi 3 mars 1998",
    "1998-03-03",
    "Tuesday,  March 3, 1998",
    "1998年3月3日火曜日",
    "tab\tand\nnewline",
    "Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi.",
    "In the beginning God created the heavens and the earth.",
]


def english_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "saw",
        "dog",
        "run",
        "far",
        "away",
        "from",
        "home",
        "every",
        "day",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def char_tok() -> TextTokenizer:
    return TextTokenizer.train(TEXTS, mode="char")


@pytest.fixture(scope="module")
def bpe_tok() -> TextTokenizer:
    return TextTokenizer.train(english_corpus() + TEXTS, mode="bpe", vocab_size=400)


def test_char_round_trip_is_exact(char_tok: TextTokenizer) -> None:
    assert char_tok.mode == "char"
    for text in TEXTS:
        ids = char_tok.encode(text)
        assert len(ids) == len(text)  # one token per character, whitespace included
        assert char_tok.decode(ids) == text
    assert char_tok.decode(char_tok.encode("€3")) == "<unk>3"  # unseen character


def test_char_vocabulary_is_sorted_and_specials_fixed(char_tok: TextTokenizer) -> None:
    vocab = char_tok.hf.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    chars = sorted(vocab, key=vocab.__getitem__)[4:]
    assert chars == sorted(set("".join(TEXTS)))
    assert char_tok.vocab_size == 4 + len(chars)


def test_bpe_round_trip_on_normal_text_and_no_unk(bpe_tok: TextTokenizer) -> None:
    assert bpe_tok.mode == "bpe"
    for text in [*TEXTS, "  double  spaces ", "unseen: Ωμέγα 🙂", "the cat saw the dog"]:
        ids = bpe_tok.encode(text)
        assert UNK_ID not in ids
        assert bpe_tok.decode(ids) == text
    # Merges learnt: frequent words are single tokens.
    assert len(bpe_tok.encode("the cat sat on the mat")) <= 6
    assert "".join(bpe_tok.tokens("the cat sat")) == "the cat sat"


def test_encode_batch_pads_and_decode_batch_inverts(bpe_tok: TextTokenizer) -> None:
    texts = ["the cat", "a dog ran far away from home", "x"]
    batch = bpe_tok.encode_batch(texts, add_bos=True, add_eos=True)
    assert batch.ids.dtype == torch.long and batch.ids.shape[0] == 3
    assert batch.ids.shape[1] == int(batch.lengths.max())
    for row, n in zip(batch.ids, batch.lengths.tolist(), strict=True):
        assert row[0] == BOS_ID and row[n - 1] == EOS_ID
        assert (row[n:] == PAD_ID).all()
    assert batch.padding_mask.sum().item() == batch.lengths.sum().item()
    assert bpe_tok.decode_batch(batch.ids) == texts
    cut = bpe_tok.encode_batch(texts, max_length=3)
    assert cut.lengths.max().item() == 3 and (cut.ids[:, 2][cut.lengths == 3] == EOS_ID).all()


def test_save_load_gives_identical_ids(tmp_path: Path, bpe_tok: TextTokenizer) -> None:
    char = TextTokenizer.train(TEXTS, mode="char")
    for name, tok in (("char", char), ("bpe", bpe_tok)):
        tok.save(tmp_path / f"{name}.json")
        again = TextTokenizer.load(tmp_path / f"{name}.json")
        assert again.mode == tok.mode and again.vocab_size == tok.vocab_size
        for text in TEXTS:
            assert again.encode(text) == tok.encode(text)
        assert torch.equal(again.encode_batch(TEXTS).ids, tok.encode_batch(TEXTS).ids)


def test_pair_tokenizer_shared_and_separate(tmp_path: Path) -> None:
    pairs = [Pair(f"{i} 年", f"year {i}") for i in range(50)]
    shared = PairTokenizer.train(pairs, mode="char")
    assert shared.shared and shared.source.encode("年") == shared.target.encode("年")
    shared.save(tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["tokenizer.json"]
    assert PairTokenizer.load(tmp_path / "shared").shared

    separate = PairTokenizer.train(pairs, shared=False, mode="char", target_mode="bpe")
    assert not separate.shared
    assert (separate.source.mode, separate.target.mode) == ("char", "bpe")
    assert UNK_ID in separate.source.encode("year")  # 'y' only ever on the target side
    separate.save(tmp_path / "separate")
    loaded = PairTokenizer.load(tmp_path / "separate")
    assert not loaded.shared
    assert loaded.target.encode("year 7") == separate.target.encode("year 7")
    with pytest.raises(ValueError, match="shared vocabulary"):
        PairTokenizer.train(pairs, mode="char", target_mode="bpe")


# -- batching ----------------------------------------------------------------------------------


def test_dataset_and_collate_shapes(char_tok: TextTokenizer) -> None:
    pairs = [Pair("mardi 3", "1998"), Pair("3 mars 1998", "1998-03-03")]
    data = PairDataset.from_pairs(pairs, PairTokenizer(char_tok))
    batch = collate_pairs([data[0], data[1]])
    assert batch.source.shape == (2, len("3 mars 1998") + 1)  # + <eos>
    assert batch.target.shape == (2, len("1998-03-03") + 2)  # <bos> ... <eos>
    assert batch.target[:, 0].eq(BOS_ID).all()
    assert batch.index.tolist() == [0, 1]
    assert char_tok.decode_batch(batch.target, batch.target_lengths) == ["1998", "1998-03-03"]
    assert batch.num_tokens == sum(len(s) + len(t) for _, s, t in (data[0], data[1]))


def test_make_loader_yields_padded_batches(char_tok: TextTokenizer) -> None:
    pairs = [Pair("x" * (i % 7 + 1), "1998") for i in range(40)]
    loader = make_loader(PairDataset.from_pairs(pairs, PairTokenizer(char_tok)), batch_size=8)
    seen = []
    for batch in loader:
        assert batch.source.dtype == torch.long and batch.source.shape[0] <= 8
        assert int(batch.source_lengths.max()) == batch.source.shape[1]
        seen.extend(batch.index.tolist())
    assert sorted(seen) == list(range(40))
