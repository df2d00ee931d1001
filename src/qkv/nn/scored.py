r"""The classic seq2seq attention layers: Bahdanau (additive), Luong (dot, general, concat) and
cosine attention, as thin modules over :mod:`qkv.functional.score_functions`.

Every module has the same interface, single-head, as in the papers::

    context, weights = layer(query, keys, values=None, mask=None, *, need_weights=True)

Notation used for tensor shapes: ``B`` batch, ``Nq`` queries (decoder steps), ``Nk`` keys
(encoder positions), ``Dq`` query dim, ``Dk`` key dim, ``Dv`` value dim, ``H`` hidden size.

- ``query``: ``(B, Nq, Dq)``, or ``(B, Dq)`` for a single decoder step.
- ``keys``: ``(B, Nk, Dk)``; ``values``: ``(B, Nk, Dv)``, the keys when omitted (as in the
  papers, where the encoder states serve as both).
- ``mask``: bool ``(B, Nk)`` (padding, shared by every query) or ``(B, Nq, Nk)``; True = attend.
- returns ``context (B, Nq, Dv)`` and ``weights (B, Nq, Nk)``, or ``(B, Dv)`` and ``(B, Nk)``
  for a single-step query. A query with nothing to attend to gets zeros in both, never NaN.
  ``need_weights=False`` returns None for the weights.

Scores that are a dot product after a change of ``q`` and ``k`` (Luong ``dot`` and ``general``,
cosine) go through :func:`qkv.attention`, so they run on any backend (a fused one such as SDPA
only with ``need_weights=False``, as it never forms the weights); additive scores (Bahdanau, Luong
``concat``) go through :func:`~qkv.functional.score_functions.additive_attention`, which works
over chunks of queries and never holds the whole ``(B, Nq, Nk, H)`` hidden tensor.

Example, one decoder step of Bahdanau attention over padded encoder states::

    layer = AdditiveAttention(query_dim=512, key_dim=1024, hidden_dim=512)
    context, weights = layer(decoder_state, encoder_states, mask=source_mask)
    # decoder_state (B, 512), encoder_states (B, Nk, 1024), source_mask (B, Nk) bool
    # -> context (B, 1024), weights (B, Nk)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.functional.attention import attention
from qkv.functional.score_functions import additive_attention

__all__ = ["AdditiveAttention", "CosineAttention", "LuongAttention", "LuongScore"]

LuongScore: TypeAlias = Literal["dot", "general", "concat"]


# --- shared input handling ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """Validated inputs in the 3-d form: query ``(B, Nq, Dq)``, keys ``(B, Nk, Dk)``, values
    ``(B, Nk, Dv)``, mask ``(B, 1 | Nq, Nk)`` or None; ``single_step`` if query came as 2-d."""

    query: Tensor
    keys: Tensor
    values: Tensor
    mask: Tensor | None
    single_step: bool

    def finish(self, context: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Drop the ``Nq = 1`` dim again for a single-step query."""
        if self.single_step:
            squeezed = None if weights is None else weights.squeeze(1)  # (B, Nk)
            return context.squeeze(1), squeezed  # (B, Dv), (B, Nk)
        return context, weights


