r"""The score functions of the seq2seq attention literature, as pure functions.

Each function maps queries and keys to unnormalized scores; :func:`score_attention` turns scores
into weights and a context with the library's one masked softmax. Together they are the eager,
readable form of the classic attention layers (:mod:`qkv.nn.scored` wraps them in modules).

Notation used for tensor shapes: ``...`` any leading (batch, head) dims, broadcast between the
arguments; ``Nq`` queries, ``Nk`` keys, ``Dq`` query dim, ``Dk`` key dim, ``Dv`` value dim,
``H`` the hidden size of the additive score.

============  ===========================================  =======================================
name          score(q, k)                                  source
============  ===========================================  =======================================
dot           ``q . k``                                    Luong et al. 2015
scaled dot    ``q . k / sqrt(D)``                          Vaswani et al. 2017
general       ``q^T W k``                                  Luong et al. 2015
additive      ``v^T tanh(W_q q + W_k k + b)``              Bahdanau et al. 2015
concat        ``v^T tanh(W [q; k])``                       Luong et al. 2015 (= additive, split W)
cosine        ``cos(q, k) / temperature``                  Graves et al. 2014; Liu et al. 2022
============  ===========================================  =======================================

Dot, scaled dot, general and cosine are all scaled dot products after a change of ``q`` and
``k`` (``general``: ``q -> q W``; ``cosine``: normalize both, divide ``q`` by the temperature), so
the modules in :mod:`qkv.nn.scored` compute them with :func:`qkv.attention` and every backend,
never materializing the scores. Additive and concat are not dot products: in this eager form they
materialize a ``(..., Nq, Nk, H)`` tensor, ``H`` times the memory of the scores.

References:
    Bahdanau, Cho, Bengio. "Neural Machine Translation by Jointly Learning to Align and
    Translate". ICLR 2015. arXiv:1409.0473.
    Luong, Pham, Manning. "Effective Approaches to Attention-based Neural Machine Translation".
    EMNLP 2015. arXiv:1508.04025.
    Graves, Wayne, Danihelka. "Neural Turing Machines". arXiv:1410.5401, 2014 (cosine
    content-based addressing with a key strength).
    Liu et al. "Swin Transformer V2". CVPR 2022 (scaled cosine attention, learnable temperature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from qkv.mask_core import broadcast_shape
from qkv.numerics import masked_softmax
from qkv.request import broadcasts_to, stats_dtype

__all__ = [
    "ADDITIVE_CHUNK_BYTES",
    "additive_attention",
    "additive_scores",
    "concat_scores",
    "cosine_scores",
    "dot_scores",
    "general_scores",
    "scaled_dot_scores",
    "score_attention",
]


def _check_last_dims(name_a: str, a: Tensor, name_b: str, b: Tensor, what: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_a} and {name_b} must share the {what} (last dim); "
            f"got {name_a} {tuple(a.shape)}, {name_b} {tuple(b.shape)}"
        )


def dot_scores(q: Tensor, k: Tensor) -> Tensor:
    """Luong's ``dot`` score: ``q . k``, unscaled.

    Args:
        q: ``(..., Nq, D)`` queries.
        k: ``(..., Nk, D)`` keys.

    Returns:
        ``(..., Nq, Nk)`` scores.

    Raises:
        ValueError: if ``q`` and ``k`` differ in the last dim.
    """
    _check_last_dims("q", q, "k", k, "feature dim D")
    return q @ k.transpose(-2, -1)  # (..., Nq, Nk)


def scaled_dot_scores(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """The Transformer's score: ``q . k * scale``, default ``scale = 1 / sqrt(D)``.

    The scale keeps the scores' variance near 1 for unit-variance inputs, so the softmax does not
    saturate as ``D`` grows (Vaswani et al. 2017).

    Args:
        q: ``(..., Nq, D)`` queries.
        k: ``(..., Nk, D)`` keys.
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.

    Returns:
        ``(..., Nq, Nk)`` scores.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return dot_scores(q, k) * scale


def general_scores(q: Tensor, k: Tensor, weight: Tensor) -> Tensor:
    """Luong's ``general`` (bilinear) score: ``q^T W k``.

    Computed as ``(q W) . k``: projecting the ``Nq`` queries is cheaper than projecting the
    ``Nk`` keys when decoding one step at a time, and it makes the score a plain dot product.

    Args:
        q: ``(..., Nq, Dq)`` queries.
        k: ``(..., Nk, Dk)`` keys.
        weight: ``(Dq, Dk)`` the bilinear form ``W``.

    Returns:
        ``(..., Nq, Nk)`` scores.

    Raises:
        ValueError: if ``weight`` is not ``(Dq, Dk)``.
    """
    if weight.shape != (q.shape[-1], k.shape[-1]):
        raise ValueError(
            f"weight must have shape (Dq, Dk) = ({q.shape[-1]}, {k.shape[-1]}); "
            f"got {tuple(weight.shape)}"
        )
    return dot_scores(q @ weight, k)  # q @ weight: (..., Nq, Dk)


