"""``qkv.attention``: the one function every module and model calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, overload

from torch import Tensor

from qkv.backends import Backend, select_backend
from qkv.backends.cost import estimate_bytes
from qkv.backends.registry import format_ms, serve_reason
from qkv.request import AttentionRequest, BiasArg, CausalArg, MaskArg, build_request

__all__ = ["Explanation", "attention", "explain"]


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = ...,
    bias: BiasArg = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    return_weights: Literal[False] = ...,
    return_lse: Literal[False] = ...,
    backend: str = ...,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = ...,
    bias: BiasArg = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    return_weights: Literal[True],
    return_lse: Literal[False] = ...,
    backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = ...,
    bias: BiasArg = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    return_weights: Literal[False] = ...,
    return_lse: Literal[True],
    backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = ...,
    bias: BiasArg = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    return_weights: Literal[True],
    return_lse: Literal[True],
    backend: str = ...,
) -> tuple[Tensor, Tensor, Tensor]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = None,
    bias: BiasArg = None,
    causal: CausalArg = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    r"""Exact attention: ``softmax(q k^T * scale + bias, masked) v``.

    Notation: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``Nq`` queries, ``Nk``
    keys, ``D`` query/key head dim, ``Dv`` value head dim.

    Args:
        q: ``(B, Hq, Nq, D)`` queries; float16, bfloat16, float32 or float64.
        k: ``(B, Hkv, Nk, D)`` keys, same dtype and device. ``Hq`` must be a multiple of ``Hkv``:
            query head ``h`` attends with key/value head ``h // (Hq // Hkv)`` (grouped-query
            attention; ``Hkv = 1`` is multi-query). K and V are not repeated in memory.
        v: ``(B, Hkv, Nk, Dv)`` values.
        mask: which keys each query may attend to. A bool tensor broadcastable to
            ``(B, Hq, Nq, Nk)`` with True = attend, or a mask function of
            ``(b, h, q_idx, kv_idx)`` from :mod:`qkv.masks` (composable with ``&``, ``|``).
        bias: added to the scaled scores before softmax. A float tensor broadcastable to
            ``(B, Hq, Nq, Nk)``, or a score function ``(score, b, h, q_idx, kv_idx) -> score``
            from :mod:`qkv.scores` (ALiBi, softcap, a learnable relative-position bias).
        causal: ``False``; ``True`` or ``"top_left"`` (query ``i`` sees keys ``j <= i``, as
            PyTorch's ``is_causal``); or ``"bottom_right"`` (query ``i`` sees ``j <= i + Nk - Nq``,
            as FlashAttention and KV-cache decoding). They differ only when ``Nq != Nk``::

                Nq=2, Nk=5   top_left         bottom_right
                             x . . . .        x x x x .
                             x x . . .        x x x x x

            Combined with ``mask`` by logical and.
        scale: multiplies ``q k^T``; default ``1 / sqrt(D)``.
        dropout_p: probability of zeroing each attention weight (the rest are scaled by
            ``1 / (1 - p)``). Applied whenever > 0, as in ``F.scaled_dot_product_attention``:
            modules pass 0 in eval mode.
        return_weights: also return the probabilities (before dropout).
        return_lse: also return each row's log-sum-exp ``log sum_j exp(s_ij)`` of the modified,
            masked scores (before dropout): ``(B, Hq, Nq)`` in float32 (float64 for float64
            inputs), ``-inf`` on a row with no key to attend to. It is differentiable: gradients
            flow through it as well as through the output. Partial results over disjoint key
            sets merge exactly through it (what :mod:`qkv.parallel` does). Served by the
            backends that compute it (reference, chunked, cpu); another backend named
            explicitly raises, and ``auto`` passes it over. (An ALiBi offset beyond
            ``Nq + Nk`` is first brought within it, which shifts each row's scores, and so its
            log-sum-exp, by one constant: see :meth:`qkv.scores.Alibi.for_call`.)
        backend: ``"auto"`` (see :func:`explain`), or a registered name such as ``"reference"``
            or ``"sdpa"``; a named backend that cannot serve the call raises with its reason.

    Returns:
        ``out (B, Hq, Nq, Dv)`` in the input dtype, and with ``return_weights=True`` also
        ``weights (B, Hq, Nq, Nk)``, then with ``return_lse=True`` also ``lse (B, Hq, Nq)``. A query row with no key to attend to gives zeros in both
        (and zero gradients), never NaN.

    Numerics: for float16 and bfloat16 the softmax (max, exponentials, sum) runs in float32;
    every backend scales ``q`` before the ``q k^T`` product, so float16 inputs overflow only where
    the scaled logits themselves pass 65504. ``Nk = 0`` gives zeros on every backend.

    Non-finite inputs, the same on every backend: **a masked-out score never matters.** A NaN or
    inf in ``q`` or ``k`` reaches only the output rows where the affected scores are attended;
    at keys a row does not attend (its mask is False) it has no effect, and a fully masked row
    gives zeros even when its own query is NaN. An attended NaN or ``+inf`` score makes its row
    NaN (an attended ``-inf`` score just has probability 0); with ``return_weights`` such a row's
    weights are NaN where its scores are not ``-inf`` and 0 where they are. Values ``v`` must be
    finite at every key: ``P V`` multiplies the zero probability of a masked key by its value,
    so a NaN there may reach any row of its batch entry and head (a tiled backend that skips the
    key's tile avoids it, so which rows is not specified). Gradients follow the same rule for
    ``dV`` (NaN exactly at the keys a NaN row attends); ``dQ`` and ``dK`` of rows with
    non-finite inputs are not specified.

    Second-order gradients (``create_graph=True``): reference, chunked and cpu support them
    (chunked and cpu recompute through the reference formula then, with its ``O(Nq * Nk)``
    memory); PyTorch's SDPA kernels raise their own error; pass ``backend="reference"``.

    Raises:
        TypeError, ValueError: for inputs of the wrong type, rank, dtype or shape, naming the
            argument and its shape or value.
    """
    request = build_request(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        return_weights=return_weights,
        return_lse=return_lse,
    )
    chosen = select_backend(request, backend).backend
    if return_lse:
        out, weights, lse = chosen.forward_lse(request)  # type: ignore[attr-defined]
        if return_weights:
            assert weights is not None, "backend ignored return_weights"
            return out, weights, lse
        return out, lse
    out, weights = chosen.forward(request)
    if return_weights:
        assert weights is not None, "backend ignored return_weights"
        return out, weights
    return out


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found: the backend ``auto`` (or the named backend) picks, for every
    other registered backend the reason it cannot serve the call (None if it could), why each
    one that could was passed over, the cost estimates (seconds) and the expected peak extra
    memory (bytes) of those that give them."""

    chosen: str
    reasons: dict[str, str | None]
    call: str
    memory: dict[str, int | None]
    passed_over: dict[str, str] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    #: How a backend that can serve the call computes it, where it says (e.g. the precision the
    #: cpu kernel computes a half-precision call in, and why).
    notes: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"call: {self.call}",
            f"backend: {self.chosen}{_figures(self.costs.get(self.chosen), self.memory.get(self.chosen))}",
        ]
        if (note := self.notes.get(self.chosen)) is not None:
            lines.append(f"  computes: {note}")
        for name, reason in self.reasons.items():
            if name != self.chosen:
                why = reason or self.passed_over.get(name) or _why_not_chosen(name)
                figures = "" if reason else _figures(None, self.memory.get(name))
                lines.append(f"  {name}: {why}{figures}")
                if not reason and (note := self.notes.get(name)) is not None:
                    lines.append(f"    computes: {note}")
        return "\n".join(lines)


