r"""RNN encoder-decoders: with Bahdanau or Luong attention, or with none (the classic baseline).

The encoder is a bidirectional GRU or LSTM over the padded source (packed, so padding never
reaches a real token's state); its final forward and backward states, joined and passed through
``tanh(Linear)``, start the decoder. What links the decoder to the source then differs:

- ``attention="none"``: nothing else, as in Sutskever et al. "Sequence to Sequence Learning with
  Neural Networks" (2014): the whole source must fit in that one state. With ``input_feeding``
  the joined final encoder state is also fed at every step, as in Cho et al. (2014).
- ``attention="bahdanau"``: Bahdanau et al. "Neural Machine Translation by Jointly Learning to
  Align and Translate" (ICLR 2015): the previous decoder state attends over the encoder states
  with the additive score, and the context is fed into the recurrent cell with the token.
- ``attention="luong"``: Luong et al. "Effective Approaches to Attention-based Neural Machine
  Translation" (EMNLP 2015): the new decoder state attends (``dot``, ``general`` or ``concat``)
  and ``h~ = tanh(W_c [context; state])`` predicts the token; ``input_feeding`` feeds ``h~``
  into the next step (their Section 3.3).

Every attention goes through :mod:`qkv.nn` (``AdditiveAttention``, ``LuongAttention``).

Notation used for tensor shapes: ``B`` batch, ``Ns`` source length, ``Nt`` target length, ``M``
embed_dim, ``H`` hidden_dim (the encoder has ``H`` per direction, so its states are ``2H``),
``L`` num_layers, ``V`` target vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from qkv.models.base import (
    EncoderOutput,
    check_choice,
    check_positive_int,
    check_probability,
    check_step_tokens,
    check_token_ids,
    config_from_dict,
    stays_in_groups,
)
from qkv.nn import AdditiveAttention, LuongAttention

__all__ = ["RNNConfig", "RNNDecoderState", "RNNSeq2Seq"]

Cell = Literal["gru", "lstm"]
AttentionKind = Literal["bahdanau", "luong", "none"]
LuongScore = Literal["dot", "general", "concat"]
Hidden = Tensor | tuple[Tensor, Tensor]  # GRU h, or LSTM (h, c); each (L, B, H)


@dataclass(frozen=True)
class RNNConfig:
    """Hyperparameters of :class:`RNNSeq2Seq`, validated on construction.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (``V`` is the target's).
        embed_dim: ``M``, token embedding size (source and target).
        hidden_dim: ``H``, the decoder's state size and the encoder's per direction.
        cell: ``"gru"`` or ``"lstm"``.
        attention: ``"bahdanau"``, ``"luong"`` or ``"none"``.
        luong_score: ``"dot"``, ``"general"`` or ``"concat"`` (used with ``attention="luong"``).
        num_layers: ``L``, stacked layers in the encoder and in the decoder.
        dropout: on embeddings, between stacked layers and before the output, in ``[0, 1)``.
        input_feeding: Luong: feed ``h~`` into the next step; none: feed the final encoder
            state at every step. Bahdanau always feeds its context, so it must stay False.
        pad_id: the padding id.

    Use :meth:`from_name` for the presets ``tiny``, ``small`` and ``base``.
    """

    kind: ClassVar[str] = "rnn"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"embed_dim": 32, "hidden_dim": 64, "num_layers": 1},
        "small": {"embed_dim": 128, "hidden_dim": 256, "num_layers": 1},
        "base": {"embed_dim": 256, "hidden_dim": 512, "num_layers": 2},
    }

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 32
    hidden_dim: int = 64
    cell: Cell = "gru"
    attention: AttentionKind = "bahdanau"
    luong_score: LuongScore = "general"
    num_layers: int = 1
    dropout: float = 0.1
    input_feeding: bool = False
    pad_id: int = 0

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden_dim", "num_layers"):
            check_positive_int(name, getattr(self, name))
        check_choice("cell", self.cell, ("gru", "lstm"))
        check_choice("attention", self.attention, ("bahdanau", "luong", "none"))
        check_choice("luong_score", self.luong_score, ("dot", "general", "concat"))
        check_probability("dropout", self.dropout)
        if not isinstance(self.input_feeding, bool):
            raise ValueError(
                f"input_feeding must be a bool; got input_feeding={self.input_feeding!r}"
            )
        if self.input_feeding and self.attention == "bahdanau":
            raise ValueError(
                'input_feeding=True is for attention="luong" or "none"; '
                'attention="bahdanau" always feeds its context'
            )
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"pad_id must be an int >= 0; got pad_id={self.pad_id!r}")

    @property
    def feed_dim(self) -> int:
        """Size of what the decoder cell reads besides the token embedding."""
        if self.attention == "bahdanau":
            return 2 * self.hidden_dim  # the context
        if not self.input_feeding:
            return 0
        return self.hidden_dim if self.attention == "luong" else 2 * self.hidden_dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> RNNConfig:
        """A preset (``tiny``, ``small``, ``base``) with ``overrides``, which must include the
        vocabulary sizes, e.g. ``from_name("tiny", src_vocab_size=80, tgt_vocab_size=40,
        attention="luong")``."""
        if name not in cls.presets:
            raise ValueError(f"unknown preset name={name!r}; choose from {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RNNConfig:
        """The inverse of :meth:`to_dict`."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``"kind": "rnn"``."""
        return {"kind": self.kind, **asdict(self)}

    def replace(self, **changes: Any) -> RNNConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)