def _check_tensor(name: str, t: object, shape_doc: str, ranks: tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.ndim not in ranks:
        raise ValueError(
            f"{name} must have shape {shape_doc}; got a {t.ndim}-d tensor of shape {tuple(t.shape)}"
        )
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    return t


def _prepare(
    query: Tensor,
    keys: Tensor,
    values: Tensor | None,
    mask: Tensor | None,
    query_dim: int,
    key_dim: int,
) -> _Batch:
    """Validate the forward arguments (naming the argument and its shape) and bring the query to
    ``(B, Nq, Dq)`` and the mask to ``(B, 1 | Nq, Nk)``."""
    query = _check_tensor("query", query, "(B, Nq, Dq) or (B, Dq)", (2, 3))
    keys = _check_tensor("keys", keys, "(B, Nk, Dk)", (3,))
    values = keys if values is None else _check_tensor("values", values, "(B, Nk, Dv)", (3,))
    # Shapes as the caller passed them, before a single-step query gains its Nq = 1 dim.
    shapes = f"query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
    if not (query.dtype == keys.dtype == values.dtype):
        raise TypeError(
            f"query, keys and values must share a dtype; got query {query.dtype}, "
            f"keys {keys.dtype}, values {values.dtype}"
        )
    if not (query.device == keys.device == values.device):
        raise ValueError(
            f"query, keys and values must be on one device; got query {query.device}, "
            f"keys {keys.device}, values {values.device}"
        )
    if not (query.shape[0] == keys.shape[0] == values.shape[0]):
        raise ValueError(
            f"query, keys and values must share the batch size B (dim 0); got {shapes}"
        )
    if query.shape[-1] != query_dim:
        raise ValueError(
            f"query's last dim ({query.shape[-1]}) must equal query_dim ({query_dim}); got {shapes}"
        )
    if keys.shape[-1] != key_dim:
        raise ValueError(
            f"keys' last dim ({keys.shape[-1]}) must equal key_dim ({key_dim}); got {shapes}"
        )
    if keys.shape[1] != values.shape[1]:
        raise ValueError(f"keys and values must have the same length Nk (dim 1); got {shapes}")
    single_step = query.ndim == 2
    if single_step:
        query = query.unsqueeze(1)  # (B, 1, Dq)
    if mask is not None:
        mask = _check_mask(mask, query, keys.shape[1])
    return _Batch(query, keys, values, mask, single_step)


def _check_mask(mask: Tensor, query: Tensor, Nk: int) -> Tensor:
    """A ``(B, Nk)`` or ``(B, Nq, Nk)`` bool mask as ``(B, 1 | Nq, Nk)``; ``query (B, Nq, Dq)``."""
    B, Nq = query.shape[0], query.shape[1]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = attend); got {kind}")
    if mask.device != query.device:
        raise ValueError(f"mask is on {mask.device} but query is on {query.device}")
    if tuple(mask.shape) == (B, Nk):
        return mask.unsqueeze(1)  # (B, 1, Nk): one padding mask for every query
    if tuple(mask.shape) == (B, Nq, Nk):
        return mask
    raise ValueError(
        f"mask must have shape (B, Nk) = ({B}, {Nk}) or (B, Nq, Nk) = ({B}, {Nq}, {Nk}); "
        f"got {tuple(mask.shape)}"
    )