def _why_not_chosen(name: str) -> str:
    from qkv.backends import AUTO_ORDER

    if name in AUTO_ORDER:
        return "could serve, but another backend was named"
    return "could serve, but is not in the auto order (runs only when named)"


def _figures(seconds: float | None, memory: int | None) -> str:
    parts = []
    if seconds is not None:
        parts.append(f"estimated {format_ms(seconds)}")
    if memory is not None:
        parts.append(f"expected peak extra memory {memory / 2**20:,.1f} MiB")
    return f" ({', '.join(parts)})" if parts else ""


def explain(
    q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto", **kwargs: object
) -> Explanation:
    """Say which backend :func:`attention` would use for these arguments, and why not the others.

    Takes exactly the arguments of :func:`attention`; computes nothing but the decision. With
    ``backend="auto"`` the policy is :func:`qkv.backends.select_backend`'s: the cheapest cost
    estimate among the backends that can serve, within the memory limit.
    """
    from qkv.backends import available_backends, get_backend

    request: AttentionRequest = build_request(q, k, v, **kwargs)  # type: ignore[arg-type]
    selection = select_backend(request, backend, measure=False)  # decides, runs nothing
    reasons = {name: serve_reason(get_backend(name), request) for name in available_backends()}
    memory = {name: memory_estimate(get_backend(name), request) for name in available_backends()}
    notes = {}
    for name, reason in reasons.items():
        note_of = getattr(get_backend(name), "note", None)
        if reason is None and note_of is not None and (note := note_of(request)) is not None:
            notes[name] = note
    return Explanation(
        notes=notes,
        chosen=selection.backend.name,
        reasons=reasons,
        call=request.describe(),
        memory=memory,
        passed_over=selection.passed_over(),
        costs=selection.costs,
    )


def memory_estimate(backend: Backend, request: AttentionRequest) -> int | None:
    """A backend's estimate of the extra bytes a call needs, or None if it gives none (or
    cannot serve the call)."""
    if serve_reason(backend, request) is not None:
        return None
    estimate = estimate_bytes(backend, request)
    return None if estimate is None else int(estimate)
