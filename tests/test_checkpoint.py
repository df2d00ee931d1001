"""Model folders: exact round trips, atomic writes, and refusing folders that are not ours."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
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
    release_output_folder,
    save_model_folder,
)
from qkv.train.checkpoint import lock_file_of
from toys import ToyModel, build_toy, killable_run

pytest.importorskip("safetensors")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


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
    prepare_output_folder(tmp_path / "new")  # absent: fine (and not created)
    assert not (tmp_path / "new").exists()
    release_output_folder(tmp_path / "new")
    assert not lock_file_of(tmp_path / "new").exists()
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


# --------------------------------------------------------------------------------------------
# Non-finite training steps: skipped a few times, then a clear stop; never saved.


class _PoisonedTask:
    """The toy task, with a NaN loss on chosen steps (1-based)."""

    name, metric, higher_is_better = "toy", "accuracy", True

    def __init__(self, inner: object, bad_steps: set[int]) -> None:
        self.inner, self.bad_steps, self.calls = inner, bad_steps, 0

    def loss(self, model: torch.nn.Module, batch: object) -> object:
        self.calls += 1
        out = self.inner.loss(model, batch)  # type: ignore[attr-defined]
        if self.calls in self.bad_steps:
            return type(out)(out.total * float("nan"), out.count, out.tokens)
        return out

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        return self.inner.validate(model)  # type: ignore[attr-defined, no-any-return]


def _poisoned_trainer(bad_steps: set[int], **kwargs: object):  # type: ignore[no-untyped-def]
    from qkv.train import Trainer
    from toys import ToyTask, fast_config, toy_data, toy_source

    torch.manual_seed(0)
    x, y = toy_data()
    task = _PoisonedTask(ToyTask(x, y), bad_steps)
    config = fast_config(max_steps=12, eval_every=4, checkpoint_every=4)
    return Trainer(ToyModel(dropout=0.0), task, toy_source(x, y), config, **kwargs)  # type: ignore[arg-type]


def test_a_few_nan_losses_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    trainer = _poisoned_trainer({3, 7})
    with caplog.at_level("WARNING", logger="qkv.train.trainer"):
        result = trainer.fit()
    assert re.search(r"step 3: non-finite loss .*skipping the update", caplog.text)
    assert re.search(r"step 7: non-finite loss .*\(1 of at most 3 in a row\)", caplog.text)
    assert result.state.step == 12 and trainer.skipped_steps == 2
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_infinite_gradients_are_skipped_too(caplog: pytest.LogCaptureFixture) -> None:
    from qkv.train import Trainer
    from toys import ToyTask, fast_config, toy_data, toy_source

    torch.manual_seed(0)
    x, y = toy_data()
    model = ToyModel(dropout=0.0)
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    model.net[0].weight.register_hook(poison)
    trainer = Trainer(model, ToyTask(x, y), toy_source(x, y), fast_config(max_steps=4))
    with caplog.at_level("WARNING", logger="qkv.train.trainer"):
        trainer.fit()
    assert "step 2: non-finite gradients" in caplog.text
    assert trainer.skipped_steps == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_diverged_training_stops_and_keeps_the_good_checkpoint(tmp_path: Path) -> None:
    from qkv.train import NonFiniteTrainingError, load_weights

    saved: list[int] = []

    def save(model: torch.nn.Module, state: dict[str, object], step: int) -> None:
        save_model_folder(tmp_path, model=model, config={"model": model.config}, step=step)  # type: ignore[arg-type]
        saved.append(step)

    trainer = _poisoned_trainer(set(range(6, 100)), save=save, max_nonfinite_steps=3)
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"training diverged: step 9 .*4th such step in a row.*from step 8, is intact",
    ):
        trainer.fit()
    # Steps 6-8 were skipped (the weights of step 8 are those of step 5, still finite and
    # saved); step 9 stopped the run before step 12's save.
    assert saved == [4, 8]
    loaded = ToyModel(dropout=0.0)
    assert load_weights(loaded, tmp_path) == 8
    assert all(bool(torch.isfinite(p).all()) for p in loaded.parameters())


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    from qkv.train import NonFiniteTrainingError

    saved: list[int] = []
    trainer = _poisoned_trainer(
        set(), save=lambda m, s, step: saved.append(step), max_nonfinite_steps=10
    )
    with torch.no_grad():
        trainer.model.net[3].bias.fill_(float("nan"))  # type: ignore[index]
    with pytest.raises(
        NonFiniteTrainingError, match=r"at step 4 the weights are not finite .*net.3.bias"
    ):
        trainer.fit()
    assert saved == []
    with pytest.raises(ModelFolderError, match=r"non-finite"):
        save_model_folder(tmp_path, model=trainer.model, config={"model": {}}, step=1)
    assert not list(tmp_path.iterdir()) or not (tmp_path / "model.safetensors").exists()


def test_max_nonfinite_steps_is_checked() -> None:
    with pytest.raises(ValueError, match=r"max_nonfinite_steps must be >= 0; got -1"):
        _poisoned_trainer(set(), max_nonfinite_steps=-1)


# --------------------------------------------------------------------------------------------
# Files: one writer per folder, a full disk, corrupt folders, configs that do not fit.

_HOLD_LOCK = """
import sys, time
from qkv.train import prepare_output_folder
prepare_output_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def _python(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, *args], env=env, text=True, stdout=subprocess.PIPE, **kwargs
    )


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_stale(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "out"
    holder = _python("-c", _HOLD_LOCK, str(folder))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            ModelFolderError,
            match=rf"another qkv run is writing into this folder \(pid {holder.pid} ",
        ):
            prepare_output_folder(folder)
        with pytest.raises(ModelFolderError, match=rf"pid {holder.pid}"):
            save_model_folder(folder, model=ToyModel(), config={"model": {}})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The lock file still names the dead process; the OS released its lock.
    assert f"pid {holder.pid}" in lock_file_of(folder).read_text()
    prepare_output_folder(folder)
    _saved_toy(folder)
    assert is_model_folder(folder)
    release_output_folder(folder)
    assert not lock_file_of(folder).exists() and sorted(os.listdir(tmp_path)) == ["out"]


