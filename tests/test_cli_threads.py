"""CPU threads: --threads, else OMP_NUM_THREADS, else half the CPUs; shown in the run header."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qkv.cli import threads
from qkv.cli.main import main


def test_default_is_half_the_cpus_unless_omp_num_threads_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, want in ((1, 1), (2, 1), (3, 1), (8, 4), (16, 8)):
        monkeypatch.setattr(threads, "usable_cpus", lambda cpus=cpus: cpus)
        assert threads.default_threads() == (want, f"half of {cpus} CPUs")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the 16 CPUs
    assert threads.default_threads()[0] == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == (3, "OMP_NUM_THREADS")


def test_threads_flag_is_checked_and_restored_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    out = tmp_path / "m"
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{w}\t{w[::-1]}\n" for w in ("abc", "bcd", "cde", "def") * 5))
    argv = ["train", "translation", "--data", str(pairs), "--tokenizer", "char", "--preset",
            "tiny", "--valid-size", "4", "--out"]  # fmt: skip
    assert main([*argv, str(out), "--steps", "1", "--threads", "0"]) == 2
    assert "--threads must be >= 1; got 0" in capsys.readouterr().err
    assert main([*argv, str(out), "--steps", "1", "--threads", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    header = err.splitlines()[0]
    assert header.startswith(f"qkv train translation: into {out}, device cpu, 2 CPU threads")
    assert header.endswith("2 CPU threads (from --threads)")
    assert torch.get_num_threads() == before