def _check_additive_weights(
    q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor, bias: Tensor | None
) -> None:
    if v.ndim != 1:
        raise ValueError(f"v must have shape (H,); got {tuple(v.shape)}")
    H = v.shape[0]
    expected = {"w_q": (H, q.shape[-1]), "w_k": (H, k.shape[-1]), "v": (H,)}
    given = {"w_q": w_q, "w_k": w_k, "v": v}
    if bias is not None:
        expected["bias"], given["bias"] = (H,), bias
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for q {tuple(q.shape)}, k {tuple(k.shape)} "
                f"and hidden size H = {H}; got {tuple(given[name].shape)}"
            )


def additive_scores(
    q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Bahdanau's additive score: ``v^T tanh(W_q q + W_k k + b)``.

    Queries and keys are projected separately (``Nq + Nk`` projections, not ``Nq * Nk``), then
    every pair is combined. This eager form materializes the ``(..., Nq, Nk, H)`` hidden tensor,
    ``H`` times the size of the scores; :func:`additive_attention` never does. In a decoder
    loop ``W_k k + b`` does not change between steps and could be cached by the caller.

    Args:
        q: ``(..., Nq, Dq)`` queries (Bahdanau: the previous decoder state).
        k: ``(..., Nk, Dk)`` keys (Bahdanau: the encoder annotations).
        w_q: ``(H, Dq)`` query projection (``nn.Linear`` layout: out, in).
        w_k: ``(H, Dk)`` key projection.
        v: ``(H,)`` the output vector.
        bias: ``(H,)`` added inside the tanh, or None.

    Returns:
        ``(..., Nq, Nk)`` scores.

    Raises:
        ValueError: if a weight's shape does not fit ``q``, ``k`` or ``H``.
    """
    _check_additive_weights(q, k, w_q, w_k, v, bias)
    pq = q @ w_q.T  # (..., Nq, H)
    pk = k @ w_k.T  # (..., Nk, H)
    if bias is not None:
        pk = pk + bias  # added on the Nk side: cheaper than on the (Nq, Nk, H) sum
    hidden = torch.tanh(pq.unsqueeze(-2) + pk.unsqueeze(-3))  # (..., Nq, Nk, H)
    return hidden @ v  # (..., Nq, Nk)


#: One query chunk's ``(..., Tq, Nk, H)`` hidden tensor is kept near this size by
#: :func:`additive_attention`.
ADDITIVE_CHUNK_BYTES = 32 * 2**20


def additive_attention(
    q: Tensor,
    k: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    v: Tensor,
    values: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    need_weights: bool = True,
    chunk_bytes: int = ADDITIVE_CHUNK_BYTES,
) -> tuple[Tensor, Tensor | None]:
    """Bahdanau attention without the ``(..., Nq, Nk, H)`` hidden tensor.

    Computes exactly ``score_attention(additive_scores(q, k, ...), values, mask)``, but over
    chunks of query rows sized so that one chunk's hidden tensor stays near ``chunk_bytes``. Each
    chunk runs under activation checkpointing, so backward recomputes it instead of keeping every
    chunk's ``tanh``: peak extra memory is one chunk plus the ``(..., Nq, Nk)`` scores, not
    ``H`` times the scores.

    Args:
        q: ``(..., Nq, Dq)``; k: ``(..., Nk, Dk)``; w_q ``(H, Dq)``, w_k ``(H, Dk)``, v ``(H,)``,
            bias ``(H,)`` or None, as in :func:`additive_scores`.
        values: ``(..., Nk, Dv)``.
        mask: bool broadcastable to ``(..., Nq, Nk)``, True = attend; or None.
        need_weights: also return the ``(..., Nq, Nk)`` weights (otherwise each chunk's weights
            are dropped as soon as its context is computed).
        chunk_bytes: the target size of one chunk's hidden tensor.

    Returns:
        ``context (..., Nq, Dv)`` and ``weights (..., Nq, Nk)`` or None.
    """
    _check_additive_weights(q, k, w_q, w_k, v, bias)
    pq = q @ w_q.T  # (..., Nq, H)
    pk = k @ w_k.T  # (..., Nk, H)
    if bias is not None:
        pk = pk + bias
    lead = broadcast_shape(pq.shape[:-2], pk.shape[:-2])
    row_bytes = math.prod(lead) * pk.shape[-2] * pk.shape[-1] * pk.element_size()
    rows = max(1, chunk_bytes // max(row_bytes, 1))
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, w_q, w_k, v, values, bias)
    )
    contexts, weights = [], []
    for start in range(0, pq.shape[-2], rows):
        part = slice(start, start + rows)
        part_mask = (
            mask[..., part, :]
            if mask is not None and mask.ndim >= 2 and mask.shape[-2] > 1
            else mask
        )
        args = (pq[..., part, :], pk, v, values, part_mask)
        if recompute:
            context, weight = checkpoint(_additive_chunk, *args, use_reentrant=False)
        else:
            context, weight = _additive_chunk(*args)
        contexts.append(context)
        if need_weights:
            weights.append(weight)
    context = torch.cat(contexts, dim=-2)  # (..., Nq, Dv)
    return context, (torch.cat(weights, dim=-2) if need_weights else None)


def _additive_chunk(
    pq: Tensor, pk: Tensor, v: Tensor, values: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    hidden = torch.tanh(pq.unsqueeze(-2) + pk.unsqueeze(-3))  # (..., Tq, Nk, H)
    return score_attention(hidden @ v, values, mask)  # (..., Tq, Dv), (..., Tq, Nk)


def concat_scores(
    q: Tensor, k: Tensor, weight: Tensor, v: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Luong's ``concat`` score: ``v^T tanh(W [q; k])``.

    This is the additive score under another name: ``W [q; k] = W[:, :Dq] q + W[:, Dq:] k``, so
    it is computed by :func:`additive_scores` with ``W`` split into ``W_q`` and ``W_k`` (never
    building the ``(Nq, Nk, Dq + Dk)`` concatenation).

    Args:
        q: ``(..., Nq, Dq)`` queries.
        k: ``(..., Nk, Dk)`` keys.
        weight: ``(H, Dq + Dk)`` acting on the concatenation ``[q; k]``.
        v: ``(H,)``.
        bias: ``(H,)`` or None (Luong et al. write none).

    Returns:
        ``(..., Nq, Nk)`` scores.

    Raises:
        ValueError: if ``weight`` is not ``(H, Dq + Dk)``.
    """
    Dq, Dk = q.shape[-1], k.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != Dq + Dk:
        raise ValueError(
            f"weight must have shape (H, Dq + Dk) = (H, {Dq + Dk}) for q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}; got {tuple(weight.shape)}"
        )
    return additive_scores(q, k, weight[:, :Dq], weight[:, Dq:], v, bias)


def cosine_scores(q: Tensor, k: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """Cosine similarity divided by a temperature: ``cos(q, k) / temperature``.

    Cosine scores lie in ``[-1, 1]`` whatever the norms of ``q`` and ``k``, so the temperature
    alone sets how peaked the softmax can be; a small one (e.g. 0.1) is needed for sharp weights
    (Graves et al. 2014 call its inverse the key strength; Liu et al. 2022 learn it).

    Args:
        q: ``(..., Nq, D)`` queries.
        k: ``(..., Nk, D)`` keys.
        temperature: a positive number, or a tensor broadcastable to the scores (a learnable
            scalar, or one per head as ``(H, 1, 1)``).

    Returns:
        ``(..., Nq, Nk)`` scores.

    Raises:
        ValueError: if a number ``temperature`` is not positive and finite.
    """
    if not isinstance(temperature, Tensor) and not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be positive and finite; got {temperature!r}")
    # F.normalize clamps the norm at eps, so a zero vector gives zero scores, not NaN.
    return dot_scores(F.normalize(q, dim=-1), F.normalize(k, dim=-1)) / temperature


def score_attention(
    scores: Tensor, values: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Weights ``softmax(scores)`` over the keys, and the context ``weights @ values``.

    Uses :func:`qkv.numerics.masked_softmax`, the library's one softmax: a query with
    no key to attend to gets all-zero weights and a zero context, and no NaN gradient.
    For float16/bfloat16 scores the softmax runs in float32, as in every backend.

    Args:
        scores: ``(..., Nq, Nk)`` from any score function.
        values: ``(..., Nk, Dv)``.
        mask: bool, broadcastable to ``(..., Nq, Nk)``, True = attend; or None.

    Returns:
        ``context (..., Nq, Dv)`` and ``weights (..., Nq, Nk)``, both in the values' dtype.

    Raises:
        TypeError: if ``mask`` is not a bool tensor.
        ValueError: if ``mask`` does not broadcast to ``scores``, or ``scores`` and ``values``
            disagree on ``Nk``.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend); got dtype {mask.dtype}")
    if mask is not None and not broadcasts_to(tuple(mask.shape), tuple(scores.shape)):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the scores "
            f"(..., Nq, Nk) = {tuple(scores.shape)}"
        )
    if scores.shape[-1] != values.shape[-2]:
        raise ValueError(
            f"scores (..., Nq, Nk) and values (..., Nk, Dv) must share Nk; "
            f"got scores {tuple(scores.shape)}, values {tuple(values.shape)}"
        )
    weights = masked_softmax(scores.to(stats_dtype(scores.dtype)), mask).to(values.dtype)
    return weights @ values, weights  # (..., Nq, Dv), (..., Nq, Nk)
