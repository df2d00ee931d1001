"""The Llama decoder, the GGUF reader and text generation, on tiny random models (no weights
package needed; the comparisons with transformers need the ``hf`` extra)."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest
import torch

from qkv.decode import generate, sample_next
from qkv.models import load_pretrained
from qkv.models.pretrained import LlamaConfig, LlamaDecoder, PretrainedError
from qkv.models.pretrained.chat import ChatTokenizer, left_pad
from qkv.models.pretrained.decoder import load_decoder
from qkv.models.pretrained.gguf import GGMLType, GGUFError, read_gguf
from qkv.models.pretrained.llama import unpermute_rope_rows

HAS_HF = importlib.util.find_spec("transformers") is not None
EXACT_CPU_BACKENDS = ("reference", "chunked", "sdpa", "cpu")

# --- a minimal GGUF writer (the format, written independently of the reader) -----------------

_TYPES = {"u32": (4, "<I"), "i32": (5, "<i"), "f32": (6, "<f"), "bool": (7, "<?")}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(kind: str, value: object) -> bytes:
    if kind == "str":
        return struct.pack("<I", 8) + _string(str(value))
    if kind.startswith("arr:"):
        item = kind[4:]
        items = list(value)  # type: ignore[call-overload]
        head = struct.pack("<I", 9) + struct.pack("<I", 8 if item == "str" else _TYPES[item][0])
        head += struct.pack("<Q", len(items))
        if item == "str":
            return head + b"".join(_string(s) for s in items)
        return head + b"".join(struct.pack(_TYPES[item][1], v) for v in items)
    code, fmt = _TYPES[kind]
    return struct.pack("<I", code) + struct.pack(fmt, value)


def write_gguf(path, metadata, tensors, alignment=32):
    """``metadata``: ``{key: (kind, value)}``; ``tensors``: ``[(name, torch_shape, ggml_type,
    raw_bytes)]``."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, (kind, value) in metadata.items():
        out += _string(key) + _value(kind, value)
    offset = 0
    blobs = []
    for name, shape, kind, raw in tensors:
        dims = list(reversed(shape))
        out += _string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
        blobs.append((offset, raw))
        offset += -(-len(raw) // alignment) * alignment
    out += bytes(-len(out) % alignment)
    data = bytearray(offset)
    for start, raw in blobs:
        data[start : start + len(raw)] = raw
    path.write_bytes(bytes(out + data))


def _f16(x: float) -> bytes:
    return struct.pack("<e", x)


def _quantized_blocks(kind: int, n_blocks: int, gen: torch.Generator) -> tuple[bytes, list[float]]:
    """Random blocks of ``kind`` and their values, computed in Python floats per element."""
    raw, values = bytearray(), []
    for _ in range(n_blocks):
        d = float(torch.rand((), generator=gen)) * 0.1 + 0.01
        d = struct.unpack("<e", _f16(d))[0]
        if kind == GGMLType.Q8_0:
            qs = torch.randint(-128, 128, (32,), generator=gen).tolist()
            raw += _f16(d) + struct.pack("<32b", *qs)
            values += [q * d for q in qs]
            continue
        nib = torch.randint(0, 16, (32,), generator=gen).tolist()
        packed = bytes(nib[i] | (nib[i + 16] << 4) for i in range(16))
        if kind == GGMLType.Q4_0:
            raw += _f16(d) + packed
            values += [(q - 8) * d for q in nib]
        else:
            m = struct.unpack("<e", _f16(float(torch.randn((), generator=gen))))[0]
            raw += _f16(d) + _f16(m) + packed
            values += [q * d + m for q in nib]
    return bytes(raw), values


def test_gguf_reader_dequantizes_every_block_format(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors, expected = [], {}
    for kind in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
        raw, values = _quantized_blocks(kind, 6, gen)
        name = GGMLType.NAMES[kind]
        tensors.append((name, (3, 64), kind, raw))
        expected[name] = torch.tensor(values, dtype=torch.float64).reshape(3, 64)
    plain = torch.randn(5, 7, generator=gen)
    tensors.append(("F32", (5, 7), GGMLType.F32, plain.numpy().tobytes()))
    tensors.append(("F16", (5, 7), GGMLType.F16, plain.half().numpy().tobytes()))
    expected["F32"], expected["F16"] = plain.double(), plain.half().double()
    file = tmp_path / "t.gguf"
    write_gguf(file, {"general.architecture": ("str", "test"), "n": ("u32", 7)}, tensors)
    with read_gguf(file) as gguf:
        assert gguf.metadata == {"general.architecture": "test", "n": 7}
        for name, value in expected.items():
            got = gguf.tensor(name, dtype=torch.float64)
            assert got.shape == value.shape
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7)
    if importlib.util.find_spec("gguf") is not None:  # and the gguf package's own reading
        from gguf import GGUFReader, dequantize

        with read_gguf(file) as gguf:
            for t in GGUFReader(file).tensors:
                theirs = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).double()
                ours = gguf.tensor(t.name, dtype=torch.float64)
                torch.testing.assert_close(ours, theirs.reshape(ours.shape))


