r"""Copy attention for the attentional RNN: :class:`CopyRNN`.

The pointer-generator of See et al. (2017) on :class:`~qkv.models.RNNSeq2Seq`, as in the paper:
the copy distribution **is** the decoder's own attention (Bahdanau or Luong) over the source,
and ``p_gen = sigmoid(w^T [h~; e] + b)`` from the readout ``h~`` (which holds the attention
context) and the input embedding ``e``. The mixture and the extended vocabulary are those of
:mod:`qkv.models.copy`; see there for ``source_to_target`` and extended ids.

Notation used for tensor shapes: ``B`` batch, ``Ns`` source length, ``Nt`` target length, ``H``
hidden size, ``M`` embedding size, ``V`` target vocabulary, ``X`` extended tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qkv.models.base import EncoderOutput, check_step_tokens
from qkv.models.copy import (
    UNK_ID,
    CopyOutput,
    check_source_to_target,
    copy_mixture,
    count_extended,
    default_source_to_target,
    extended_source,
)
from qkv.models.rnn import RNNConfig, RNNDecoderState, RNNSeq2Seq

__all__ = ["CopyRNN", "CopyRNNConfig"]


@dataclass(frozen=True)
class CopyRNNConfig(RNNConfig):
    """An :class:`~qkv.models.RNNConfig` for :class:`CopyRNN` (``kind`` ``"copy_rnn"``); its
    attention must not be ``"none"`` (the copy distribution is the attention)."""

    kind: ClassVar[str] = "copy_rnn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention == "none":
            raise ValueError(
                'a copy RNN copies through its attention: attention must be "bahdanau" or '
                '"luong", got "none"'
            )


class CopyRNN(RNNSeq2Seq):
    """:class:`~qkv.models.RNNSeq2Seq` with copy attention; like
    :class:`~qkv.models.copy.CopyTransformer`, its "logits" are log probabilities over the
    extended vocabulary ``(.., V + X)``.

    Args:
        config: a :class:`CopyRNNConfig`.
    """

    source_to_target: Tensor

    def __init__(self, config: CopyRNNConfig) -> None:
        if not isinstance(config, CopyRNNConfig):
            raise TypeError(f"config must be a CopyRNNConfig; got {type(config).__name__}")
        super().__init__(config)
        self.switch = nn.Linear(config.hidden_dim + config.embed_dim, 1)  # from [h~; e]
        mapping = default_source_to_target(
            config.src_vocab_size,
            config.tgt_vocab_size,
            shared=config.src_vocab_size == config.tgt_vocab_size,
        )
        self.register_buffer("source_to_target", mapping)

    def set_source_to_target(self, mapping: Tensor) -> None:
        """As :meth:`CopyTransformer.set_source_to_target
        <qkv.models.copy.CopyTransformer.set_source_to_target>`."""
        check_source_to_target(mapping, self.config.src_vocab_size, self.config.tgt_vocab_size)
        with torch.no_grad():
            self.source_to_target.copy_(mapping)

    def extended_positions(self, source: Tensor) -> list[list[int]]:
        """Per row of ``source (B, Ns)``, the source position of each extended id ``V + j``."""
        return extended_source(source, self.source_to_target, self.config.tgt_vocab_size)[1]

    def encode(self, source: Tensor) -> EncoderOutput:
        """As the RNN's, plus ``source_ext (B, Ns)`` in ``extras``."""
        encoded = super().encode(source)
        source_ext, _ = extended_source(source, self.source_to_target, self.config.tgt_vocab_size)
        return EncoderOutput(
            encoded.memory, encoded.source_mask, {**encoded.extras, "source_ext": source_ext}
        )

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """Teacher forcing -> log probabilities ``(B, Nt, V + X)``."""
        return self.decode(self.encode(source), target_in)

    def decode(self, encoded: EncoderOutput, target_in: Tensor) -> Tensor:
        """Log probabilities ``(B, Nt, V + X)`` over a whole prefix."""
        return self._copy_decode(encoded, target_in)[0]

    def copy_forward(self, source: Tensor, target_in: Tensor) -> CopyOutput:
        """Teacher forcing with the copy switch and attention."""
        encoded = self.encode(source)
        log_probs, p_gen, weights = self._copy_decode(encoded, target_in)
        return CopyOutput(log_probs, p_gen, weights, self.extended_positions(source))

    def _copy_decode(
        self, encoded: EncoderOutput, target_in: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        readout, weights = self._decode(encoded, target_in, need_weights=True)  # (B, Nt, H)
        if weights is None:  # unreachable: the config refuses attention="none"
            raise RuntimeError("the decoder returned no attention weights")
        embedded = self.tgt_embed(target_in)  # (B, Nt, M)
        return self._mix(readout, embedded, weights, encoded.extras["source_ext"])

    def _mix(
        self, readout: Tensor, embedded: Tensor, weights: Tensor, source_ext: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``readout (B, Nt, H)``, ``weights (B, Nt, Ns)`` -> log probabilities
        ``(B, Nt, V + X)``, ``p_gen (B, Nt)`` and the weights."""
        vocab = torch.softmax(self.output(self.drop(readout)).float(), dim=-1)  # (B, Nt, V)
        switch_in = torch.cat([readout, embedded], dim=-1)  # (B, Nt, H + M)
        p_gen = torch.sigmoid(self.switch(switch_in).float()).squeeze(-1)  # (B, Nt)
        num_oov = count_extended(source_ext, self.config.tgt_vocab_size)
        return copy_mixture(vocab, p_gen, weights, source_ext, num_oov), p_gen, weights

    def decode_step(self, state: RNNDecoderState, tokens: Tensor) -> Tensor:
        """``tokens (B,)`` (a copied extended id is fed back as ``<unk>``) -> log
        probabilities ``(B, V + X)``; advances ``state``."""
        tokens = check_step_tokens(tokens, state.batch_size)[:, 0]  # (B,)
        fixed = torch.where(tokens >= self.config.tgt_vocab_size, UNK_ID, tokens)  # (B,)
        embedded = self.tgt_embed(fixed)  # (B, M)
        readout, weights = self._step(state, self.drop(embedded), need_weights=True)
        state.steps += 1
        if weights is None:
            raise RuntimeError("the decoder returned no attention weights")
        source_ext = state.encoded.extras["source_ext"]  # (B, Ns)
        log_probs, _, _ = self._mix(
            readout.unsqueeze(1), embedded.unsqueeze(1), weights.unsqueeze(1), source_ext
        )
        return log_probs.squeeze(1)  # (B, V + X)