def _dot_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, backend: str, need_weights: bool
) -> tuple[Tensor, Tensor | None]:
    """Unscaled ``softmax(q k^T) v`` through :func:`qkv.attention` with one head.

    ``q (B, Nq, D)``, ``k (B, Nk, D)``, ``v (B, Nk, Dv)``, mask ``(B, 1 | Nq, Nk)`` ->
    ``context (B, Nq, Dv)`` and ``weights (B, Nq, Nk)`` or None. Any scale is folded into ``q``
    beforehand. Without weights, fused backends (SDPA) can serve the call.
    """
    q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, N, D): one head
    mask4 = None if mask is None else mask.unsqueeze(1)  # (B, 1, 1 | Nq, Nk)
    if not need_weights:
        out = attention(q4, k4, v4, mask=mask4, scale=1.0, backend=backend)
        return out.squeeze(1), None  # (B, Nq, Dv)
    out, weights = attention(
        q4, k4, v4, mask=mask4, scale=1.0, return_weights=True, backend=backend
    )
    return out.squeeze(1), weights.squeeze(1)  # (B, Nq, Dv), (B, Nq, Nk)


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _linear_init(weight: Tensor, fan_in: int) -> None:
    """``nn.Linear``'s default: uniform in ``+-1 / sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


# --- modules --------------------------------------------------------------------------------------


class _ScoredAttention(nn.Module):
    """What the three layers share: input validation, the single-step query form and the
    ``need_weights`` switch. A subclass sets ``query_dim`` and ``key_dim`` and implements
    :meth:`_attend`, its score."""

    query_dim: int
    key_dim: int

    @overload
    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = ...,
        mask: Tensor | None = ...,
        *,
        need_weights: Literal[True] = ...,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = ...,
        mask: Tensor | None = ...,
        *,
        need_weights: Literal[False],
    ) -> tuple[Tensor, None]: ...

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        need_weights: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from each query over the keys and average the values by the weights.

        Args:
            query: ``(B, Nq, Dq)``, or ``(B, Dq)`` for a single decoder step.
            keys: ``(B, Nk, Dk)``.
            values: ``(B, Nk, Dv)``; the keys when None.
            mask: bool ``(B, Nk)`` (key padding, shared by every query) or ``(B, Nq, Nk)``,
                True = attend; or None.
            need_weights: return the weights. With False the second result is None and the
                dot-product scores may run on a fused backend that never forms them (SDPA).

        Returns:
            ``context (B, Nq, Dv)`` and ``weights (B, Nq, Nk)`` (or None), in the query's dtype;
            ``(B, Dv)`` and ``(B, Nk)`` for a ``(B, Dq)`` query. A query with nothing to attend
            to gets zeros in both, and zero gradients, never NaN.

        Raises:
            TypeError: for a non-tensor, a non-float input, mixed dtypes or a non-bool mask.
            ValueError: for a wrong rank, batch size, feature dim, ``Nk`` or mask shape, or
                mixed devices; the message names the argument and the shapes.
        """
        x = _prepare(query, keys, values, mask, self.query_dim, self.key_dim)
        context, weights = self._attend(x, need_weights)
        return x.finish(context, weights if need_weights else None)

    def _attend(self, x: _Batch, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """``context (B, Nq, Dv)`` and ``weights (B, Nq, Nk)``, or None if not needed."""
        raise NotImplementedError


class AdditiveAttention(_ScoredAttention):
    """Bahdanau attention: ``score(q, k) = v^T tanh(W_q q + W_k k + b)``.

    Bahdanau, Cho, Bengio. "Neural Machine Translation by Jointly Learning to Align and
    Translate". ICLR 2015. The query is the previous decoder state, the keys (and values) the
    encoder annotations.

    Memory: the ``(B, Nq, Nk, hidden_dim)`` hidden tensor is never held whole: it is computed
    over chunks of query rows under activation checkpointing (see
    :func:`~qkv.functional.score_functions.additive_attention`), so the peak extra memory is one
    chunk plus the ``(B, Nq, Nk)`` scores.

    Args:
        query_dim: ``Dq``.
        key_dim: ``Dk``.
        hidden_dim: ``H``, the size of the tanh layer.

    Attributes:
        w_q: ``(H, Dq)``; w_k: ``(H, Dk)``; bias: ``(H,)``; v: ``(H,)``.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.query_dim = _check_dim("query_dim", query_dim)
        self.key_dim = _check_dim("key_dim", key_dim)
        self.hidden_dim = _check_dim("hidden_dim", hidden_dim)
        self.w_q = nn.Parameter(torch.empty(hidden_dim, query_dim))
        self.w_k = nn.Parameter(torch.empty(hidden_dim, key_dim))
        self.bias = nn.Parameter(torch.empty(hidden_dim))
        self.v = nn.Parameter(torch.empty(hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.w_q, self.query_dim)
        _linear_init(self.w_k, self.key_dim)
        nn.init.zeros_(self.bias)
        _linear_init(self.v, self.hidden_dim)

    def _attend(self, x: _Batch, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return additive_attention(
            x.query,
            x.keys,
            self.w_q,
            self.w_k,
            self.v,
            x.values,
            self.bias,
            x.mask,
            need_weights=need_weights,
        )

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"


class LuongAttention(_ScoredAttention):
    """Luong attention with the ``dot``, ``general`` or ``concat`` score.

    Luong, Pham, Manning. "Effective Approaches to Attention-based Neural Machine Translation".
    EMNLP 2015 (global attention, Section 3.1)::

        dot:      q . k                      needs Dq == Dk
        general:  q^T W k                    W (Dq, Dk)
        concat:   v^T tanh(W [q; k])         W (H, Dq + Dk), v (H,)

    ``dot`` and ``general`` run through :func:`qkv.attention` (``general`` as the dot product of
    ``q W`` and ``k``), unscaled as in the paper. ``concat`` is Bahdanau's additive score with
    ``W`` split in two, computed like :class:`AdditiveAttention` over chunks of query rows, so
    the ``(B, Nq, Nk, H)`` hidden tensor is never held whole. Only the score is implemented; the
    attentional hidden state ``tanh(W_c [context; h_t])`` belongs to the decoder.

    Args:
        query_dim: ``Dq``.
        key_dim: ``Dk``; defaults to ``query_dim``.
        score: ``"dot"``, ``"general"`` or ``"concat"``.
        hidden_dim: ``H`` for ``concat`` (default ``query_dim``); must be None otherwise.
        backend: the :func:`qkv.attention` backend for ``dot`` and ``general``.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        score: LuongScore = "dot",
        hidden_dim: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.query_dim = _check_dim("query_dim", query_dim)
        self.key_dim = query_dim if key_dim is None else _check_dim("key_dim", key_dim)
        if score not in get_args(LuongScore):
            raise ValueError(f'score must be "dot", "general" or "concat"; got {score!r}')
        if score == "dot" and self.key_dim != self.query_dim:
            raise ValueError(
                f'score="dot" needs query_dim == key_dim; got query_dim {query_dim}, '
                f'key_dim {key_dim} (use score="general" to map between them)'
            )
        if hidden_dim is not None and score != "concat":
            raise ValueError(f'hidden_dim is only used by score="concat"; got score={score!r}')
        self.score = score
        self.backend = backend
        self.hidden_dim: int | None = None
        self.weight: nn.Parameter | None = None
        self.v: nn.Parameter | None = None
        if score == "general":
            self.weight = nn.Parameter(torch.empty(self.query_dim, self.key_dim))
        elif score == "concat":
            self.hidden_dim = (
                query_dim if hidden_dim is None else _check_dim("hidden_dim", hidden_dim)
            )
            self.weight = nn.Parameter(torch.empty(self.hidden_dim, self.query_dim + self.key_dim))
            self.v = nn.Parameter(torch.empty(self.hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            _linear_init(self.weight, self.weight.shape[1])
        if self.v is not None:
            _linear_init(self.v, self.v.shape[0])

    def _attend(self, x: _Batch, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if self.score == "concat":
            assert self.weight is not None and self.v is not None  # set in __init__
            Dq = self.query_dim  # W [q; k] = W[:, :Dq] q + W[:, Dq:] k, as in concat_scores
            w_q, w_k = self.weight[:, :Dq], self.weight[:, Dq:]
            return additive_attention(
                x.query, x.keys, w_q, w_k, self.v, x.values, mask=x.mask, need_weights=need_weights
            )
        q = x.query if self.weight is None else x.query @ self.weight  # (B, Nq, Dk)
        return _dot_attention(q, x.keys, x.values, x.mask, self.backend, need_weights)

    def extra_repr(self) -> str:
        hidden = f", hidden_dim={self.hidden_dim}" if self.hidden_dim is not None else ""
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}{hidden}"


class CosineAttention(_ScoredAttention):
    """Cosine attention with a learnable temperature: ``score(q, k) = cos(W q, k) / temperature``.

    Content-based addressing as in Graves et al. "Neural Turing Machines" (2014): the query is
    mapped into key space by ``W`` and compared with each key by cosine similarity, sharpened by
    a learnable temperature as in Liu et al. "Swin Transformer V2" (CVPR 2022). The temperature is
    stored as its logarithm so that it stays positive under any gradient step. Runs through
    :func:`qkv.attention`: the normalized ``W q`` divided by the temperature, dotted with the
    normalized keys at ``scale = 1``.

    Args:
        query_dim: ``Dq``.
        key_dim: ``Dk``.
        init_temperature: the starting temperature, > 0. Cosines lie in ``[-1, 1]``, so with the
            default 0.1 the scores span ``[-10, 10]``; at 1 the weights would be near uniform.
        backend: the :func:`qkv.attention` backend.

    Attributes:
        weight: ``(Dk, Dq)`` (``nn.Linear`` layout); log_temperature: ``()``.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        init_temperature: float = 0.1,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.query_dim = _check_dim("query_dim", query_dim)
        self.key_dim = _check_dim("key_dim", key_dim)
        if (
            isinstance(init_temperature, bool)
            or not isinstance(init_temperature, int | float)
            or not 0 < init_temperature < math.inf
        ):
            raise ValueError(
                f"init_temperature must be a positive finite number; got {init_temperature!r}"
            )
        self.init_temperature = float(init_temperature)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(self.key_dim, self.query_dim))
        self.log_temperature = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.weight, self.query_dim)
        nn.init.constant_(self.log_temperature, math.log(self.init_temperature))

    @property
    def temperature(self) -> Tensor:
        """``()`` the current temperature, ``exp(log_temperature)``."""
        return self.log_temperature.exp()

    def _attend(self, x: _Batch, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        # cosine_scores(x.query @ W.T, keys, temperature), with the temperature folded into q so
        # that qkv.attention (whose scale is a Python number) carries its gradient.
        q = F.normalize(x.query @ self.weight.T, dim=-1)  # (B, Nq, Dk)
        k = F.normalize(x.keys, dim=-1)  # (B, Nk, Dk)
        q = q / self.temperature.to(q.dtype)
        return _dot_attention(q, k, x.values, x.mask, self.backend, need_weights)

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, "
            f"init_temperature={self.init_temperature}"
        )
