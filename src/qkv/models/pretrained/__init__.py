"""Pretrained encoders and decoders, built from qkv's own modules.

::

    from qkv.models import load_pretrained

    encoder, tokenizer = load_pretrained("minilm")         # or a folder
    ids, mask = encode(tokenizer, ["a gorgeous, witty film", "dull"])
    hidden = encoder(ids, mask)                            # (B, N, 384), through qkv.attention
    maps = encoder.attention_maps(ids, mask)               # 6 x (B, 12, N, N), for pictures

``transformers`` is not needed; ``safetensors`` reads the weights and ``tokenizers`` the
tokenizer. :class:`PretrainedClassifier` puts a classification head on an encoder.

A Llama-family decoder loads from a GGUF file (read and dequantized by :mod:`.gguf`, no
``transformers`` or ``gguf`` package needed) or a Hugging Face folder::

    model, tokenizer = load_pretrained("smollm2")         # LlamaDecoder, ChatTokenizer
    ids, mask = tokenizer.encode_batch([tokenizer.chat_prompt("What is attention?")])
    logits = model(ids, mask)                              # (1, N, 49152)
"""

from qkv.models.pretrained._common import NamedModel, PretrainedError
from qkv.models.pretrained.bert import BertConfig, BertEncoder, BertLayer, hf_tensor_names
from qkv.models.pretrained.chat import ChatTokenizer
from qkv.models.pretrained.classifier import (
    PretrainedClassifier,
    PretrainedClassifierConfig,
    encode,
)
from qkv.models.pretrained.decoder import NAMED_DECODERS, load_decoder, resolve_decoder
from qkv.models.pretrained.llama import LlamaConfig, LlamaDecoder, LlamaLayer
from qkv.models.pretrained.loading import (
    NAMED_MODELS,
    load_hf_config,
    load_pretrained,
    load_tokenizer,
    resolve_pretrained,
)

__all__ = [
    "NAMED_DECODERS",
    "NAMED_MODELS",
    "BertConfig",
    "BertEncoder",
    "BertLayer",
    "ChatTokenizer",
    "LlamaConfig",
    "LlamaDecoder",
    "LlamaLayer",
    "NamedModel",
    "PretrainedClassifier",
    "PretrainedClassifierConfig",
    "PretrainedError",
    "encode",
    "hf_tensor_names",
    "load_decoder",
    "load_hf_config",
    "load_pretrained",
    "load_tokenizer",
    "resolve_decoder",
    "resolve_pretrained",
]
