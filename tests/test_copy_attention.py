"""Copy attention for translation: the mixture, the extended vocabulary, decoding, training."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import torch_threads
from qkv.decode import beam_search, greedy_decode
from qkv.models import (
    CopyRNN,
    CopyRNNConfig,
    CopyTransformer,
    CopyTransformerConfig,
    build_model,
)
from qkv.models.copy import copy_mixture, extended_source
from qkv.tasks.translation import TranslationConfig, Translator, train_translation
from qkv.tasks.translation_copy import copy_loss, decode_copied, simulate_unknowns
from qkv.train import TrainConfig
from toys import TINY

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


UNK = 3


def test_copy_mixture_matches_a_float64_loop() -> None:
    g = torch.Generator().manual_seed(0)
    B, Nt, Ns, V, X = 2, 3, 5, 7, 2
    vocab = torch.softmax(torch.randn(B, Nt, V, generator=g, dtype=torch.float64), -1)
    p_gen = torch.rand(B, Nt, generator=g, dtype=torch.float64)
    weights = torch.softmax(torch.randn(B, Nt, Ns, generator=g, dtype=torch.float64), -1)
    source_ext = torch.randint(0, V + X, (B, Ns), generator=g)
    got = copy_mixture(vocab.float(), p_gen.float(), weights.float(), source_ext, X)
    want = torch.zeros(B, Nt, V + X, dtype=torch.float64)
    for b in range(B):
        for t in range(Nt):
            want[b, t, :V] = p_gen[b, t] * vocab[b, t]
            for i in range(Ns):
                want[b, t, source_ext[b, i]] += (1 - p_gen[b, t]) * weights[b, t, i]
    torch.testing.assert_close(got.exp().double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1).double(), torch.ones(B, Nt, dtype=torch.float64))


def test_extended_source_numbers_tokens_the_target_lacks() -> None:
    mapping = torch.tensor([0, 1, 2, -1, 4, -1, -1, 5])  # source ids 5, 6 and <unk>: no target id
    source = torch.tensor([[4, 5, 6, 5, 2, 0], [UNK, 7, UNK, 2, 0, 0]])
    ext, positions = extended_source(source, mapping, target_vocab_size=6)
    assert ext.tolist() == [[4, 6, 7, 6, 2, 0], [6, 5, 7, 2, 0, 0]]  # each <unk> its own token
    assert positions == [[1, 2], [0, 2]]


def test_decode_copied_writes_the_source_text() -> None:
    class Target:
        vocab_size = 6

        def decode(self, ids: list[int]) -> str:
            return "".join("..xyzw"[i] for i in ids)

    pieces = ["a", "é", "b", "</s>"]
    assert decode_copied(Target(), [2, 6, 3, 7], pieces, [1, 2]) == "xéyb"  # type: ignore[arg-type]


def test_simulate_unknowns_points_labels_at_hidden_positions() -> None:
    mapping = torch.arange(10)
    mapping[UNK] = -1
    source = torch.tensor([[5, 6, 5, 7, 2]])
    labels = torch.tensor([[8, 5, 6, 2, 0]])  # 8: generated; 5, 6: copied; 7: not in the labels
    torch.manual_seed(0)
    new_source, new_labels = simulate_unknowns(source, labels, mapping, 10, rate=0.999)
    assert new_source.tolist() == [[UNK, UNK, UNK, 7, 2]]  # 7 is never hidden: not copied
    assert new_labels.tolist() == [[8, 10, 11, 2, 0]]  # 5 -> its first position's slot
    assert simulate_unknowns(source, labels, mapping, 10, rate=0.0)[1] is labels


def tiny_copy_model(shared: bool, seed: int = 0) -> CopyTransformer:
    torch.manual_seed(seed)
    config = CopyTransformerConfig.from_name(
        "tiny",
        src_vocab_size=12,
        tgt_vocab_size=12 if shared else 9,
        d_model=16,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dropout=0.0,
        tie_embeddings="all" if shared else "decoder",
    )
    model = build_model(config.to_dict())
    assert isinstance(model, CopyTransformer)
    if not shared:
        model.set_source_to_target(torch.tensor([0, 1, 2, -1, 4, 5, 6, 7, -1, -1, -1, 8]))
    return model.eval()


def tiny_copy_rnn(attention: str, seed: int = 0) -> CopyRNN:
    torch.manual_seed(seed)
    config = CopyRNNConfig.from_name(
        "tiny",
        src_vocab_size=12,
        tgt_vocab_size=9,
        embed_dim=8,
        hidden_dim=16,
        attention=attention,
        dropout=0.0,
    )
    model = build_model(config.to_dict())
    assert isinstance(model, CopyRNN)
    model.set_source_to_target(torch.tensor([0, 1, 2, -1, 4, 5, 6, 7, -1, -1, -1, 8]))
    return model.eval()


@pytest.mark.parametrize("kind", ["shared", "separate", "rnn-bahdanau", "rnn-luong"])
def test_incremental_steps_match_teacher_forcing(kind: str) -> None:
    shared = kind == "shared"
    model: CopyTransformer | CopyRNN
    model = tiny_copy_rnn(kind.split("-")[1]) if kind.startswith("rnn") else tiny_copy_model(shared)
    source = torch.tensor([[4, 9, 10, 9, UNK, 2], [5, 11, 2, 0, 0, 0]])
    target_in = torch.tensor([[1, 4, 5, 6], [1, 7, 4, 5]])
    with torch.no_grad():
        full = model(source, target_in)  # (B, Nt, V + X)
        state = model.start_decoding(model.encode(source), max_len=8)
        steps = torch.stack([model.decode_step(state, target_in[:, t]) for t in range(4)], 1)
    X = 0 if shared else 3  # row 0 of the separate vocabulary: 9, 10 and one <unk>
    assert full.shape == (2, 4, model.config.tgt_vocab_size + X + (1 if shared else 0))
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2, 4))
    # Beam search of width 1 without length penalty is greedy decoding, extended ids included.
    greedy = greedy_decode(model, source, max_len=6)
    assert beam_search(model, source, beam_size=1, length_penalty=0.0, max_len=6) == greedy
    assert len(beam_search(model, source, beam_size=3, max_len=6)) == 2


def test_bad_mapping_and_state_are_refused() -> None:
    model = tiny_copy_model(shared=False)
    with pytest.raises(ValueError, match=r"shape \(12,\); got \(3,\)"):
        model.set_source_to_target(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"values must be in \[-1, 9\); got min -1, max 9"):
        model.set_source_to_target(torch.tensor([0, 1, 2, -1, 4, 5, 6, 7, 8, 9, 1, 1]))
    with pytest.raises(ValueError, match='attention must be "bahdanau" or "luong", got "none"'):
        CopyRNNConfig(src_vocab_size=8, tgt_vocab_size=8, attention="none")
    with pytest.raises(ValueError, match="an RNN with attention='none' has none to copy with"):
        TranslationConfig(model="rnn", attention="none", copy=True)
    with pytest.raises(ValueError, match=r"copy_unknown_rate must be in \[0, 1\), got 1.0"):
        TranslationConfig(copy=True, copy_unknown_rate=1.0)


# --- through the translation task ---------------------------------------------------------------

KNOWN, UNSEEN = "abcdefghij", "klmnopqrst"


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(KNOWN) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def with_unseen_letter(items: list[str], seed: int) -> list[str]:
    """Each word with one letter replaced by one that no training pair contains."""
    rng = random.Random(seed)
    out = []
    for w in items:
        i = rng.randrange(len(w))
        out.append(w[:i] + rng.choice(UNSEEN) + w[i + 1 :])
    return out


def template(word: str) -> tuple[str, str]:
    return f"my name is {word}", f"hello {word}!"


def train_model(
    tmp_path: Path,
    pairs: list[tuple[str, str]],
    *,
    copy: bool,
    steps: int = 200,
    model: str = "transformer",
) -> Translator:
    data = tmp_path / f"data-{copy}"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (data / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    config = TranslationConfig(
        data=str(data),
        tokenizer="char",
        model=model,  # type: ignore[arg-type]
        model_overrides=TINY if model == "transformer" else {"dropout": 0.0},
        copy=copy,
        label_smoothing=0.0,
        metric="exact_match",
        batch_size=32,
        valid_size=16,
    )
    training = TrainConfig(
        lr=5e-3, warmup_steps=10, max_steps=steps, eval_every=steps, schedule="cosine", device="cpu"
    )
    train_translation(config, training, tmp_path / f"model-{copy}")
    return Translator.load(tmp_path / f"model-{copy}", device="cpu")


def exact(translator: Translator, pairs: list[tuple[str, str]]) -> float:
    hypotheses = translator.translate([s for s, _ in pairs])
    return sum(h == t for h, (_, t) in zip(hypotheses, pairs, strict=True)) / len(pairs)


@pytest.fixture(scope="module")
def copier(tmp_path_factory: pytest.TempPathFactory) -> Translator:
    """A tiny copy-attention Transformer trained 200 steps to copy 200 words."""
    return train_model(
        tmp_path_factory.mktemp("copier"), [(w, w) for w in words(200, 1)], copy=True
    )


def test_copy_model_copies_new_words_and_unknown_letters(copier: Translator) -> None:
    held_out = [(w, w) for w in words(50, 3)]
    assert exact(copier, held_out) >= 0.8
    # Letters the vocabulary never saw are <unk> to the model, and are copied as themselves.
    unseen = [(w, w) for w in with_unseen_letter(words(50, 2), seed=5)]
    assert exact(copier, unseen) >= 0.7
    outputs = copier.translate([s for s, _ in unseen], beam_size=3)
    assert sum(any(c in UNSEEN for c in out) for out in outputs) >= 40
    assert "<unk>" not in "".join(outputs)
    weights, source_labels, _ = copier.attention(unseen[0][0])
    assert weights.shape[1] == len(source_labels)
    p_copy, labels = copier.copy_probabilities("abcdef")
    assert p_copy.shape == (len(labels),) and labels[-1] == "</s>"
    assert float(p_copy[:-1].mean()) > 0.5  # the letters are copied, not generated


@pytest.mark.slow
def test_copy_beats_the_plain_model_with_the_same_budget(
    tmp_path: Path, copier: Translator
) -> None:
    pairs = [(w, w) for w in words(200, 1)]
    plain = train_model(tmp_path / "copy", pairs, copy=False)
    held_out = [(w, w) for w in words(50, 3)]
    unseen = [(w, w) for w in with_unseen_letter(words(50, 2), seed=5)]
    assert exact(plain, unseen) == 0.0  # it can only write <unk> for an unseen letter
    assert exact(plain, held_out) + 0.15 <= exact(copier, held_out)
    # Copy plus rewrite: names carried through a template.
    train = [template(w) for w in words(200, 1)]
    test = [template(w) for w in words(50, 3)]
    with_copy = train_model(tmp_path / "rewrite", train, copy=True)
    without = train_model(tmp_path / "rewrite", train, copy=False)
    assert exact(with_copy, test) >= 0.8
    assert exact(without, test) <= 0.3


@pytest.mark.slow
def test_copy_rnn_copies_new_words_and_unknown_letters(tmp_path: Path) -> None:
    rnn = train_model(tmp_path, [(w, w) for w in words(200, 1)], copy=True, model="rnn")
    assert rnn.model.config.kind == "copy_rnn"
    assert exact(rnn, [(w, w) for w in words(50, 3)]) >= 0.9
    unseen = [(w, w) for w in with_unseen_letter(words(50, 2), seed=5)]
    assert exact(rnn, unseen) >= 0.9
    beams = rnn.translate([s for s, _ in unseen], beam_size=3)  # on the extended vocabulary
    assert sum(h == t for h, (_, t) in zip(beams, unseen, strict=True)) >= 45
    p_copy, labels = rnn.copy_probabilities("abcdef")
    assert p_copy.shape == (len(labels),)


def test_copy_model_resumes_on_the_same_loss_curve(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.tsv").write_text("".join(f"{w}\t{w}\n" for w in words(48, 7)))
    config = TranslationConfig(
        data=str(data), tokenizer="char", model_overrides=TINY, copy=True, copy_unknown_rate=0.3
    )

    def training(steps: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, eval_every=6, warmup_steps=2, device="cpu")

    whole = train_translation(config, training(12), tmp_path / "whole")
    train_translation(config, training(6), tmp_path / "split")
    resumed = train_translation(config, training(12), tmp_path / "split", resume=True)
    assert resumed.result.state.losses == whole.result.state.losses
    assert Translator.load(tmp_path / "split").model.source_to_target.shape == (
        Translator.load(tmp_path / "split").tokenizer.source.vocab_size,
    )


def test_copy_loss_matches_cross_entropy_without_copies() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([[4, 5, 2, 0], [6, 7, 8, 2]])
    want = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=0, reduction="sum", label_smoothing=0.1
    )
    got = copy_loss(logits.log_softmax(-1), labels, 0.1, vocab_size=9)
    torch.testing.assert_close(got.double(), want)


# --- DDP: two processes take the steps one process takes on the same global batches ------------

DDP_STEPS = 3


def _ddp_settings(data: Path) -> TranslationConfig:
    return TranslationConfig(
        data=str(data),
        tokenizer="char",
        model_overrides=TINY,  # no dropout: its streams differ per process
        copy=True,
        copy_unknown_rate=0.0,  # so are the hidden-<unk> draws
        batch_size=4,
        valid_size=4,
    )


def _ddp_training() -> TrainConfig:
    return TrainConfig(lr=1e-2, warmup_steps=0, max_steps=DDP_STEPS, eval_every=100, device="cpu")


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    import torch.distributed as dist

    from qkv.tasks import train_task

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train_task("translation", _ddp_settings(Path(data)), _ddp_training(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_copy_model_under_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from qkv.tasks import get_task
    from qkv.train import DistributedContext, Trainer, seed_everything
    from test_ddp import GlobalBatches, _free_port

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.tsv").write_text("".join(f"{w}\t{w}\n" for w in words(32, 9)))
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data), str(out)), nprocs=2, join=True)
    spec = get_task("translation")
    settings = _ddp_settings(data)
    seed_everything(0)  # as train_task does before building the model
    prepared = spec.prepare(settings, spec.load_splits(str(data), {}), folder=None)
    single = prepared.model
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    Trainer(
        single,
        prepared.objective,
        GlobalBatches(prepared, seed=0),
        _ddp_training(),
        distributed=DistributedContext(),
    ).fit()
    ddp = Translator.load(out, device="cpu").model
    for name, value in single.state_dict().items():
        # A key bias adds the same q.b to every score of a row, which the softmax removes: its
        # gradient is zero up to rounding, and Adam scales that rounding noise to full steps.
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(initial[n], v) for n, v in single.state_dict().items())
