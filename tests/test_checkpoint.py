"""Model folders: exact round trips, atomic writes, and refusing folders that are not ours."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qkv.train import (
    ModelFolderError,
    is_model_folder,
    load_model,
    load_training_state,
    prepare_output_folder,
    read_config,
    save_model_folder,
)
from test_train import ToyModel, build_toy

pytest.importorskip("safetensors")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on busy shared cores run far faster on one thread than fighting for two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _saved_toy(folder: Path, step: int = 3, **config: object) -> ToyModel:
    torch.manual_seed(step)
    model = ToyModel(dropout=0.0, **config)  # type: ignore[arg-type]
    state = {"trainer": {"step": step}, "moments": torch.randn(5)}
    save_model_folder(
        folder, model=model, config={"model": model.config}, training_state=state, step=step
    )
    return model


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _saved_toy(tmp_path)
    loaded, config = load_model(tmp_path, build_toy)
    x = torch.randn(6, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    assert config["format"] == "qkv-model" and config["step"] == 3
    assert sorted(config["files"]) == ["config.json", "model.safetensors", "training_state.pt"]
    assert not list(tmp_path.glob(".staging-*"))


def test_seq2seq_transformer_round_trips(tmp_path: Path) -> None:
    from qkv.models import TransformerConfig, build_model

    torch.manual_seed(0)
    config = TransformerConfig.from_name(
        "tiny", src_vocab_size=21, tgt_vocab_size=21, tie_embeddings="all"
    )
    model = build_model(config.to_dict()).eval()
    save_model_folder(tmp_path, model=model, config={"model": config.to_dict()})
    loaded, _ = load_model(tmp_path, build_model)
    source = torch.randint(4, 21, (3, 7))
    target = torch.randint(4, 21, (3, 5))
    assert torch.equal(model(source, target), loaded(source, target))


def test_training_state_loads_without_pickled_code(tmp_path: Path) -> None:
    _saved_toy(tmp_path, step=7)
    state = load_training_state(tmp_path, expected_step=7)
    assert state["step"] == 7 and state["moments"].shape == (5,)
    with pytest.raises(ModelFolderError, match="holds step 7 but the weights are from step 8"):
        load_training_state(tmp_path, expected_step=8)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    model = _saved_toy(tmp_path, step=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    class BrokenTokenizer:
        def save(self, directory: object) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model_folder(
            tmp_path,
            model=ToyModel(),
            config={"model": model.config},
            tokenizer=BrokenTokenizer(),
            step=2,
        )
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no staging folder left, no file touched
    assert read_config(tmp_path)["step"] == 1


def test_files_of_an_older_save_that_no_longer_apply_are_removed(tmp_path: Path) -> None:
    class TwoFiles:
        def save(self, directory: object) -> None:
            (Path(str(directory)) / "tokenizer.json").write_text("{}")
            (Path(str(directory)) / "target_tokenizer.json").write_text("{}")

    model = ToyModel()
    save_model_folder(tmp_path, model=model, config={"model": model.config}, tokenizer=TwoFiles())
    assert (tmp_path / "target_tokenizer.json").is_file()
    save_model_folder(tmp_path, model=model, config={"model": model.config})
    assert not (tmp_path / "target_tokenizer.json").exists()
    assert not (tmp_path / "tokenizer.json").exists()


def test_refuses_a_folder_holding_other_files(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ModelFolderError, match="not empty and not a qkv model folder"):
            prepare_output_folder(tmp_path, **flags)  # type: ignore[arg-type]
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_existing_model_needs_resume_or_overwrite(tmp_path: Path) -> None:
    prepare_output_folder(tmp_path / "new")  # absent: fine
    prepare_output_folder(tmp_path)  # empty: fine
    _saved_toy(tmp_path)
    with pytest.raises(ModelFolderError, match=r"--resume .* or --overwrite"):
        prepare_output_folder(tmp_path)
    prepare_output_folder(tmp_path, resume=True)
    prepare_output_folder(tmp_path, overwrite=True)
    (tmp_path / "training_state.pt").unlink()
    with pytest.raises(ModelFolderError, match="nothing to resume"):
        prepare_output_folder(tmp_path, resume=True)


def test_unusable_folders_are_named_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no such model folder"):
        read_config(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match=r"no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"config\.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert not is_model_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="not a qkv model config"):
        read_config(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    model = _saved_toy(tmp_path)
    config = read_config(tmp_path)
    config["model"] = {**model.config, "hidden": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="does not fit the model"):
        load_model(tmp_path, build_toy)