def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qkv.train.checkpoint as checkpoint

    good = _saved_toy(tmp_path, step=3)

    def onto_a_full_disk(model: torch.nn.Module, file: Path, step: int) -> None:
        file.write_bytes(b"half a file")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(checkpoint, "_write_weights", onto_a_full_disk)
    with pytest.raises(OSError, match=rf"no space left on device .*step-4 .*{tmp_path}") as caught:
        _saved_toy(tmp_path, step=4)
    assert caught.value.errno == errno.ENOSPC
    loaded, config = load_model(tmp_path, build_toy)
    assert config["step"] == 3 and not list(tmp_path.glob(".staging-*"))
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), good.eval()(x))


def test_saved_files_have_the_same_mode(tmp_path: Path) -> None:
    _saved_toy(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.name[0] != "."}
    assert modes["model.safetensors"] == modes["config.json"] == modes["training_state.pt"]
    assert modes["model.safetensors"] & 0o044 == 0o044  # readable by group and others


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"", r"empty or truncated \(0 bytes"),
        (lambda b: b[:5], r"empty or truncated \(5 bytes"),
        (lambda b: b[: len(b) // 2], r"truncated"),
        (lambda b: b"\x00" * 3 + b"garbage" * 40, r"truncated or not a safetensors file"),
        (lambda b: (40).to_bytes(8, "little") + b"x" * 60, r"not a safetensors file"),
    ],
)
def test_damaged_weights_give_a_clear_error(tmp_path: Path, damage, message) -> None:  # type: ignore[no-untyped-def]
    _saved_toy(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelFolderError, match=rf"model\.safetensors: .*{message}"):
        load_model(tmp_path, build_toy)


def test_a_config_that_does_not_fit_is_refused_before_allocating(tmp_path: Path) -> None:
    from qkv.models import TransformerConfig, build_model

    config = TransformerConfig.from_name("tiny", src_vocab_size=21, tgt_vocab_size=21)
    model = build_model(config)
    save_model_folder(tmp_path, model=model, config={"model": config.to_dict()})
    document = json.loads((tmp_path / "config.json").read_text())
    document["model"]["src_vocab_size"] = document["model"]["tgt_vocab_size"] = 2_000_000_000
    (tmp_path / "config.json").write_text(json.dumps(document))

    def build(cfg: dict[str, object]) -> torch.nn.Module:
        return build_model(TransformerConfig.from_dict(cfg))  # type: ignore[attr-defined]

    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        ModelFolderError, match=r"does not fit the model in config\.json: .*2000000000"
    ):
        load_model(tmp_path, build)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 1 << 20  # far below the 512 GB the real model would take


