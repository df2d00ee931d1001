"""The translation task end to end on tiny data: overfitting, model folders, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("sacrebleu")


from qkv.cli.main import main
from qkv.data import DataError
from qkv.tasks.evaluation import length_buckets, score_translations
from qkv.tasks.translation import (
    TranslationConfig,
    Translator,
    train_translation,
)
from qkv.train import ModelFolderError
from toys import TINY, training, write_tsv
from toys import reversal_text_pairs as reversal_pairs
from toys import tiny_translation_config as tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """A tiny Transformer trained to reverse 32 words (shared by the tests below)."""
    root = tmp_path_factory.mktemp("translation")
    pairs = reversal_pairs(32, seed=1)
    outcome = train_translation(
        tiny_config(write_tsv(root / "data", pairs)), training(150), root / "model"
    )
    assert outcome.result.stopped == "max_steps"
    return root / "model", pairs


def test_overfits_32_pairs(trained: tuple[Path, list[tuple[str, str]]]) -> None:
    folder, pairs = trained
    translator = Translator.load(folder, device="cpu")
    outputs = translator.translate([s for s, _ in pairs])
    assert outputs == [t for _, t in pairs]


def test_model_folder_round_trips_exactly(trained: tuple[Path, list[tuple[str, str]]]) -> None:
    folder, pairs = trained
    a = Translator.load(folder, device="cpu")
    b = Translator.load(folder, device="cpu")
    source = a._encode_sources([s for s, _ in pairs[:5]])
    target = torch.randint(4, 12, (5, 6))
    assert torch.equal(a.model(source, target), b.model(source, target))
    config = json.loads((folder / "config.json").read_text())
    assert config["task"] == "translation" and config["model"]["kind"] == "transformer"
    assert {"model.safetensors", "tokenizer.json", "training_state.pt"} <= set(config["files"])


def test_beam_search_and_attention(trained: tuple[Path, list[tuple[str, str]]]) -> None:
    folder, pairs = trained
    translator = Translator.load(folder, device="cpu")
    sources = [s for s, _ in pairs[:4]]
    assert translator.translate(sources, beam_size=3) == [t for _, t in pairs[:4]]
    weights, source_tokens, target_tokens = translator.attention(sources[0])
    assert weights.shape == (len(target_tokens), len(source_tokens))
    assert torch.allclose(weights.sum(-1), torch.ones(len(target_tokens)), atol=1e-5)
    # Reversal: the first output character attends most to the last input character.
    assert int(weights[0].argmax()) == len(sources[0]) - 1


def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    data = write_tsv(tmp_path / "data", reversal_pairs(48, seed=2))
    config = tiny_config(data, model_overrides={**TINY, "dropout": 0.1})
    whole = train_translation(config, training(12, eval_every=6), tmp_path / "whole")
    train_translation(config, training(6, eval_every=6), tmp_path / "split")
    resumed = train_translation(config, training(12, eval_every=6), tmp_path / "split", resume=True)
    assert resumed.result.state.losses == whole.result.state.losses


def test_malformed_data_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_tsv(tmp_path / "data", reversal_pairs(8, seed=3))
    (data / "train.tsv").write_text("abc\tcba\nno tab here\n")
    with pytest.raises(DataError, match=r"train.tsv:2: "):
        train_translation(tiny_config(data), training(2), tmp_path / "model")
    assert not (tmp_path / "model").exists()
    argv = ["train", "translation", "--data", str(data), "--out", str(tmp_path / "model")]
    assert main(argv) == 2
    assert f"{data / 'train.tsv'}:2: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "lstm"}, "model must be one of 'transformer', 'rnn'; got 'lstm'"),
        ({"attention": "bahdanau"}, "attention='bahdanau' is for model='rnn'"),
        ({"model": "rnn", "attention": "cosine"}, "attention must be one of"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TranslationConfig(**kwargs)  # type: ignore[arg-type]


def test_scores_and_length_buckets() -> None:
    sources = ["a" * n for n in (1, 2, 3, 4, 5, 6, 7, 8)]
    references = ["x y z"] * 8
    hypotheses = ["x y z"] * 4 + ["x y"] * 4  # the long half is wrong
    scores = score_translations(hypotheses, references, sources, num_buckets=2)
    assert scores.exact_match == 0.5
    assert [(b.low, b.high, b.exact_match) for b in scores.by_length] == [(1, 4, 1.0), (5, 8, 0.0)]
    assert scores.by_length[0].chrf == 100.0 and scores.by_length[1].chrf < 100.0
    assert length_buckets([5, 5, 5, 5], 3) == [(5, 5)]
    with pytest.raises(ValueError, match=r"hypotheses \(1\), references \(2\)"):
        score_translations(["a"], ["a", "b"], ["a"])


# --- the command line ------------------------------------------------------------------------


def test_cli_translate_file_stdin_and_attention(
    trained: tuple[Path, list[tuple[str, str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("matplotlib")
    folder, pairs = trained
    (tmp_path / "in.txt").write_text(f"{pairs[1][0]}\n{pairs[2][0]}\n")
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(pairs[3][0] + "\n"))
    picture = tmp_path / "att.png"
    argv = [
        "translate",
        "--model",
        str(folder),
        pairs[0][0],
        "-",
        "--file",
        str(tmp_path / "in.txt"),
    ]
    assert main([*argv, "--show-attention", str(picture)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [pairs[0][1], pairs[3][1], pairs[1][1], pairs[2][1]]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one output line per input: an empty line is named, never dropped
    (tmp_path / "in.txt").write_text(f"{pairs[1][0]}\n\n{pairs[2][0]}\n")
    assert main(argv[:3] + argv[5:]) == 2
    assert "in.txt line 2 is empty: there is nothing to translate" in capsys.readouterr().err


def test_cli_evaluate_json_and_plot(
    trained: tuple[Path, list[tuple[str, str]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("matplotlib")
    folder, _ = trained
    plot = tmp_path / "by_length.png"
    argv = ["evaluate", "--model", str(folder), "--json", "--buckets", "2", "--plot", str(plot)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "translation" and report["split"] == "test"
    metrics = report["metrics"]
    assert metrics["exact_match"] == 1.0 and report["examples"] == 32
    assert metrics["chrf"] == 100.0 and len(metrics["by_length"]) == 2
    assert plot.stat().st_size > 1000
    # Several models: a list in JSON, one line each in the plot (same names made distinct).
    drawn: list[list[str]] = []
    monkeypatch.setattr(
        "qkv.tasks.evaluation.plot_scores_by_length",
        lambda series, path, **kw: drawn.append(list(series)) or Path(path),
    )
    assert main([*argv, "--model", str(folder), "--limit", "8"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["examples"] for r in reports] == [8, 8]
    assert len(drawn) == 1 and len(set(drawn[0])) == 2


def test_cli_train_writes_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_tsv(tmp_path / "data", reversal_pairs(16, seed=4))
    argv = ["train", "translation", "--data", str(data), "--model", "rnn", "--attention", "luong"]
    argv += [
        "--preset",
        "tiny",
        "--eval-every",
        "3",
        "--out",
        str(tmp_path / "m"),
        "--quiet",
    ]
    assert main([*argv, "--steps", "3", "--device", "cpu", "--tokenizer", "char"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["kind"] == "rnn" and config["model"]["attention"] == "luong"
    # Running again into the same folder needs --resume or --overwrite.
    assert main([*argv, "--device", "cpu"]) == 2
    assert "already holds a qkv model" in capsys.readouterr().err
    # --resume without limits keeps the saved ones (3 steps: nothing left to do) ...
    assert main([*argv, "--device", "cpu", "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    # ... and with --steps continues to the new limit.
    assert main([*argv, "--device", "cpu", "--resume", "--steps", "5"]) == 0
    assert "trained 5 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "train",
                "translation",
                "--data",
                "builtin:dates",
                "--attention",
                "bahdanau",
                "--out",
                "x",
            ],
            "is for model='rnn'",
        ),
        (
            ["train", "translation", "--data", "builtin:nope", "--out", "{tmp}/m"],
            "unknown builtin data set 'nope'",
        ),
        (["translate", "--model", "{tmp}/missing", "hello"], "no such model folder"),
        (["translate", "--model", "{tmp}", "hello"], "not a qkv model folder"),
        (["evaluate", "--model", "{tmp}/missing"], "no such model folder"),
    ],
)
def test_cli_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_cli_rejects_bad_flag_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "translation", "--data", "builtin:dates", "--out", "x", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps: must be >= 1, got 0" in capsys.readouterr().err


def test_translate_refuses_a_model_of_another_task(tmp_path: Path) -> None:
    from qkv.train import save_model_folder
    from toys import ToyModel

    model = ToyModel()
    save_model_folder(tmp_path, model=model, config={"task": "toy", "model": model.config})
    with pytest.raises(ModelFolderError, match="holds a 'toy' model, not a translation model"):
        Translator.load(tmp_path)
