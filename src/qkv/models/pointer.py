r"""Pointer-generator network for summarization (See et al. 2017): :class:`PointerGenerator`.

See, Liu, Manning. "Get To The Point: Summarization with Pointer-Generator Networks". ACL 2017.
An RNN encoder-decoder whose every output step mixes two distributions over an *extended*
vocabulary (the fixed vocabulary plus this source's out-of-vocabulary words)::

    P(w) = p_gen * P_vocab(w) + (1 - p_gen) * sum_{i : x_i = w} a_i

so a word the vocabulary lacks (a name, an identifier) can still be produced by copying it from
the source, through the attention ``a`` itself. With ``coverage``, the sum of past attention
``c_t = sum_{t' < t} a_t'`` enters the attention scores and the loss adds
``sum_i min(a_t,i, c_t,i)``, which penalises attending again where the decoder already has
(repetition, the classic failure of seq2seq summaries).

Differences from the paper, and why:

- **Luong's "general" score** ``s_t^T W h_i`` (Luong et al. 2015) after the decoder step,
  instead of Bahdanau's additive score before it. The decoder's states then do not depend on
  the attention, so with teacher forcing the GRU runs over the whole summary in one call and the
  attention of every step is one :func:`qkv.attention` call: several times faster on a CPU than
  a step-by-step loop. Coverage adds ``w_c * c_t,i`` to the scores as a bias, which needs the
  attention step by step (each step is one small ``qkv.attention`` call with that bias).
- **GRU** cells instead of LSTMs (fewer parameters, same role).
- One vocabulary and embedding table for source and summary, as in the paper.

Notation used for tensor shapes: ``B`` batch, ``Ns`` source length, ``Nt`` summary length,
``M`` embedding size, ``H`` hidden size (the encoder has ``H`` per direction, ``2H`` in all),
``V`` the fixed vocabulary, ``X`` the most source OOV words of any example in the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from qkv.functional.attention import attention
from qkv.models.classifier import PaddedBiGRU
from qkv.models.copy import copy_mixture

__all__ = [
    "POINTER_PRESETS",
    "PointerDecoderState",
    "PointerEncoding",
    "PointerGenerator",
    "PointerGeneratorConfig",
    "PointerOutput",
]

PAD_ID, UNK_ID = 0, 3  # qkv.data's ids; repeated so that models do not import the data layer


@dataclass(frozen=True)
class PointerGeneratorConfig:
    """Hyperparameters of a :class:`PointerGenerator`.

    Attributes:
        vocab_size: ``V``, the fixed vocabulary (ids ``0 .. V - 1``, ``0`` padding, ``3``
            unknown).
        embed_dim: ``M``.
        hidden_dim: ``H``.
        dropout: on embeddings and before the output layer.
        coverage: use the coverage mechanism (scores and loss).
        kind: ``"pointer"``.
    """

    vocab_size: int
    embed_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.1
    coverage: bool = False
    kind: str = "pointer"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.vocab_size <= UNK_ID:
            raise ValueError(f"vocab_size must exceed {UNK_ID}, got vocab_size={self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if not isinstance(self.coverage, bool):
            raise ValueError(f"coverage must be a bool, got coverage={self.coverage!r}")
        if self.kind != "pointer":
            raise ValueError(f"kind must be 'pointer', got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable fields (``kind`` included)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PointerGeneratorConfig:
        """Inverse of :meth:`to_dict`; an unknown key raises ``ValueError`` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown PointerGeneratorConfig keys {unknown}; known: {sorted(known)}"
            )
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, *, vocab_size: int, **overrides: Any) -> PointerGeneratorConfig:
        """A preset of :data:`POINTER_PRESETS` with the vocabulary size and overrides."""
        if name not in POINTER_PRESETS:
            known = ", ".join(POINTER_PRESETS)
            raise ValueError(f"unknown pointer-generator preset {name!r}; presets: {known}")
        return replace(POINTER_PRESETS[name], vocab_size=vocab_size, **overrides)


#: Named presets (``vocab_size`` is replaced by :meth:`PointerGeneratorConfig.from_name`).
POINTER_PRESETS: dict[str, PointerGeneratorConfig] = {
    "tiny": PointerGeneratorConfig(8, embed_dim=32, hidden_dim=64, dropout=0.0),
    "cpu": PointerGeneratorConfig(8, embed_dim=64, hidden_dim=128),  # minutes on a laptop CPU
    "small": PointerGeneratorConfig(8, embed_dim=128, hidden_dim=256),
    "see2017": PointerGeneratorConfig(8, embed_dim=128, hidden_dim=256, coverage=True),
}


@dataclass(frozen=True)
class PointerOutput:
    """What :meth:`PointerGenerator.forward` returns.

    Attributes:
        log_probs: ``(B, Nt, V + X)`` log of the final (mixed) distribution per step.
        attention: ``(B, Nt, Ns)`` copy attention (0 at source padding).
        p_gen: ``(B, Nt)`` probability of generating rather than copying.
        coverage_loss: ``(B, Nt)`` ``sum_i min(a_t,i, c_t,i)`` (zeros without coverage).
    """

    log_probs: Tensor
    attention: Tensor
    p_gen: Tensor
    coverage_loss: Tensor