class RNNDecoderState:
    """The recurrent state between steps.

    Attributes:
        hidden: ``(L, B, H)``, or ``(h, c)`` for an LSTM.
        feed: ``(B, F)`` what the next step reads besides its token (Luong's ``h~``, the
            encoder summary), or None.
        encoded: the encoder output, one row per decoder row.
        group_size: rows per source (the beam size) while every reorder stays within a
            source's rows, which then share the encoder output and need not move it.
    """

    def __init__(
        self,
        hidden: Hidden,
        feed: Tensor | None,
        encoded: EncoderOutput,
        *,
        group_size: int = 1,
    ) -> None:
        self.hidden = hidden
        self.feed = feed
        self.encoded = encoded
        self.group_size = group_size
        self.steps = 0

    @property
    def batch_size(self) -> int:
        return self.encoded.batch_size

    @property
    def length(self) -> int:
        return self.steps

    def select(self, indices: Tensor) -> None:
        """Reorder rows in place (see :class:`~qkv.models.base.DecoderState`)."""
        if isinstance(self.hidden, tuple):
            h, c = self.hidden
            self.hidden = (h.index_select(1, indices), c.index_select(1, indices))
        else:
            self.hidden = self.hidden.index_select(1, indices)
        if self.feed is not None:
            self.feed = self.feed.index_select(0, indices)
        if self.group_size > 1 and stays_in_groups(indices, self.group_size):
            return  # a beam search reorder: each source's rows share one encoder output
        self.group_size = 1
        self.encoded = self.encoded.select(indices)


