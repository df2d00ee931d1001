r"""Copy attention for the encoder-decoder Transformer: :class:`CopyTransformer`.

A model trained on a few hundred sentence pairs cannot learn to *generate* every name, number
and product term of its test set, but it can learn to *copy* them: the pointer-generator of See
et al. (2017, "Get To The Point"), after CopyNet (Gu et al. 2016) and Gulcehre et al. (2016).
Every output step mixes the decoder's vocabulary distribution with a distribution over the
source positions, given by an attention over the encoder's states::

    P(w) = p_gen * P_vocab(w) + (1 - p_gen) * sum_{i : x_i = w} a_i

over an **extended vocabulary**: the target vocabulary ``V`` plus, per batch, the ``X`` source
tokens the target vocabulary lacks (a source-only token of a separate vocabulary, and every
``<unk>`` position, whose surface text the caller still has). So a token the target side has
never seen is still produced, by copying it. :func:`copy_mixture` is the mixture; the
summarization task's :class:`~qkv.models.pointer.PointerGenerator` uses the same function.

How the copy distribution is read off the Transformer: a dedicated single-head attention from
the decoder's final states over the encoder's final states (``a = softmax(q k^T / sqrt(E))``,
one :func:`qkv.attention` call with the source padding masked); its context vector, the
decoder state and the input embedding give ``p_gen = sigmoid(w^T [y; c; e] + b)``. A dedicated
head rather than an average of the cross-attention heads: those learn where to *read*, which is
not always the token to *copy*.

Source ids and target ids of one token differ when the vocabularies are separate; the buffer
``source_to_target (Vs,)`` maps each source id to the target id of the same token, or ``-1``
when the target vocabulary lacks it (:meth:`CopyTransformer.set_source_to_target`; it is saved
with the weights). With one shared vocabulary it is the identity.

Notation used for tensor shapes: ``B`` batch, ``Ns`` source length, ``Nt`` target length, ``E``
d_model, ``V`` target vocabulary, ``Vs`` source vocabulary, ``X`` the most extended (copy-only)
tokens of any source in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from qkv.functional.attention import attention
from qkv.models.base import EncoderOutput, check_step_tokens, stays_in_groups
from qkv.models.transformer import Seq2SeqTransformer, TransformerConfig, TransformerDecoderState

__all__ = [
    "CopyOutput",
    "CopyTransformer",
    "CopyTransformerConfig",
    "CopyTransformerState",
    "check_source_to_target",
    "copy_mixture",
    "count_extended",
    "default_source_to_target",
    "extended_source",
]

UNK_ID = 3  # qkv.data's <unk>; repeated so that models do not import the data layer
_TINY = 1e-12  # floor of a probability before its log: a copy-only token has P_vocab = 0


def copy_mixture(
    vocab_probs: Tensor, p_gen: Tensor, weights: Tensor, source_ext: Tensor, num_oov: int
) -> Tensor:
    """The pointer-generator's final distribution, as log probabilities.

    Args:
        vocab_probs: ``(B, Nt, V)`` the generator's distribution (float32).
        p_gen: ``(B, Nt)`` probability of generating rather than copying.
        weights: ``(B, Nt, Ns)`` copy attention (0 at padding).
        source_ext: ``(B, Ns)`` int64 source tokens in the extended vocabulary ``[0, V + X)``.
        num_oov: ``X``.

    Returns:
        ``(B, Nt, V + X)`` ``log(p_gen P_vocab + (1 - p_gen) sum_{i: x_i = w} a_i)``, floored
        at ``log(1e-12)``.
    """
    B, Nt, _ = vocab_probs.shape
    extra = vocab_probs.new_zeros(B, Nt, num_oov)  # (B, Nt, X)
    mixed = torch.cat([p_gen.unsqueeze(-1) * vocab_probs, extra], dim=-1)  # (B, Nt, V + X)
    copy = (1.0 - p_gen).unsqueeze(-1) * weights.float()  # (B, Nt, Ns)
    index = source_ext.unsqueeze(1).expand(B, Nt, -1)  # (B, Nt, Ns)
    return torch.log(mixed.scatter_add(2, index, copy).clamp_min(_TINY))


def extended_source(
    source: Tensor, source_to_target: Tensor, target_vocab_size: int, pad_id: int = 0
) -> tuple[Tensor, list[list[int]]]:
    """Source ids in the target's extended vocabulary, and where each extended token is.

    A source token whose id maps to a target id takes that id; the others take ``V + j`` for
    the ``j``-th distinct such token of their row (every ``<unk>`` position is its own token:
    two unknown words are not the same word). Padding maps to ``pad_id``.

    Args:
        source: ``(B, Ns)`` int64 source ids.
        source_to_target: ``(Vs,)`` int64 target id of each source id, or -1.
        target_vocab_size: ``V``.

    Returns:
        ``source_ext (B, Ns)`` int64, and per row the source position of each extended token
        (``positions[b][j]``: the first position of token ``V + j`` in row ``b``).
    """
    mapped = source_to_target[source]  # (B, Ns)
    oov = (mapped < 0) & (source != pad_id)  # (B, Ns)
    source_ext = mapped.clamp_min(0).masked_fill(source == pad_id, pad_id)
    positions: list[list[int]] = [[] for _ in range(source.shape[0])]
    if not bool(oov.any()):
        return source_ext, positions
    Ns = source.shape[1]
    # A key per token: the id, except <unk> whose key is its position (after all ids).
    keys = torch.where(
        source == UNK_ID, source_to_target.shape[0] + torch.arange(Ns, device=source.device), source
    )
    for b in torch.nonzero(oov.any(dim=1)).flatten().tolist():
        slot_of: dict[int, int] = {}
        cols = torch.nonzero(oov[b]).flatten().tolist()
        for i, key in zip(cols, keys[b, cols].tolist(), strict=True):
            if key not in slot_of:
                slot_of[key] = len(slot_of)
                positions[b].append(i)
            source_ext[b, i] = target_vocab_size + slot_of[key]
    return source_ext, positions


def default_source_to_target(src_vocab_size: int, tgt_vocab_size: int, *, shared: bool) -> Tensor:
    """The map a copy model starts with (until the task sets the real one): the identity for
    one shared vocabulary, else only ``<pad> <bos> <eos>``. ``<unk>`` never maps: an unknown
    source word is copied as its own text (an extended token), not as ``"<unk>"``."""
    if shared:
        mapping = torch.arange(src_vocab_size)
    else:
        mapping = torch.full((src_vocab_size,), -1, dtype=torch.long)
        specials = min(UNK_ID, src_vocab_size, tgt_vocab_size)
        mapping[:specials] = torch.arange(specials)
    if src_vocab_size > UNK_ID:
        mapping[UNK_ID] = -1
    return mapping


def check_source_to_target(mapping: object, src_vocab_size: int, tgt_vocab_size: int) -> None:
    """Raise ``ValueError`` unless ``mapping`` is ``(Vs,)`` int64 with values in ``[-1, V)``."""
    if (
        not isinstance(mapping, Tensor)
        or mapping.dtype != torch.int64
        or tuple(mapping.shape) != (src_vocab_size,)
    ):
        shape = tuple(mapping.shape) if isinstance(mapping, Tensor) else type(mapping).__name__
        raise ValueError(
            f"mapping must be an int64 tensor of shape ({src_vocab_size},); got {shape}"
        )
    if int(mapping.min()) < -1 or int(mapping.max()) >= tgt_vocab_size:
        raise ValueError(
            f"mapping values must be in [-1, {tgt_vocab_size}); got min "
            f"{int(mapping.min())}, max {int(mapping.max())}"
        )


def count_extended(source_ext: Tensor, vocab_size: int) -> int:
    """``X``: how many extended ids ``source_ext`` may hold (its largest minus ``V``, plus 1)."""
    return max(0, int(source_ext.max()) - vocab_size + 1) if source_ext.numel() else 0


@dataclass(frozen=True)
class CopyTransformerConfig(TransformerConfig):
    """A :class:`~qkv.models.TransformerConfig` for :class:`CopyTransformer` (same fields and
    presets; ``kind`` is ``"copy_transformer"``)."""

    kind: ClassVar[str] = "copy_transformer"


@dataclass(frozen=True)
class CopyOutput:
    """What :meth:`CopyTransformer.copy_forward` returns.

    Attributes:
        log_probs: ``(B, Nt, V + X)`` the final distribution per step.
        p_gen: ``(B, Nt)`` probability of generating (``1 - p_gen``: of copying).
        attention: ``(B, Nt, Ns)`` the copy attention.
        positions: per row, the source position of each extended token (see
            :func:`extended_source`).
    """

    log_probs: Tensor
    p_gen: Tensor
    attention: Tensor
    positions: list[list[int]]


class CopyTransformerState(TransformerDecoderState):
    """:class:`~qkv.models.TransformerDecoderState` plus what the copy step reads: the
    encoder states ``memory`` and their copy keys (each ``(B, Ns, E)``), ``source_ext
    (B, Ns)`` and ``num_oov``."""

    def __init__(
        self,
        base: TransformerDecoderState,
        memory: Tensor,
        keys: Tensor,
        source_ext: Tensor,
        num_oov: int,
    ) -> None:
        super().__init__(base.caches, base.memory_kv, base.source_mask, group_size=base.group_size)
        self.memory, self.keys, self.source_ext, self.num_oov = memory, keys, source_ext, num_oov

    def select(self, indices: Tensor) -> None:
        """Reorder rows in place; within-group (beam) reorders leave the per-source tensors
        where they are, as the base state does."""
        moves_memory = not (self.group_size > 1 and stays_in_groups(indices, self.group_size))
        super().select(indices)
        if moves_memory:
            self.memory = self.memory.index_select(0, indices)
            self.keys = self.keys.index_select(0, indices)
            self.source_ext = self.source_ext.index_select(0, indices)


class CopyTransformer(Seq2SeqTransformer):
    """:class:`~qkv.models.Seq2SeqTransformer` with copy attention (see the module docstring).

    Implements :class:`~qkv.models.base.Seq2SeqModel`, except that what it calls logits are
    **log probabilities over the extended vocabulary** ``(.., V + X)``: ``forward``,
    ``decode`` and ``decode_step`` return them (greedy decoding and beam search need no
    change; a log-softmax leaves them as they are). A generated id ``>= V`` is a copied
    source token; :meth:`extended_positions` says which. Train with the negative log
    likelihood of these, not a cross-entropy of logits.

    Args:
        config: a :class:`CopyTransformerConfig`.
    """

    source_to_target: Tensor

    def __init__(self, config: CopyTransformerConfig) -> None:
        if not isinstance(config, CopyTransformerConfig):
            raise TypeError(f"config must be a CopyTransformerConfig; got {type(config).__name__}")
        super().__init__(config)
        E = config.d_model
        self.copy_query = nn.Linear(E, E, bias=False)
        self.copy_key = nn.Linear(E, E, bias=False)
        self.switch = nn.Linear(3 * E, 1)  # p_gen from [state; copy context; input embedding]
        mapping = default_source_to_target(
            config.src_vocab_size, config.tgt_vocab_size, shared=config.tie_embeddings == "all"
        )
        self.register_buffer("source_to_target", mapping)

    def set_source_to_target(self, mapping: Tensor) -> None:
        """Set which target id each source id copies to (``-1``: none; see the module
        docstring).

        Raises:
            ValueError: ``mapping`` is not ``(Vs,)`` int64 with values in ``[-1, V)``.
        """
        check_source_to_target(mapping, self.config.src_vocab_size, self.config.tgt_vocab_size)
        with torch.no_grad():
            self.source_to_target.copy_(mapping)

    def extended_positions(self, source: Tensor) -> list[list[int]]:
        """Per row of ``source (B, Ns)``, the source position of each extended id ``V + j``."""
        return extended_source(source, self.source_to_target, self.config.tgt_vocab_size)[1]

    # --- teacher forcing -----------------------------------------------------------------------

    def encode(self, source: Tensor) -> EncoderOutput:
        """As the Transformer's, plus ``extras``: ``source_ext (B, Ns)`` and the copy keys
        ``(B, Ns, E)``."""
        encoded = super().encode(source)
        source_ext, _ = extended_source(source, self.source_to_target, self.config.tgt_vocab_size)
        keys = self.copy_key(encoded.memory)  # (B, Ns, E)
        return EncoderOutput(
            encoded.memory, encoded.source_mask, {"source_ext": source_ext, "copy_keys": keys}
        )

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """Teacher forcing: ``source (B, Ns)``, ``target_in (B, Nt)`` -> log probabilities
        ``(B, Nt, V + X)``."""
        return self.decode(self.encode(source), target_in)

    def decode(self, encoded: EncoderOutput, target_in: Tensor) -> Tensor:
        """Log probabilities ``(B, Nt, V + X)`` over a whole prefix."""
        return self._copy_decode(encoded, target_in)[0]

    def copy_forward(self, source: Tensor, target_in: Tensor) -> CopyOutput:
        """Teacher forcing with the copy switch and attention (for training analyses and
        pictures of which tokens were copied)."""
        encoded = self.encode(source)
        log_probs, p_gen, weights = self._copy_decode(encoded, target_in)
        return CopyOutput(log_probs, p_gen, weights, self.extended_positions(source))

    def _copy_decode(
        self, encoded: EncoderOutput, target_in: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, _ = self._decode(encoded, target_in, need_weights=False)  # (B, Nt, E)
        embedded = self.tgt_embed(target_in)  # (B, Nt, E)
        return self._mix(
            y,
            embedded,
            encoded.memory,
            encoded.extras["copy_keys"],
            encoded.source_mask,
            encoded.extras["source_ext"],
        )

    def _mix(
        self,
        y: Tensor,
        embedded: Tensor,
        memory: Tensor,
        keys: Tensor,
        source_mask: Tensor,
        source_ext: Tensor,
        num_oov: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``log_probs (B, Nt, V + X)``, ``p_gen (B, Nt)`` and the copy attention
        ``(B, Nt, Ns)`` from decoder states ``y (B, Nt, E)``."""
        if num_oov is None:
            num_oov = count_extended(source_ext, self.config.tgt_vocab_size)
        q = self.copy_query(y).unsqueeze(1)  # (B, 1, Nt, E)
        context, weights = attention(
            q,
            keys.unsqueeze(1),  # (B, 1, Ns, E)
            memory.unsqueeze(1),  # (B, 1, Ns, E)
            mask=source_mask[:, None, None, :],
            return_weights=True,
        )  # (B, 1, Nt, E), (B, 1, Nt, Ns)
        context, weights = context.squeeze(1), weights.squeeze(1)
        switch_in = torch.cat([y, context, embedded], dim=-1)  # (B, Nt, 3E)
        p_gen = torch.sigmoid(self.switch(switch_in).float()).squeeze(-1)  # (B, Nt)
        vocab = torch.softmax(self.output(y).float(), dim=-1)  # (B, Nt, V)
        return copy_mixture(vocab, p_gen, weights, source_ext, num_oov), p_gen, weights

    # --- incremental decoding ------------------------------------------------------------------

    def start_decoding(
        self, encoded: EncoderOutput, *, beam_size: int = 1, max_len: int
    ) -> CopyTransformerState:
        base = super().start_decoding(encoded, beam_size=beam_size, max_len=max_len)
        num_oov = count_extended(encoded.extras["source_ext"], self.config.tgt_vocab_size)
        rows = encoded.repeat_rows(beam_size)
        return CopyTransformerState(
            base,
            rows.memory,
            rows.extras["copy_keys"],
            rows.extras["source_ext"],
            num_oov,
        )

    def decode_step(self, state: TransformerDecoderState, tokens: Tensor) -> Tensor:
        """``tokens (B,)`` (extended ids allowed: a copied token is fed back as ``<unk>``, as
        in the pointer-generator) -> log probabilities ``(B, V + X)``."""
        if not isinstance(state, CopyTransformerState):
            raise TypeError(
                f"state must come from CopyTransformer.start_decoding; got {type(state).__name__}"
            )
        tokens = check_step_tokens(tokens, state.batch_size)  # (B, 1)
        fixed = torch.where(tokens >= self.config.tgt_vocab_size, UNK_ID, tokens)  # (B, 1)
        y = self._step_states(state, fixed)  # (B, 1, E)
        log_probs, _, _ = self._mix(
            y,
            self.tgt_embed(fixed),
            state.memory,
            state.keys,
            state.source_mask,
            state.source_ext,
            state.num_oov,
        )
        return log_probs.squeeze(1)  # (B, V + X)
