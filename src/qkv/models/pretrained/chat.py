"""A chat model's tokenizer: byte-level BPE, its special ids and its chat template.

:class:`ChatTokenizer` wraps a ``tokenizers.Tokenizer`` with what generation needs: the ids that
end a turn, a left-padded batch encoder, and the model's own chat template (a Jinja template, as
in Hugging Face's ``tokenizer_config.json`` or a GGUF file's ``tokenizer.chat_template``) rendered
in a sandbox. :meth:`ChatTokenizer.from_gguf` builds it from a GGUF file's metadata
(``tokenizer.ggml.*``), so no ``tokenizer.json`` is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChatTokenizer"]

# GGUF token types (llama.cpp's llama_token_type): 3 = control (special), 4 = user-defined.
_CONTROL, _USER_DEFINED = 3, 4
# Tokens that end a turn or a text in the chat models qkv loads, when the vocabulary has them.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class ChatTokenizer:
    """Byte-level BPE with special ids and a chat template.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (padding and truncation off).
        bos_id, eos_id, pad_id: special ids (``eos`` ends an assistant turn in chat models).
        chat_template: a Jinja chat template, or None (then :meth:`chat_prompt` raises).
        add_bos: whether :meth:`encode` starts every text with ``bos_id``.

    Attributes:
        stop_ids: the ids that end generation: ``eos_id`` and the vocabulary's end-of-turn and
            end-of-text tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        stops = {eos_id}
        for text in _STOP_TOKENS:
            token = tokenizer.token_to_id(text)
            if token is not None:
                stops.add(token)
        self.stop_ids = frozenset(stops)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``; special tokens written in it (``<|im_start|>``) are single ids."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return [self.bos_id, *ids] if self.add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``texts`` as a left-padded batch for a decoder.

        Returns:
            ``ids (B, N)`` int64 (``pad_id`` at the left of shorter rows) and ``mask (B, N)``
            bool, True at real tokens.

        Raises:
            ValueError: no texts, or a text with no tokens.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty sequence of strings")
        rows = [self.encode(t) for t in texts]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"texts[{i}] ({texts[i]!r}) has no tokens")
        return left_pad(rows, self.pad_id)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """The text of ``ids``; special tokens left out unless ``skip_special`` is False."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special))

    def chat_prompt(
        self,
        messages: str | Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """The model's chat template applied to ``messages`` (a user message's text, or
        ``[{"role": "user", "content": ...}, ...]``), ending with the assistant's turn opened.

        Raises:
            ValueError: the tokenizer has no chat template, or the template fails.
        """
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template; prompt the model with plain text"
            )
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        special = {
            "bos_token": self.tokenizer.id_to_token(self.bos_id) or "",
            "eos_token": self.tokenizer.id_to_token(self.eos_id) or "",
        }
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special
            )
        except TemplateError as error:
            raise ValueError(f"the chat template failed: {error}") from None

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> ChatTokenizer:
        """From a GGUF file's ``tokenizer.ggml.*`` metadata (``model`` must be ``"gpt2"``:
        byte-level BPE, as Llama 3, SmolLM and Qwen use).

        Raises:
            ValueError: another tokenizer model, or missing tokens or merges.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is implemented"
            )
        tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
        merges: list[str] = metadata.get("tokenizer.ggml.merges") or []
        if not tokens or not merges:
            raise ValueError("tokenizer.ggml.tokens and tokenizer.ggml.merges must be present")
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        pairs: list[tuple[str, str]] = []
        for merge in merges:
            left, _, right = merge.partition(" ")
            pairs.append((left, right))
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs)
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        special = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
        defined = [t for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED]
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special]
        )
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in defined])
        eos = int(metadata.get("tokenizer.ggml.eos_token_id", 2))
        return cls(
            tokenizer,
            bos_id=int(metadata.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=eos,
            pad_id=int(metadata.get("tokenizer.ggml.padding_token_id", eos)),
            chat_template=metadata.get("tokenizer.chat_template"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], *, bos_id: int, eos_id: int, pad_id: int
    ) -> ChatTokenizer:
        """From a Hugging Face folder's ``tokenizer.json`` (and the ``chat_template`` of its
        ``tokenizer_config.json`` or ``chat_template.jinja``, when present)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        template: str | None = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            found = config.get("chat_template")
            template = found if isinstance(found, str) else None
        return cls(tokenizer, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=template)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows of ids as ``ids (B, N)`` int64 and ``mask (B, N)`` bool (True at real tokens),
    padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = True
    return ids, mask
