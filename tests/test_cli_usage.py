"""A mistyped flag is reported by its subcommand, with that subcommand's usage and the closest
flag it has."""

from __future__ import annotations

import pytest

from qkv.cli.main import main


def test_mistyped_flag_gets_the_subcommands_usage_and_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["train", "sentiment", "--data", "builtin:rt", "--minuts", "1", "--out", "x"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qkv train sentiment ")
    assert "usage: qkv [-h]" not in err
    assert "qkv train sentiment: error: unrecognized arguments: --minuts 1" in err
    assert "(--minuts: did you mean --minutes?)" in err


def test_nested_subcommands_and_flags_with_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["viz", "masks", "--out", "m.png", "--windw=3", "--zzzzzz"])
    err = capsys.readouterr().err
    assert err.startswith("usage: qkv viz masks ")
    assert "--windw: did you mean --window?" in err and "--zzzzzz: did you mean" not in err
    with pytest.raises(SystemExit):
        main(["--verison"])
    err = capsys.readouterr().err
    assert err.startswith("usage: qkv [-h]") and "did you mean --version?" in err
