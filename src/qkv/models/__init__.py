"""Sequence-to-sequence models over :mod:`qkv.nn`, all behind one interface.

::

    from qkv.models import TransformerConfig, Seq2SeqTransformer, build_model

    config = TransformerConfig.from_name("tiny", src_vocab_size=60, tgt_vocab_size=40)
    model = Seq2SeqTransformer(config)
    logits = model(source, target_in)                  # (B, Ns), (B, Nt) -> (B, Nt, 40)
    same = build_model(config.to_dict())               # rebuilt from a checkpoint's config.json

Pretrained BERT-family encoders load from Hugging Face-layout folders with
``load_pretrained("minilm")`` (:mod:`~qkv.models.pretrained`).

:class:`~qkv.models.base.Seq2SeqModel` is the interface training, decoding (:mod:`qkv.decode`)
and visualisation rely on; :mod:`~qkv.models.transformer` and :mod:`~qkv.models.rnn` implement it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from qkv.models.base import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DecoderState,
    EncoderOutput,
    ModelConfig,
    Seq2SeqModel,
)
from qkv.models.copy import CopyTransformer, CopyTransformerConfig
from qkv.models.copy_rnn import CopyRNN, CopyRNNConfig
from qkv.models.pretrained import BertEncoder, PretrainedClassifier, load_pretrained
from qkv.models.rnn import RNNConfig, RNNDecoderState, RNNSeq2Seq
from qkv.models.transformer import Seq2SeqTransformer, TransformerConfig, TransformerDecoderState

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "BertEncoder",
    "CopyRNN",
    "CopyRNNConfig",
    "CopyTransformer",
    "CopyTransformerConfig",
    "DecoderState",
    "EncoderOutput",
    "ModelConfig",
    "PretrainedClassifier",
    "RNNConfig",
    "RNNDecoderState",
    "RNNSeq2Seq",
    "Seq2SeqModel",
    "Seq2SeqTransformer",
    "TransformerConfig",
    "TransformerDecoderState",
    "build_model",
    "config_from_dict",
    "load_pretrained",
]

_KINDS: dict[str, tuple[Any, Any]] = {
    "transformer": (TransformerConfig, Seq2SeqTransformer),
    "rnn": (RNNConfig, RNNSeq2Seq),
    "copy_transformer": (CopyTransformerConfig, CopyTransformer),
    "copy_rnn": (CopyRNNConfig, CopyRNN),
}


def config_from_dict(
    data: Mapping[str, Any],
) -> TransformerConfig | RNNConfig:
    """The config that ``config.to_dict()`` wrote, chosen by its ``"kind"`` key."""
    if not isinstance(data, Mapping):
        raise TypeError(f"config must be a mapping (a config.json); got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"config kind must be one of {sorted(_KINDS)}; got kind={kind!r}")
    config_cls, _ = _KINDS[kind]
    return config_cls.from_dict(dict(data))


def build_model(config: Mapping[str, Any] | TransformerConfig | RNNConfig) -> nn.Module:
    """A freshly initialized model from a config or its ``to_dict()`` (e.g. a checkpoint's
    ``config.json``), dispatching on ``"kind"`` (``"transformer"``, ``"rnn"``, or ``"copy_transformer"`` / ``"copy_rnn"``); load the
    weights with ``load_state_dict`` afterwards.

    Raises:
        ValueError: for an unknown kind or field, or an invalid value (naming the field).
    """
    if isinstance(config, TransformerConfig | RNNConfig):
        config = config.to_dict()
    parsed = config_from_dict(config)
    _, model_cls = _KINDS[parsed.kind]
    return model_cls(parsed)
