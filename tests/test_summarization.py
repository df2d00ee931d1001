"""Pointer-generator summarization: the model's distribution, copying, overfitting a tiny set,
model-folder round trips, baselines and clear errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("tokenizers")

from qkv.data.parallel import Pair
from qkv.models.pointer import PointerGenerator, PointerGeneratorConfig
from qkv.tasks import train_task
from qkv.tasks.summarization import (
    SummarizationSetup,
    Summarizer,
    collate_pointer,
    detokenize,
    encode_target,
    encode_with_oov,
    evaluate_summarizer,
    lead_baseline,
    train_word_tokenizer,
)
from qkv.train import ModelFolderError, TrainConfig

# Each summary copies the one name in its document: the name is out of the vocabulary at test
# time, so only the pointer can produce it.
NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
TINY = [
    Pair(f"the function {name} returns a list . it never fails .", f"return {name} list")
    for name in NAMES
]


def _tokenizer(vocab_size: int = 40):  # type: ignore[no-untyped-def]
    return train_word_tokenizer(
        [t for p in TINY for t in (p.source, p.target)], vocab_size=vocab_size
    )


def test_oov_words_get_extended_ids_and_targets_copy_them() -> None:
    tokenizer = train_word_tokenizer(["the cat sat"], vocab_size=8)  # 4 specials + 3 words
    V = tokenizer.vocab_size
    encoded = encode_with_oov(tokenizer, "The DOG sat on the dog", None)
    assert encoded.oovs == ["dog", "on"]
    assert encoded.ext_ids[1] == V and encoded.ext_ids[5] == V  # the same OOV word, one id
    assert encoded.ids[1] == 3  # <unk> in the fixed vocabulary
    target = encode_target(tokenizer, "dog on mat", encoded.oovs, None)
    assert target == [V, V + 1, 3, 2]  # copies, an unknown word (<unk>), <eos>


def test_final_distribution_sums_to_one_and_puts_copy_mass_on_oov_ids() -> None:
    torch.manual_seed(0)
    for coverage in (False, True):
        model = PointerGenerator(
            PointerGeneratorConfig.from_name("tiny", vocab_size=20, coverage=coverage)
        )
        source = torch.randint(4, 20, (3, 7))
        source[0, 5:] = 0
        source_ext = source.clone()
        source_ext[1, 2] = 21  # an OOV word of row 1 at position 2
        source[1, 2] = 3
        out = model(source, source_ext, 2, torch.randint(4, 20, (3, 4)))
        assert out.log_probs.shape == (3, 4, 22)
        total = out.log_probs.exp().sum(-1)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-4)
        copy_mass = (1 - out.p_gen[1]) * out.attention[1, :, 2]
        assert torch.allclose(out.log_probs[1, :, 21].exp(), copy_mass, atol=1e-5)
        assert out.attention[0, :, 5:].abs().max() == 0  # padding is never attended
        if coverage:
            assert (out.coverage_loss[:, 0] == 0).all() and (out.coverage_loss[:, 1:] > 0).all()


def test_incremental_decoding_matches_teacher_forcing() -> None:
    torch.manual_seed(1)
    for coverage in (False, True):
        model = PointerGenerator(
            PointerGeneratorConfig.from_name("tiny", vocab_size=20, coverage=coverage)
        ).eval()
        source = torch.randint(4, 20, (2, 6))
        target_in = torch.randint(4, 20, (2, 5))
        with torch.no_grad():
            full = model(source, source, 0, target_in).log_probs
            state = model.start_decoding(model.encode(source, source, 0))
            steps = [model.decode_step(state, target_in[:, t])[0] for t in range(5)]
        assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="hidden_dim"):
        PointerGeneratorConfig(vocab_size=10, hidden_dim=0)
    with pytest.raises(ValueError, match="unknown PointerGeneratorConfig keys"):
        PointerGeneratorConfig.from_dict({"vocab_size": 10, "hiden_dim": 3})
    with pytest.raises(ValueError, match="source_ext ids"):
        model = PointerGenerator(PointerGeneratorConfig.from_name("tiny", vocab_size=10))
        ids = torch.randint(4, 10, (1, 3))
        model.encode(ids, ids + 10, 1)


def test_tiny_set_overfits_and_copies_unseen_names() -> None:
    torch.manual_seed(0)
    tokenizer = _tokenizer(vocab_size=12)  # too small for the names: they must be copied
    from qkv.tasks.summarization import PointerDataset, SummarizationTask, pointer_greedy_decode

    data = PointerDataset.from_pairs(
        TINY, tokenizer, max_source_length=None, max_target_length=None
    )
    assert all(d.oovs for d in data.documents)
    model = PointerGenerator(
        PointerGeneratorConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    )
    task = SummarizationTask(data, [p.target for p in TINY], tokenizer)
    batch = collate_pointer([data[i] for i in range(len(data))], tokenizer.vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(40):
        out = task.loss(model, batch)
        optimizer.zero_grad()
        (out.total / out.count).backward()
        optimizer.step()
    assert float(out.total.detach() / out.count) < 0.05
    model.eval()
    assert task.validate(model)["rougeL"] > 99.0
    unseen = PointerDataset.from_pairs(
        [Pair("the function zulu returns a list . it never fails .", "return zulu list")],
        tokenizer,
        max_source_length=None,
        max_target_length=None,
    )
    ids, _ = pointer_greedy_decode(model, collate_pointer([unseen[0]], tokenizer.vocab_size))
    assert ids[0][1] >= tokenizer.vocab_size  # the new name comes out by copying


def test_greedy_decoding_never_emits_pad_bos_or_unk() -> None:
    from qkv.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
    from qkv.tasks.summarization import PointerDataset, pointer_greedy_decode

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model = PointerGenerator(
        PointerGeneratorConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    ).eval()
    with torch.no_grad():  # the specials outweigh every word, and <eos> comes last
        model.output.bias[[PAD_ID, BOS_ID, UNK_ID]] = 50.0
        model.output.bias[EOS_ID] = -50.0
    data = PointerDataset.from_pairs(
        TINY[:3], tokenizer, max_source_length=None, max_target_length=None
    )
    ids, weights = pointer_greedy_decode(
        model, collate_pointer([data[i] for i in range(3)], tokenizer.vocab_size), max_length=6
    )
    assert [len(row) for row in ids] == [6, 6, 6]
    assert all(i not in (PAD_ID, BOS_ID, UNK_ID, EOS_ID) for row in ids for i in row)
    assert all(w.shape[0] == 6 for w in weights)


@pytest.mark.slow
def test_train_save_load_summarize_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("safetensors")
    pytest.importorskip("rouge_score")
    data = tmp_path / "docs.jsonl"
    import json

    data.write_text(
        "".join(json.dumps({"document": p.source, "summary": p.target}) + "\n" for p in TINY * 3)
    )
    out = tmp_path / "model"
    setup = SummarizationSetup(
        preset="tiny", vocab_size=12, batch_size=8, data_options={"validation": 0.2, "test": 0.0}
    )
    train = TrainConfig(lr=2e-2, max_steps=40, eval_every=40, warmup_steps=0, device="cpu")
    setup = replace(setup, data=str(data))
    result = train_task("summarization", setup, train, out).result
    assert result.state.step == 40
    summarizer = Summarizer.load(out)
    again = Summarizer.load(out)
    for name, value in summarizer.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name])
    summary = summarizer.summarize(["the function kilo returns a list . it never fails ."])[0]
    assert summary.text == "return kilo list"
    assert summary.attention.shape == (3, len(summary.source_words))
    scores = evaluate_summarizer(summarizer, TINY[:3])
    assert scores["model"]["rougeL"] > 99.0 > scores["lead"]["rougeL"]
    with pytest.raises(ValueError, match="document 1 is empty"):
        summarizer.summarize(["a text", "   "])
    more = TrainConfig(lr=2e-2, max_steps=45, eval_every=40, warmup_steps=0, device="cpu")
    resumed = train_task("summarization", setup, more, out, resume=True)
    assert resumed.result.state.step == 45 and resumed.resumed_from == 40


def test_loading_a_folder_of_another_task_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("safetensors")
    from qkv.train import save_model_folder

    model = PointerGenerator(PointerGeneratorConfig.from_name("tiny", vocab_size=10))
    save_model_folder(tmp_path, model=model, config={"task": "sentiment", "model": {}})
    with pytest.raises(ModelFolderError, match="not a summarization model"):
        Summarizer.load(tmp_path)
    with pytest.raises(ModelFolderError, match="no such model folder"):
        Summarizer.load(tmp_path / "missing")


def test_lead_baseline_and_detokenize() -> None:
    document = "First sentence here. Second one! Third?"
    assert lead_baseline(document) == "First sentence here."
    assert lead_baseline(document, 2) == "First sentence here. Second one!"
    assert detokenize(["return", "(", "x", ")", ",", "y", "."]) == "return (x), y."
