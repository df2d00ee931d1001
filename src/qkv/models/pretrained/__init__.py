"""Pretrained encoders from Hugging Face-layout folders, built from qkv's own modules.

::

    from qkv.models import load_pretrained

    encoder, tokenizer = load_pretrained("minilm")         # or a folder
    ids, mask = encode(tokenizer, ["a gorgeous, witty film", "dull"])
    hidden = encoder(ids, mask)                            # (B, N, 384), through qkv.attention
    maps = encoder.attention_maps(ids, mask)               # 6 x (B, 12, N, N), for pictures

``transformers`` is not needed; ``safetensors`` reads the weights and ``tokenizers`` the
tokenizer. :class:`PretrainedClassifier` puts a classification head on an encoder.
"""

from qkv.models.pretrained.bert import BertConfig, BertEncoder, BertLayer, hf_tensor_names
from qkv.models.pretrained.classifier import (
    PretrainedClassifier,
    PretrainedClassifierConfig,
    encode,
)
from qkv.models.pretrained.loading import (
    NAMED_MODELS,
    NamedModel,
    PretrainedError,
    load_hf_config,
    load_pretrained,
    load_tokenizer,
    resolve_pretrained,
)

__all__ = [
    "NAMED_MODELS",
    "BertConfig",
    "BertEncoder",
    "BertLayer",
    "NamedModel",
    "PretrainedClassifier",
    "PretrainedClassifierConfig",
    "PretrainedError",
    "encode",
    "hf_tensor_names",
    "load_hf_config",
    "load_pretrained",
    "load_tokenizer",
    "resolve_pretrained",
]
