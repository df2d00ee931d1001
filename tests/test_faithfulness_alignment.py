"""Gold alignments of the built-in dates and numbers, and the alignment error rate of attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qkv.cli.main import main

pytest.importorskip("babel")
pytest.importorskip("num2words")
pytest.importorskip("tokenizers")

import itertools

from qkv.data.builtin.dates import aligned_dates
from qkv.data.builtin.number_words import aligned_numbers
from qkv.data.parallel import Pair
from qkv.data.tokenizer import PairTokenizer
from qkv.interpret import alignment as al


def test_date_fields_write_the_target() -> None:
    items = aligned_dates(200, seed=3)
    assert items == aligned_dates(200, seed=3) and items != aligned_dates(200, seed=4)
    for item in items:
        year, month, day = (
            item.source[a:b] for a, b in (item.fields[f] for f in ("year", "month", "day"))
        )
        assert year == item.target[:4] and int(day) == int(item.target[8:])
        assert month and not month.isdigit()  # default formats spell the month out
        spans = sorted(item.fields.values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # disjoint


def test_number_words_write_their_digits() -> None:
    from num2words import num2words

    for item in aligned_numbers(300, seed=5):
        assert num2words(int(item.target)) == item.source
        for position, span in enumerate(item.digits):
            digit = int(item.target[position])
            place = (len(item.target) - 1 - position) % 3
            if span is None:
                assert digit == 0
                continue
            word = item.source[span[0] : span[1]]
            written = {num2words(v) for v in range(10, 20)}
            if word in written:  # a teen word writes its tens and units digits
                assert place in (0, 1)
            elif place == 1:
                assert word == num2words(10 * digit)
            else:
                assert word == num2words(digit)


@pytest.fixture(scope="module")
def char_tokenizer() -> PairTokenizer:
    pairs = [Pair(d.source, d.target) for d in aligned_dates(400, seed=9)]
    return PairTokenizer.train(pairs, mode="char")


def one_hot(nt: int, ns: int, links: dict[int, int]) -> torch.Tensor:
    weights = torch.full((nt, ns), 0.1 / ns)
    for t, s in links.items():
        weights[t, s] = 1.0
    return weights


def test_gold_links_score_zero_and_wrong_links_score_one(char_tokenizer: PairTokenizer) -> None:
    golds = al.gold_alignments(
        "builtin:dates", char_tokenizer.source, char_tokenizer.target, examples=20, seed=2
    )
    for gold in golds:
        assert gold.scored == (0, 1, 2, 3, 5, 6, 8, 9)  # the hyphens are not scored
        assert gold.sure <= gold.possible
        nt, ns = len(gold.target) + 1, len(gold.source) + 1  # with </s>
        sure = {t: s for t, s in sorted(gold.sure)}
        possible = {t: s for t, s in sorted(gold.possible)}
        perfect = one_hot(nt, ns, {**possible, **sure})
        assert float(al.alignment_error_rate(al.alignment_counts(perfect, gold))) == 0.0
        # Every link on </s>: in no field.
        wrong = one_hot(nt, ns, dict.fromkeys(range(nt), ns - 1))
        counts = al.alignment_counts(wrong, gold)
        assert float(al.alignment_error_rate(counts)) == 1.0 and float(counts[3]) == 0.0
    # A possible-only link (year digit on the wrong year digit) costs the sure share only.
    gold = golds[0]
    year = next(s for t, s in sorted(gold.sure) if t == 0)
    links = {**{t: s for t, s in sorted(gold.possible)}, **{t: s for t, s in sorted(gold.sure)}}
    links[0] = year + 1  # still in the year, not its first digit
    counts = al.alignment_counts(one_hot(len(gold.target) + 1, len(gold.source) + 1, links), gold)
    a, s, a_s, a_p = counts.tolist()
    assert (a, a_p) == (8, 8) and a_s == s - 1
    assert float(al.alignment_error_rate(counts)) == pytest.approx(1 / (8 + s))


def test_alignment_report_of_a_random_model(char_tokenizer: PairTokenizer) -> None:
    from qkv.models import TransformerConfig, build_model

    torch.manual_seed(0)
    vocab = char_tokenizer.source.vocab_size
    config = TransformerConfig.from_name("tiny", src_vocab_size=vocab, tgt_vocab_size=vocab)
    model = build_model(config).eval()
    report = al.alignment_report(model, char_tokenizer, "builtin:dates", examples=10)
    layers, heads = config.num_decoder_layers, config.num_heads
    assert len(report.aer) == layers and len(report.aer[0]) == heads
    flat = [a for row in report.aer for a in row]
    assert all(0.0 <= a <= 1.0 for a in flat) and report.best[2] == min(flat)
    # An untrained model does not align: most links miss the gold field.
    assert min(flat) > 0.3
    assert "| decoder layer |" in report.table("random")


def test_cli_refuses_a_folder_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["alignment", "--model", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err
    assert "no such model folder" in err and len(err.strip().splitlines()) == 1
    assert main(["faithfulness", "--model", str(tmp_path / "none")]) != 0
    assert "no such model folder" in capsys.readouterr().err