def test_gguf_reader_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(bad)
    file = tmp_path / "q.gguf"
    write_gguf(file, {}, [("w", (32,), 12, bytes(144))])  # Q4_K: not handled
    with read_gguf(file) as gguf, pytest.raises(GGUFError, match=r"ggml type 12.*dequantizes"):
        gguf.tensor("w")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(file.read_bytes()[:30])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(truncated)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter: ``reshape(H, 2, D/2, E).swapaxes(1, 2)``."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    )


def test_unpermute_rope_rows_inverts_the_converter():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(_permute(w, 3), 3), w)
    assert not torch.equal(_permute(w, 3), w)
    with pytest.raises(ValueError, match="multiple of 2 \\* num_heads"):
        unpermute_rope_rows(torch.randn(9, 4), 2)


# --- a tiny random Llama -----------------------------------------------------------------------

TINY = {
    "vocab_size": 300,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 48,
    "rope_base": 500.0,
    "rms_norm_eps": 1e-5,
    "max_positions": 128,
}


def _tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaDecoder:
    torch.manual_seed(seed)
    model = LlamaDecoder(LlamaConfig(**TINY, bos_id=1, eos_id=2, pad_id=0)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # RMSNorm weights away from 1
            else:
                p.normal_(0, 0.3)
    return model


def test_config_validates():
    with pytest.raises(
        ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"
    ):
        LlamaConfig(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match=r"hidden_size .* divisible by num_heads"):
        LlamaConfig(**{**TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="architecture is 'gpt2'"):
        LlamaConfig.from_gguf({"general.architecture": "gpt2"})


def test_forward_checks_its_inputs():
    model = _tiny_model()
    ids = torch.randint(3, 300, (2, 5))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L \+ n\) = \(2, 5\)"):
        model(ids, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        model(ids.float())
    with pytest.raises(ValueError, match="exceed the model's context of 128"):
        model(torch.randint(3, 300, (1, 129)))


def _padded_prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (7, 3, 5)]
    return left_pad(rows, pad_id=0)


def test_padded_rows_equal_the_prompts_alone():
    """Left padding shifts a row's RoPE positions; its real tokens' logits must not change."""
    model = _tiny_model()
    ids, mask = _padded_prompts()
    with torch.no_grad():
        batched = model(ids, mask)
        for row in range(ids.shape[0]):
            alone = model(ids[row][mask[row]][None])[0]
            torch.testing.assert_close(batched[row][mask[row]], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", EXACT_CPU_BACKENDS)
def test_cached_decoding_equals_uncached_on_every_backend(backend):
    model = _tiny_model()
    model.backend = backend
    ids, mask = _padded_prompts()
    cached = generate(model, ids, mask, max_new_tokens=12)
    recomputed = generate(model, ids, mask, max_new_tokens=12, use_cache=False)
    assert cached.tokens == recomputed.tokens and cached.steps == 11
    sampled = generate(model, ids, mask, max_new_tokens=12, temperature=1.0, seed=4)
    resampled = generate(
        model, ids, mask, max_new_tokens=12, temperature=1.0, seed=4, use_cache=False
    )
    assert sampled.tokens == resampled.tokens


def test_batched_generation_equals_one_at_a_time():
    model = _tiny_model()
    ids, mask = _padded_prompts()
    batched = generate(model, ids, mask, max_new_tokens=10)
    for row in range(ids.shape[0]):
        alone = generate(model, ids[row][mask[row]][None], max_new_tokens=10)
        assert batched.tokens[row] == alone.tokens[0]


def test_stop_tokens_end_a_row_and_are_left_out():
    model = _tiny_model()
    ids, mask = _padded_prompts()
    free = generate(model, ids, mask, max_new_tokens=10)
    stop = free.tokens[1][3]  # row 1 stops at its 4th token (or earlier, if it came before)
    out = generate(model, ids, mask, max_new_tokens=10, stop_ids=[stop], pad_id=0)
    first = free.tokens[1].index(stop)
    assert out.tokens[1] == free.tokens[1][:first] and out.stopped[1]
    for row in (0, 2):
        if stop not in free.tokens[row]:
            assert out.tokens[row] == free.tokens[row] and not out.stopped[row]


def test_sampling_is_seeded_and_follows_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=gen, dtype=torch.float64) * 3
    draws = lambda **kw: torch.stack(  # noqa: E731
        [sample_next(logits, generator=torch.Generator().manual_seed(s), **kw) for s in range(300)]
    )
    assert torch.equal(draws(temperature=1.0), draws(temperature=1.0))
    top5 = logits.topk(5).indices
    top_k_draws = draws(temperature=1.0, top_k=5)
    for b in range(2):
        assert bool(torch.isin(top_k_draws[:, b], top5[b]).all())
        assert len(set(top_k_draws[:, b].tolist())) > 1
    # top_p: the nucleus is the smallest prefix of the sorted probabilities reaching p
    probs = logits.softmax(-1)
    for b in range(2):
        sorted_p, order = probs[b].sort(descending=True)
        size = int((sorted_p.cumsum(0) < 0.6).sum()) + 1
        nucleus = set(order[:size].tolist())
        seen = set(draws(temperature=1.0, top_p=0.6)[:, b].tolist())
        assert seen <= nucleus and (size == 1 or len(seen) > 1)
    assert torch.equal(sample_next(logits, temperature=2.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    with pytest.raises(ValueError, match="top_p must be None or a number in"):
        sample_next(logits, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        sample_next(logits, temperature=-1.0)


def test_generate_checks_its_arguments():
    model = _tiny_model()
    ids, mask = _padded_prompts()
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1), max_new_tokens=2)


# --- against transformers: a Hugging Face folder and a GGUF file of the same tiny model -------


def _byte_level_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "Ġt", "he", "Ġthe"]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in tokens[:3]])
    return tokenizer, tokens, merges


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    if not HAS_HF:
        pytest.skip("transformers not installed (pip install qkv[hf])")
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    tokenizer, tokens, merges = _byte_level_tokenizer()
    config = HFConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.float().save_pretrained(folder)
    hf.double()
    tokenizer.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return hf, folder, tokens, merges


