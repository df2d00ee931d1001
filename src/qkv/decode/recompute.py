"""The no-cache baseline: a wrapper whose every decoding step reruns the decoder over the whole
prefix. Slow on purpose; it is what the KV cache saves, and the reference the cached steps must
match."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qkv.models.base import EncoderOutput, Seq2SeqModel, check_positive_int

__all__ = ["PrefixRecompute", "PrefixRecomputeState"]


class PrefixRecomputeState:
    """The encoder output and the prefix fed so far, ``(B, t)`` int64."""

    def __init__(self, encoded: EncoderOutput) -> None:
        self.encoded = encoded
        self.prefix = torch.empty(
            encoded.batch_size, 0, dtype=torch.long, device=encoded.memory.device
        )

    @property
    def batch_size(self) -> int:
        return self.encoded.batch_size

    @property
    def length(self) -> int:
        return int(self.prefix.shape[1])

    def select(self, indices: Tensor) -> None:
        self.encoded = self.encoded.select(indices)
        self.prefix = self.prefix.index_select(0, indices)


class PrefixRecompute(nn.Module):
    """``model`` with :meth:`decode_step` recomputing ``model.decode`` over the full prefix
    (the encoder still runs once). Implements :class:`~qkv.models.Seq2SeqModel`.

    Args:
        model: the model to wrap; its parameters are shared, not copied.
    """

    def __init__(self, model: Seq2SeqModel) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or not isinstance(model, Seq2SeqModel):
            raise TypeError(
                f"model must be an nn.Module implementing Seq2SeqModel; got {type(model).__name__}"
            )
        self.model = model
        self.config: Any = model.config

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        return self.model.forward(source, target_in)

    def encode(self, source: Tensor) -> EncoderOutput:
        return self.model.encode(source)

    def decode(self, encoded: EncoderOutput, target_in: Tensor) -> Tensor:
        return self.model.decode(encoded, target_in)

    def start_decoding(
        self, encoded: EncoderOutput, *, beam_size: int = 1, max_len: int
    ) -> PrefixRecomputeState:
        check_positive_int("max_len", max_len)
        return PrefixRecomputeState(encoded.repeat_rows(beam_size))

    def decode_step(self, state: PrefixRecomputeState, tokens: Tensor) -> Tensor:
        """Append ``tokens (B,)`` to the prefix and return the last position's logits
        ``(B, V)`` of the decoder rerun over all of it."""
        state.prefix = torch.cat([state.prefix, tokens[:, None]], dim=1)  # (B, t + 1)
        return self.model.decode(state.encoded, state.prefix)[:, -1]

    def cross_attention(
        self,
        source: Tensor,
        target_in: Tensor,
        *,
        layer: int | None = -1,
        per_head: bool = False,
    ) -> Tensor:
        return self.model.cross_attention(source, target_in, layer=layer, per_head=per_head)