@dataclass(frozen=True)
class PointerEncoding:
    """The encoder's output for a batch of sources.

    Attributes:
        memory: ``(B, Ns, 2H)`` encoder states (the attention values).
        keys: ``(B, Ns, H)`` ``W h_i``, projected once for every decoder step.
        mask: bool ``(B, Ns)``, True at real tokens.
        source_ext: ``(B, Ns)`` int64 source ids in the extended vocabulary.
        num_oov: ``X``.
        h0: ``(1, B, H)`` the decoder's start state.
    """

    memory: Tensor
    keys: Tensor
    mask: Tensor
    source_ext: Tensor
    num_oov: int
    h0: Tensor


@dataclass
class PointerDecoderState:
    """Between decoding steps: the GRU state ``hidden (1, B, H)`` and ``coverage (B, Ns)``."""

    encoding: PointerEncoding
    hidden: Tensor
    coverage: Tensor


class PointerGenerator(nn.Module):
    """A GRU pointer-generator (see the module docstring).

    Args:
        config: a :class:`PointerGeneratorConfig`.

    Raises:
        TypeError: ``config`` is not a :class:`PointerGeneratorConfig`.
    """

    def __init__(self, config: PointerGeneratorConfig) -> None:
        super().__init__()
        if not isinstance(config, PointerGeneratorConfig):
            raise TypeError(f"config must be a PointerGeneratorConfig, got {type(config).__name__}")
        self.config = c = config
        M, H = c.embed_dim, c.hidden_dim
        self.embed = nn.Embedding(c.vocab_size, M, padding_idx=PAD_ID)
        self.encoder = PaddedBiGRU(M, H)
        self.bridge = nn.Linear(2 * H, H)  # joined final states -> decoder start state
        self.decoder = nn.GRU(M, H, batch_first=True)
        self.key_proj = nn.Linear(2 * H, H, bias=False)  # Luong "general": s^T (W h)
        self.coverage_weight = nn.Parameter(torch.zeros(())) if c.coverage else None
        self.readout = nn.Linear(H + 2 * H, H)
        self.output = nn.Linear(H, c.vocab_size)
        self.switch = nn.Linear(2 * H + H + M, 1)  # p_gen from context, state and input
        self.drop = nn.Dropout(c.dropout)

    # -- encoder -----------------------------------------------------------------------------

    def encode(self, source: Tensor, source_ext: Tensor, num_oov: int) -> PointerEncoding:
        """Run the encoder.

        Args:
            source: ``(B, Ns)`` int64 ids in the fixed vocabulary (OOV words as ``<unk>``).
            source_ext: ``(B, Ns)`` int64 the same tokens in the extended vocabulary (OOV word
                ``j`` of an example as ``V + j``).
            num_oov: ``X``, at least the largest ``j + 1`` in the batch.

        Raises:
            ValueError: mismatched shapes, ids out of range.
        """
        self._check_source(source, source_ext, num_oov)
        mask = source != PAD_ID  # (B, Ns)
        memory, final = self.encoder(self.drop(self.embed(source)), mask)  # (B, Ns, 2H), (B, 2H)
        h0 = torch.tanh(self.bridge(final)).unsqueeze(0)  # (1, B, H)
        keys = self.key_proj(memory)  # (B, Ns, H)
        return PointerEncoding(memory, keys, mask, source_ext, num_oov, h0)

    def _check_source(self, source: Tensor, source_ext: Tensor, num_oov: int) -> None:
        if source.dim() != 2 or source.shape != source_ext.shape:
            raise ValueError(
                f"source {tuple(source.shape)} and source_ext {tuple(source_ext.shape)} must "
                "both be (B, Ns)"
            )
        if num_oov < 0:
            raise ValueError(f"num_oov must be >= 0, got {num_oov}")
        V = self.config.vocab_size
        if source.numel() and (int(source.max()) >= V or int(source.min()) < 0):
            raise ValueError(f"source ids must be in [0, {V}), got max {int(source.max())}")
        if source_ext.numel() and int(source_ext.max()) >= V + num_oov:
            raise ValueError(
                f"source_ext ids must be < vocab_size + num_oov = {V + num_oov}, "
                f"got {int(source_ext.max())}"
            )

    # -- decoder -----------------------------------------------------------------------------

    def forward(
        self, source: Tensor, source_ext: Tensor, num_oov: int, target_in: Tensor
    ) -> PointerOutput:
        """Teacher forcing.

        Args:
            source, source_ext, num_oov: as in :meth:`encode`.
            target_in: ``(B, Nt)`` int64 ``<bos> y1 .. y(n-1)`` in the fixed vocabulary.

        Returns:
            A :class:`PointerOutput`; ``log_probs[:, t]`` scores ``y(t+1)`` (extended ids).
        """
        encoding = self.encode(source, source_ext, num_oov)
        embedded = self.drop(self.embed(target_in))  # (B, Nt, M)
        states, _ = self.decoder(embedded, encoding.h0)  # (B, Nt, H)
        if self.coverage_weight is None:
            context, weights = self._attend(states, encoding, None)  # (B, Nt, 2H), (B, Nt, Ns)
            coverage_loss = states.new_zeros(states.shape[:2])  # (B, Nt)
        else:
            context, weights, coverage_loss = self._attend_with_coverage(states, encoding)
        log_probs, p_gen = self._mix(states, context, embedded, weights, encoding)
        return PointerOutput(log_probs, weights, p_gen, coverage_loss)

    def _attend(
        self, states: Tensor, encoding: PointerEncoding, coverage: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``states (B, Nt, H)`` attend over the source -> ``context (B, Nt, 2H)``,
        ``weights (B, Nt, Ns)``; ``coverage (B, Ns)`` adds ``w_c * coverage`` to the scores."""
        q = states.unsqueeze(1)  # (B, 1, Nt, H)
        k = encoding.keys.unsqueeze(1)  # (B, 1, Ns, H)
        v = encoding.memory.unsqueeze(1)  # (B, 1, Ns, 2H)
        bias = None
        if coverage is not None and self.coverage_weight is not None:
            bias = (self.coverage_weight * coverage)[:, None, None, :]  # (B, 1, 1, Ns)
        context, weights = attention(
            q, k, v, mask=encoding.mask[:, None, None, :], bias=bias, return_weights=True
        )  # (B, 1, Nt, 2H), (B, 1, Nt, Ns)
        return context.squeeze(1), weights.squeeze(1)

    def _attend_with_coverage(
        self, states: Tensor, encoding: PointerEncoding
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step by step: each step's coverage is the sum of the attention before it."""
        coverage = states.new_zeros(encoding.mask.shape, dtype=encoding.memory.dtype)  # (B, Ns)
        contexts, weights, losses = [], [], []
        for t in range(states.shape[1]):
            context, a = self._attend(states[:, t : t + 1], encoding, coverage)  # (B, 1, ...)
            losses.append(torch.minimum(a[:, 0], coverage).sum(dim=-1))  # (B,)
            coverage = coverage + a[:, 0]
            contexts.append(context)
            weights.append(a)
        return torch.cat(contexts, 1), torch.cat(weights, 1), torch.stack(losses, 1)

    def _mix(
        self,
        states: Tensor,
        context: Tensor,
        embedded: Tensor,
        weights: Tensor,
        encoding: PointerEncoding,
    ) -> tuple[Tensor, Tensor]:
        """The final distribution: ``log_probs (B, Nt, V + X)`` and ``p_gen (B, Nt)``."""
        hidden = torch.tanh(self.readout(torch.cat([states, context], dim=-1)))  # (B, Nt, H)
        vocab = torch.softmax(self.output(self.drop(hidden)).float(), dim=-1)  # (B, Nt, V)
        switch_in = torch.cat([context, states, embedded], dim=-1)  # (B, Nt, 2H + H + M)
        p_gen = torch.sigmoid(self.switch(switch_in).float()).squeeze(-1)  # (B, Nt)
        mixed = copy_mixture(vocab, p_gen, weights, encoding.source_ext, encoding.num_oov)
        return mixed, p_gen  # (B, Nt, V + X), (B, Nt)

    # -- incremental decoding ----------------------------------------------------------------

    def start_decoding(self, encoding: PointerEncoding) -> PointerDecoderState:
        """A fresh state for :meth:`decode_step`."""
        coverage = encoding.memory.new_zeros(encoding.mask.shape)  # (B, Ns)
        return PointerDecoderState(encoding, encoding.h0, coverage)

    def decode_step(self, state: PointerDecoderState, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Feed one token per row.

        Args:
            state: from :meth:`start_decoding`; updated in place.
            tokens: ``(B,)`` int64 previous tokens, extended ids allowed (an OOV copy is fed
                back as ``<unk>``, as in the paper).

        Returns:
            ``log_probs (B, V + X)`` and the attention ``(B, Ns)``.
        """
        fixed = torch.where(tokens >= self.config.vocab_size, UNK_ID, tokens)
        embedded = self.embed(fixed).unsqueeze(1)  # (B, 1, M)
        states, state.hidden = self.decoder(embedded, state.hidden)  # (B, 1, H)
        coverage = state.coverage if self.coverage_weight is not None else None
        context, weights = self._attend(states, state.encoding, coverage)  # (B, 1, ...)
        state.coverage = state.coverage + weights[:, 0]
        log_probs, _ = self._mix(states, context, embedded, weights, state.encoding)
        return log_probs[:, 0], weights[:, 0]