def _gguf_of(hf, tokens, merges, path):
    """The tiny model as llama.cpp's converter writes it: permuted q/k rows, F32 tensors."""
    c = hf.config
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        for theirs, gguf in layer.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"blk.{i}.{gguf}.weight"
    state = hf.state_dict()
    tensors = []
    for hf_name, name in names.items():
        w = state[hf_name].float()
        if name.endswith("attn_q.weight"):
            w = _permute(w, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = _permute(w, c.num_key_value_heads)
        tensors.append((name, tuple(w.shape), GGMLType.F32, w.contiguous().numpy().tobytes()))
    metadata = {
        "general.architecture": ("str", "llama"),
        "llama.block_count": ("u32", c.num_hidden_layers),
        "llama.context_length": ("u32", c.max_position_embeddings),
        "llama.embedding_length": ("u32", c.hidden_size),
        "llama.feed_forward_length": ("u32", c.intermediate_size),
        "llama.attention.head_count": ("u32", c.num_attention_heads),
        "llama.attention.head_count_kv": ("u32", c.num_key_value_heads),
        "llama.rope.freq_base": ("f32", 500.0),
        "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5),
        "tokenizer.ggml.model": ("str", "gpt2"),
        "tokenizer.ggml.tokens": ("arr:str", tokens),
        "tokenizer.ggml.token_type": ("arr:i32", [3, 3, 3] + [1] * (len(tokens) - 3)),
        "tokenizer.ggml.merges": ("arr:str", [f"{a} {b}" for a, b in merges]),
        "tokenizer.ggml.bos_token_id": ("u32", 1),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.padding_token_id": ("u32", 0),
    }
    write_gguf(path, metadata, tensors)


@pytest.mark.parametrize("backend", EXACT_CPU_BACKENDS)
def test_hf_folder_and_gguf_file_equal_transformers(tiny_hf, tmp_path, backend):
    hf, folder, tokens, merges = tiny_hf
    _gguf_of(hf, tokens, merges, tmp_path / "tiny.gguf")
    ids, mask = _padded_prompts()
    ids = ids % len(tokens)
    expected = torch.zeros((*ids.shape, len(tokens)), dtype=torch.float64)
    with torch.no_grad():  # row by row: transformers' float64 eager path makes padded rows NaN
        for row in range(ids.shape[0]):
            expected[row, mask[row]] = hf(input_ids=ids[row][mask[row]][None]).logits[0]
    for source in (folder, tmp_path / "tiny.gguf"):
        model, tokenizer = load_pretrained(source, backend=backend)
        model.double()
        with torch.no_grad():
            got = model(ids, mask)
        # Both keep RoPE's cos/sin tables in float32 (transformers computes them in float32,
        # qkv in float64 then rounds), so float64 logits agree to ~1e-6, not to 1e-12.
        torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=2e-5)
        index = {t: i for i, t in enumerate(tokens)}
        assert tokenizer.encode("a the<|im_end|>") == [index["a"], index["Ġthe"], 2]
        assert tokenizer.decode(tokenizer.encode("the tether")) == "the tether"
        assert tokenizer.stop_ids == {2, 0}


def test_gguf_tokenizer_equals_the_folder_tokenizer(tiny_hf, tmp_path):
    hf, folder, tokens, merges = tiny_hf
    _gguf_of(hf, tokens, merges, tmp_path / "tiny.gguf")
    with read_gguf(tmp_path / "tiny.gguf") as gguf:
        from_gguf = ChatTokenizer.from_gguf(gguf.metadata)
    from_folder = ChatTokenizer.from_folder(folder, bos_id=1, eos_id=2, pad_id=0)
    for text in ("the theme", "<|im_start|>user\nthe<|im_end|>", "naïve 12 €"):
        assert from_gguf.encode(text) == from_folder.encode(text)
    assert from_gguf.encode("<|im_start|>")[0] == 1
    prompt = from_folder.chat_prompt("hi")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(ValueError, match="no chat template"):
        from_gguf.chat_prompt("hi")


def test_loader_errors_name_the_tensor(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, _, _ = tiny_hf
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(
        PretrainedError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        load_decoder(broken)
    with pytest.raises(PretrainedError, match="no such GGUF file"):
        load_decoder(tmp_path / "absent.gguf")