# --- the CLI on damaged folders: one line, exit code != 0, no traceback ---------------------------


@pytest.fixture(scope="module")
def translation_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qkv.tasks.translation import train_translation
    from toys import reversal_text_pairs as reversal_pairs
    from toys import tiny_translation_config as tiny_config
    from toys import training, write_tsv

    root = tmp_path_factory.mktemp("cli-files")
    data = write_tsv(root / "data", reversal_pairs(16, seed=0))
    train_translation(tiny_config(data), training(2), root / "model")
    release_output_folder(root / "model")
    return root / "model"


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("model.safetensors", b"", r"model\.safetensors: empty or truncated"),
        (
            "model.safetensors",
            b"garbage!" * 10,
            r"model\.safetensors: truncated or not a safetensors",
        ),
        ("model.safetensors", "half", r"model\.safetensors: truncated"),
        ("tokenizer.json", b"{not json", r"tokenizer\.json: not a readable tokenizer file"),
        ("tokenizer.json", b"", r"tokenizer\.json: not a readable tokenizer file"),
        ("config.json", b"{", r"config\.json: not valid JSON"),
    ],
)
def test_cli_names_the_damaged_file_in_one_line(  # type: ignore[no-untyped-def]
    translation_model: Path, tmp_path: Path, capsys, file, content, message
) -> None:
    from qkv.cli.main import main

    folder = tmp_path / "model"
    shutil.copytree(translation_model, folder)
    target = folder / file
    target.write_bytes(
        target.read_bytes()[: target.stat().st_size // 2] if content == "half" else content
    )
    code = main(["translate", "--model", str(folder), "abc"])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


# --- SIGKILL during a save, then resume -----------------------------------------------------------

_TRAIN_UNTIL_KILLED = """
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import qkv.train.checkpoint as checkpoint
from qkv.train import Trainer, save_model_folder
from toys import killable_run

folder, kill_step, phase = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real_write, real_replace = checkpoint._write_weights, os.replace

def pause():
    print("saving", flush=True)
    time.sleep(60)  # the parent kills us here

def write_weights(model, file, step):
    real_write(model, file, step)
    if step == kill_step and phase == "staging":
        pause()

def replace(src, dst):
    real_replace(src, dst)
    if Path(dst).name == "model.safetensors" and f"step {kill_step}" in checkpoint._STEP_SEEN:
        pause()

def save(model, state, step):
    checkpoint._STEP_SEEN = f"step {step}"
    save_model_folder(folder, model=model, config={"model": model.config}, training_state=state, step=step)

checkpoint._STEP_SEEN = ""
checkpoint._write_weights = write_weights
if phase == "replacing":
    os.replace = replace
killable_run(save).fit()
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["staging", "replacing"])
def test_sigkill_during_a_save_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, phase: str
) -> None:
    """Killed while writing step 6's checkpoint (before its commit point, or while its files
    are moved into place), the folder stays loadable, and resuming ends bit-identical to a run
    that was never interrupted."""
    from qkv.train import load_weights

    folder = tmp_path / "run"
    child = _python(
        "-c", _TRAIN_UNTIL_KILLED, str(folder), "6", phase, cwd=str(Path(__file__).parent)
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "saving"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    expected_step = 3 if phase == "staging" else 6  # before the commit point: the previous one

    prepare_output_folder(folder, resume=True)  # takes the dead run's lock, finishes its save
    config = read_config(folder)
    resumed = killable_run(
        save=lambda m, s, step: save_model_folder(
            folder,
            model=m,
            config={"model": m.config},
            training_state=s,
            step=step,  # type: ignore[attr-defined]
        )
    )
    step = load_weights(resumed.model, folder)  # type: ignore[attr-defined]
    assert step == config["step"] == expected_step
    state = load_training_state(folder, expected_step=step)
    resumed.fit(resume=state)  # type: ignore[attr-defined]

    uninterrupted = killable_run()
    uninterrupted.fit()  # type: ignore[attr-defined]
    for (name, a), b in zip(
        resumed.model.state_dict().items(),  # type: ignore[attr-defined]
        uninterrupted.model.state_dict().values(),  # type: ignore[attr-defined]
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert read_config(folder)["step"] == 9
    assert not list(folder.glob(".commit-*")) and not list(folder.glob(".staging-*"))
    release_output_folder(folder)
