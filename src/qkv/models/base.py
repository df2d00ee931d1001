r"""The interface every sequence-to-sequence model in :mod:`qkv.models` offers.

Training, decoding, checkpoints and visualisation talk to a model only through
:class:`Seq2SeqModel`, so a Transformer and an RNN are interchangeable everywhere.

Notation used for tensor shapes: ``B`` batch (sources, or sources x beams while decoding),
``Ns`` source length, ``Nt`` target length, ``E`` the encoder's output size, ``V`` the target
vocabulary size.

Token ids follow :mod:`qkv.data`: ``<pad> = 0``, ``<bos> = 1``, ``<eos> = 2``; every id tensor is
``int64`` and right-padded with 0. A target ``<bos> y1 .. yn <eos>`` is split by the caller into
``target_in = <bos> y1 .. yn`` (what the decoder reads) and ``target_out = y1 .. yn <eos>`` (what
it must predict), so ``logits[:, t]`` scores ``target_out[:, t]``.

Three ways to run a model::

    logits = model(source, target_in)                       # teacher forcing, (B, Nt, V)

    encoded = model.encode(source)                          # incremental decoding
    state = model.start_decoding(encoded, beam_size=4, max_len=50)
    logits = model.decode_step(state, tokens)               # tokens (B * 4,) -> (B * 4, V)
    state.select(parents)                                   # beam search: reorder the rows

    weights = model.cross_attention(source[:1], target_in[:1])   # (Nt, Ns) for a heat map

``decode_step`` keeps whatever the model needs between steps in ``state`` (a KV cache per layer
for the Transformer, the recurrent hidden state for an RNN), so one step costs one token's work,
and its logits equal those of ``model.decode(encoded, prefix)[:, -1]`` up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "DecoderState",
    "EncoderOutput",
    "ModelConfig",
    "Seq2SeqModel",
    "check_positive_int",
    "check_probability",
    "check_step_tokens",
    "check_token_ids",
    "stays_in_groups",
]

# The ids qkv.data reserves; repeated here so that models do not import the data layer.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class EncoderOutput:
    """What the encoder hands to the decoder.

    Attributes:
        memory: ``(B, Ns, E)`` the encoder's states, one per source position.
        source_mask: bool ``(B, Ns)``, True at real tokens, False at padding.
        extras: model-specific tensors, every one batch-first ``(B, ...)`` (the RNN keeps its
            final encoder state and its projected attention keys here), so that
            :meth:`select` can reorder them without knowing what they are.
    """

    memory: Tensor
    source_mask: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.memory.shape[0])

    def select(self, indices: Tensor) -> EncoderOutput:
        """The rows ``indices (B',)`` (int64) of every tensor, as a new ``EncoderOutput``."""
        return EncoderOutput(
            self.memory.index_select(0, indices),
            self.source_mask.index_select(0, indices),
            {name: t.index_select(0, indices) for name, t in self.extras.items()},
        )

    def repeat_rows(self, times: int) -> EncoderOutput:
        """Each row repeated ``times`` times in a row: row ``b * times + k`` is source ``b``
        (the layout beam search uses)."""
        check_positive_int("beam_size", times)
        if times == 1:
            return self
        rows = torch.arange(self.batch_size, device=self.memory.device)
        return self.select(rows.repeat_interleave(times))


@runtime_checkable
class DecoderState(Protocol):
    """The decoder's memory between :meth:`Seq2SeqModel.decode_step` calls, one row per
    hypothesis (``B`` rows)."""

    @property
    def batch_size(self) -> int:
        """``B``, the rows being decoded."""
        ...

    @property
    def length(self) -> int:
        """Tokens fed so far (the position of the next one)."""
        ...

    def select(self, indices: Tensor) -> None:
        """Reorder the rows in place: row ``i`` becomes old row ``indices[i]``.

        ``indices`` is an int64 ``(B,)`` tensor on the state's device; rows may repeat (beam
        search copies a good hypothesis into several beams) and the batch size stays ``B``.
        """
        ...


class ModelConfig(Protocol):
    """A model's frozen, validated hyperparameters; ``to_dict()`` is JSON-serializable and
    carries a ``"kind"`` key that :func:`qkv.models.build_model` dispatches on."""

    kind: str
    src_vocab_size: int
    tgt_vocab_size: int

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Seq2SeqModel(Protocol):
    """An encoder-decoder over token ids (implemented by
    :class:`~qkv.models.Seq2SeqTransformer` and :class:`~qkv.models.RNNSeq2Seq`).

    Every method takes and returns tensors on the model's device; the ``int64`` id tensors are
    right-padded with ``PAD_ID = 0``, which is masked out on both sides.
    """

    config: Any  # a ModelConfig; typed Any so that dataclass configs satisfy the protocol

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """Teacher forcing: ``source (B, Ns)``, ``target_in (B, Nt)`` int64 ->
        ``logits (B, Nt, V)``; position ``t`` sees ``target_in[:, : t + 1]`` only (causal)."""
        ...

    def encode(self, source: Tensor) -> EncoderOutput:
        """Run the encoder once: ``source (B, Ns)`` int64 -> :class:`EncoderOutput`."""
        ...

    def decode(self, encoded: EncoderOutput, target_in: Tensor) -> Tensor:
        """The decoder over a whole prefix, no cache: ``target_in (B, Nt)`` ->
        ``logits (B, Nt, V)``. ``forward(s, t) == decode(encode(s), t)``."""
        ...

    def start_decoding(
        self, encoded: EncoderOutput, *, beam_size: int = 1, max_len: int
    ) -> DecoderState:
        """A fresh decoder state for incremental decoding.

        Args:
            encoded: from :meth:`encode`, ``B`` sources.
            beam_size: ``K``; each source is repeated ``K`` times, row ``b * K + k``.
            max_len: the most tokens that will be fed (a Transformer sizes its KV cache by it).
        """
        ...

    def decode_step(self, state: DecoderState, tokens: Tensor) -> Tensor:
        """Feed one token per row: ``tokens (B,)`` int64 -> ``logits (B, V)``; ``state`` is
        updated in place. Call under ``torch.no_grad()``."""
        ...

    def cross_attention(
        self,
        source: Tensor,
        target_in: Tensor,
        *,
        layer: int | None = -1,
        per_head: bool = False,
    ) -> Tensor:
        """Decoder-to-source attention weights of one sentence, for a heat map.

        Args:
            source: ``(1, Ns)`` int64.
            target_in: ``(1, Nt)`` int64, ``<bos> y1 .. y(n-1)`` (or through ``yn``): row ``t``
                of the result is the attention used to predict ``y(t+1)``.
            layer: which decoder layer (negative counts from the end), or None for all.
            per_head: keep the heads apart instead of averaging them.

        Returns:
            ``(Nt, Ns)`` by default; ``(H, Nt, Ns)`` with ``per_head``; with ``layer=None`` a
            leading ``(L, ...)`` dim. Rows sum to 1 over the real source tokens.
        """
        ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...


def stays_in_groups(indices: Tensor, group_size: int) -> bool:
    """Whether row ``i`` of a reorder takes an old row of its own group of ``group_size``
    (``indices[i] // group_size == i // group_size``), as every beam search reorder does.

    Rows of one group were repeated from one source (:meth:`EncoderOutput.repeat_rows`), so
    per-source tensors such as the encoder memory need no reordering then.
    """
    rows = torch.arange(indices.shape[0], device=indices.device)
    return bool(torch.equal(indices // group_size, rows // group_size))


# --- validation helpers shared by the configs and the models -------------------------------------


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
    return value


def check_probability(name: str, value: object) -> float:
    """``value`` as a float if it is a number in ``[0, 1)``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {name}={value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {name}={value!r}")
    return str(value)


def check_token_ids(name: str, ids: object, vocab_size: int) -> Tensor:
    """A ``(B, N)`` int64 tensor of ids in ``[0, vocab_size)``, with ``N >= 1``, or an error
    naming ``name`` and the offending shape, dtype or value."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids; got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 token ids; got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, N) with N >= 1; got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} holds ids outside [0, {vocab_size}): min {int(ids.min())}, "
            f"max {int(ids.max())}"
        )
    return ids


def check_step_tokens(tokens: object, batch_size: int) -> Tensor:
    """One decoding step's ``tokens (B,)`` int64 as ``(B, 1)``, or an error naming them.

    Unlike :func:`check_token_ids` this does not read the values: on a GPU that would wait for
    the device at every step, and the decoders only feed ids they took from the logits.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids; got {type(tokens).__name__}")
    if tokens.dtype != torch.int64:
        raise TypeError(f"tokens must be int64 token ids; got dtype {tokens.dtype}")
    if tuple(tokens.shape) != (batch_size,):
        raise ValueError(
            f"tokens must have shape (B,) = ({batch_size},), one per decoder row; "
            f"got {tuple(tokens.shape)}"
        )
    return tokens.unsqueeze(-1)  # (B, 1)


def config_from_dict(cls: Any, data: Mapping[str, Any]) -> Any:
    """Build the dataclass ``cls`` from ``data`` (as written by ``to_dict``), checking the
    ``"kind"`` key and refusing unknown fields by name."""
    values = dict(data)
    kind = values.pop("kind", cls.kind)
    if kind != cls.kind:
        raise ValueError(f"{cls.__name__} needs kind={cls.kind!r}; got kind={kind!r}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**values)