def _attention_dtype(query: Tensor) -> torch.dtype:
    """The one dtype to hand the attention layer. Under autocast the recurrent and the linear
    layers return different half dtypes (cuDNN RNNs run in float16 even in a bfloat16 region)
    and a Luong ``general`` score's matmul re-casts the query to the autocast dtype, so every
    input goes to that dtype; outside autocast, the query's."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return query.dtype


class RNNSeq2Seq(nn.Module):
    """RNN encoder-decoder implementing :class:`~qkv.models.base.Seq2SeqModel`.

    Args:
        config: an :class:`RNNConfig`.

    Example::

        config = RNNConfig.from_name("tiny", src_vocab_size=60, tgt_vocab_size=40,
                                     attention="luong", luong_score="dot")
        logits = RNNSeq2Seq(config)(source, target_in)        # (B, Nt, 40)
    """

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        if not isinstance(config, RNNConfig):
            raise TypeError(f"config must be an RNNConfig; got {type(config).__name__}")
        self.config = c = config
        M, H, L = c.embed_dim, c.hidden_dim, c.num_layers
        rnn_cls = nn.GRU if c.cell == "gru" else nn.LSTM
        between = c.dropout if L > 1 else 0.0
        self.src_embed = nn.Embedding(c.src_vocab_size, M, padding_idx=c.pad_id)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, M, padding_idx=c.pad_id)
        self.encoder = rnn_cls(M, H, L, batch_first=True, bidirectional=True, dropout=between)
        # Joined final forward/backward states -> the decoder's initial state (h, and c).
        self.bridge = nn.Linear(2 * H, H)
        self.bridge_cell = nn.Linear(2 * H, H) if c.cell == "lstm" else None
        self.decoder = rnn_cls(M + c.feed_dim, H, L, batch_first=True, dropout=between)
        self.attention: AdditiveAttention | LuongAttention | None = None
        self.key_proj: nn.Linear | None = None
        if c.attention == "bahdanau":
            self.attention = AdditiveAttention(query_dim=H, key_dim=2 * H, hidden_dim=H)
        elif c.attention == "luong":
            # Keys in the decoder's size, so that every Luong score (dot included) applies;
            # the values stay the 2H encoder states.
            self.key_proj = nn.Linear(2 * H, H, bias=False)
            self.attention = LuongAttention(H, H, score=c.luong_score)
        context_dim = 0 if c.attention == "none" else 2 * H
        self.readout = nn.Linear(H + context_dim, H)
        self.drop = nn.Dropout(c.dropout)
        self.output = nn.Linear(H, c.tgt_vocab_size)

    # --- the Seq2SeqModel interface ------------------------------------------------------------

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """Teacher forcing: ``source (B, Ns)``, ``target_in (B, Nt)`` int64 ->
        ``logits (B, Nt, V)``."""
        return self.decode(self.encode(source), target_in)

    def encode(self, source: Tensor) -> EncoderOutput:
        """``source (B, Ns)`` -> memory ``(B, Ns, 2H)``, its mask, and in ``extras`` the
        decoder's start state ``h0`` (and ``c0``) ``(B, L, H)``, the Luong keys ``(B, Ns, H)``
        and the joined final state ``summary (B, 2H)``."""
        c = self.config
        source = check_token_ids("source", source, c.src_vocab_size)
        source_mask = source != c.pad_id  # (B, Ns)
        # An all-padding row is read as one pad token rather than crashing the packing.
        lengths = source_mask.sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(
            self.drop(self.src_embed(source)), lengths, batch_first=True, enforce_sorted=False
        )
        out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=source.shape[1])
        extras = self._start_state(final)
        if self.key_proj is not None:
            extras["keys"] = self.key_proj(memory)  # (B, Ns, H)
        return EncoderOutput(memory, source_mask, extras)  # memory (B, Ns, 2H)

    def decode(self, encoded: EncoderOutput, target_in: Tensor) -> Tensor:
        """The decoder over a whole prefix: ``target_in (B, Nt)`` -> ``logits (B, Nt, V)``."""
        readout, _ = self._decode(encoded, target_in, need_weights=False)
        return self.output(self.drop(readout))  # (B, Nt, V)

    def start_decoding(
        self, encoded: EncoderOutput, *, beam_size: int = 1, max_len: int
    ) -> RNNDecoderState:
        """The decoder's start state with each source repeated ``beam_size`` times (row
        ``b * beam_size + k``); ``max_len`` is checked but an RNN needs no buffer for it."""
        check_positive_int("max_len", max_len)
        encoded = encoded.repeat_rows(beam_size)
        return RNNDecoderState(
            self._initial_hidden(encoded),
            self._initial_feed(encoded),
            encoded,
            group_size=beam_size,
        )

    def decode_step(self, state: RNNDecoderState, tokens: Tensor) -> Tensor:
        """``tokens (B,)`` int64 -> ``logits (B, V)``; advances ``state``."""
        tokens = check_step_tokens(tokens, state.batch_size)  # (B, 1)
        readout, _ = self._step(state, self.drop(self.tgt_embed(tokens[:, 0])), need_weights=False)
        state.steps += 1
        return self.output(self.drop(readout))  # (B, V)

    def cross_attention(
        self,
        source: Tensor,
        target_in: Tensor,
        *,
        layer: int | None = -1,
        per_head: bool = False,
    ) -> Tensor:
        """Decoder-to-source attention weights of one sentence pair: ``(Nt, Ns)``; with
        ``per_head`` ``(1, Nt, Ns)`` (one head); with ``layer=None`` a leading ``(1, ...)``
        (one attention layer). ``layer`` may be 0 or -1.

        Raises:
            ValueError: for a model with ``attention="none"``, which has no weights to show.
        """
        if self.attention is None:
            raise ValueError('this model has attention="none": it has no attention weights')
        if layer is not None and (isinstance(layer, bool) or layer not in (0, -1)):
            raise ValueError(f"layer must be 0, -1 or None for an RNN; got layer={layer!r}")
        for name, ids in (("source", source), ("target_in", target_in)):
            if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[0] != 1:
                raise ValueError(f"{name} must have shape (1, N); got {tuple(ids.shape)}")
        with torch.no_grad():
            _, weights = self._decode(self.encode(source), target_in, need_weights=True)
        if weights is None:  # unreachable: asked for, and the model has attention
            raise RuntimeError("the decoder returned no attention weights")
        result = weights[0]  # (Nt, Ns)
        if per_head:
            result = result.unsqueeze(0)  # (1, Nt, Ns)
        return result if layer is not None else result.unsqueeze(0)

    # --- pieces ----------------------------------------------------------------------------------

    def _start_state(self, final: Hidden) -> dict[str, Tensor]:
        """The encoder's final ``(2L, B, H)`` states -> ``h0`` (and ``c0``) ``(B, L, H)`` and
        the top layer's joined ``summary (B, 2H)``."""
        h = final[0] if isinstance(final, tuple) else final
        joined = self._join_directions(h)  # (L, B, 2H)
        extras = {
            "h0": torch.tanh(self.bridge(joined)).transpose(0, 1),  # (B, L, H)
            "summary": joined[-1],  # (B, 2H)
        }
        if isinstance(final, tuple) and self.bridge_cell is not None:
            extras["c0"] = self.bridge_cell(self._join_directions(final[1])).transpose(0, 1)
        return extras

    @staticmethod
    def _join_directions(h: Tensor) -> Tensor:
        """``(2L, B, H)`` (layer-major, forward then backward) -> ``(L, B, 2H)``."""
        L2, B, H = h.shape
        return h.view(L2 // 2, 2, B, H).transpose(1, 2).reshape(L2 // 2, B, 2 * H)

    def _initial_hidden(self, encoded: EncoderOutput) -> Hidden:
        h0 = encoded.extras["h0"].transpose(0, 1).contiguous()  # (L, B, H)
        if self.config.cell == "lstm":
            return h0, encoded.extras["c0"].transpose(0, 1).contiguous()
        return h0

    def _initial_feed(self, encoded: EncoderOutput) -> Tensor | None:
        c = self.config
        if c.attention == "none" and c.input_feeding:
            return encoded.extras["summary"]  # (B, 2H), the same at every step
        if c.attention == "luong" and c.input_feeding:
            return encoded.memory.new_zeros(encoded.batch_size, c.hidden_dim)  # h~ before step 1
        return None

    def _attend(
        self, query: Tensor, encoded: EncoderOutput, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``query (B, H)`` or ``(B, Nt, H)`` -> context ``(B, [Nt,] 2H)`` and weights
        ``(B, [Nt,] Ns)`` or None."""
        if self.attention is None:
            raise ValueError('this model has attention="none": there is nothing to attend with')
        keys = encoded.extras.get("keys", encoded.memory)
        dtype = _attention_dtype(query)
        return self.attention(
            query.to(dtype),
            keys.to(dtype),
            encoded.memory.to(dtype),
            encoded.source_mask,
            need_weights=need_weights,
        )

    def _step(
        self, state: RNNDecoderState, embedded: Tensor, *, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """One decoder step: ``embedded (B, M)`` -> ``readout (B, H)`` and attention weights
        ``(B, Ns)`` (or None); updates ``state.hidden`` and ``state.feed``."""
        kind = self.config.attention
        weights: Tensor | None = None
        inputs = [embedded]
        if kind == "bahdanau":
            # Bahdanau: the previous state (top layer) attends before the cell runs.
            top = state.hidden[0][-1] if isinstance(state.hidden, tuple) else state.hidden[-1]
            context, weights = self._attend(top, state.encoded, need_weights)
            inputs.append(context)
        elif state.feed is not None:
            inputs.append(state.feed)
        out, state.hidden = self.decoder(torch.cat(inputs, dim=-1).unsqueeze(1), state.hidden)
        s = out[:, 0]  # (B, H)
        if kind == "bahdanau":
            readout = torch.tanh(self.readout(torch.cat([s, context], dim=-1)))
        elif kind == "luong":
            # Luong: the new state attends, then h~ = tanh(W_c [context; s]).
            context, weights = self._attend(s, state.encoded, need_weights)
            readout = torch.tanh(self.readout(torch.cat([s, context], dim=-1)))
            if self.config.input_feeding:
                state.feed = readout
        else:
            readout = torch.tanh(self.readout(s))
        return readout, weights

    def _decode(
        self, encoded: EncoderOutput, target_in: Tensor, *, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``readout (B, Nt, H)`` for every position and the weights ``(B, Nt, Ns)`` or None."""
        target_in = check_token_ids("target_in", target_in, self.config.tgt_vocab_size)
        if target_in.shape[0] != encoded.batch_size:
            raise ValueError(
                f"target_in has batch size {target_in.shape[0]} but the source has "
                f"{encoded.batch_size}; got target_in {tuple(target_in.shape)}"
            )
        embedded = self.drop(self.tgt_embed(target_in))  # (B, Nt, M)
        state = RNNDecoderState(self._initial_hidden(encoded), self._initial_feed(encoded), encoded)
        if self.config.attention == "bahdanau" or state.feed is not None:
            return self._decode_stepwise(state, embedded, need_weights)
        return self._decode_parallel(state, embedded, need_weights)

    def _decode_stepwise(
        self, state: RNNDecoderState, embedded: Tensor, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Step by step, for the decoders whose next input depends on the last step's output."""
        readouts, weights = [], []
        for t in range(embedded.shape[1]):
            readout, w = self._step(state, embedded[:, t], need_weights=need_weights)
            readouts.append(readout)
            if w is not None:
                weights.append(w)
        stacked = torch.stack(weights, dim=1) if weights else None  # (B, Nt, Ns)
        return torch.stack(readouts, dim=1), stacked  # (B, Nt, H)

    def _decode_parallel(
        self, state: RNNDecoderState, embedded: Tensor, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The whole sequence in one cell call, then attention for every position at once:
        the same result as stepping when nothing is fed back (no Bahdanau, no input feeding)."""
        states, _ = self.decoder(embedded, state.hidden)  # (B, Nt, H)
        if self.attention is None:
            return torch.tanh(self.readout(states)), None
        context, weights = self._attend(states, state.encoded, need_weights)  # (B, Nt, 2H)
        return torch.tanh(self.readout(torch.cat([states, context], dim=-1))), weights
