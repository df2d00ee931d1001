"""The validated description of one attention call, shared by every backend.

:func:`build_request` checks the user's arguments once and raises errors that name the argument
and its shape or value; backends then read an :class:`AttentionRequest` and never re-validate.
The request also knows how to produce any tile of the mask and of the modified scores, so a
dense backend asks for the whole matrix and a tiled backend asks block by block, from the same
code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from qkv import masks as M
from qkv.mask_core import broadcast_shape
from qkv.masks import MaskFn, MaskFunction
from qkv.scores import ScoreFunction, ScoreMod, check_score_call, is_additive

__all__ = [
    "AttentionRequest",
    "CausalAlignment",
    "CausalArg",
    "as_4d",
    "broadcasts_to",
    "build_request",
    "stats_dtype",
]

CausalAlignment: TypeAlias = Literal["top_left", "bottom_right"]
CausalArg: TypeAlias = bool | CausalAlignment | None
MaskArg: TypeAlias = Tensor | MaskFunction | None
BiasArg: TypeAlias = Tensor | ScoreFunction | None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics are kept in: float32 for half types (their 10- or 7-bit
    mantissas lose the small probabilities of long rows), the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True, eq=False)
class AttentionRequest:
    """One validated attention call.

    Notation: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``Hq % Hkv == 0``),
    ``Nq`` queries, ``Nk`` keys, ``D`` query/key head dim, ``Dv`` value head dim.

    Attributes:
        q: ``(B, Hq, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``.
        v: ``(B, Hkv, Nk, Dv)``.
        mask: 4-d bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` (True = attend; a lower-rank
            one given by the caller is viewed as 4-d), a mask function, or None.
        bias: 4-d float tensor broadcastable to ``(B, Hq, Nq, Nk)`` added to the scaled scores,
            or None.
        score_mod: a score function applied after ``bias``, or None.
        causal: None, ``"top_left"`` or ``"bottom_right"``.
        scale: multiplies ``q k^T``.
        dropout_p: probability of zeroing an attention weight.
        return_weights: whether the caller wants the ``(B, Hq, Nq, Nk)`` probabilities.
        return_lse: whether the caller wants each row's log-sum-exp ``(B, Hq, Nq)`` (a backend
            serves it through ``forward_lse``; see :mod:`qkv.backends.registry`).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | MaskFn | None
    bias: Tensor | None
    score_mod: ScoreFunction | None
    causal: CausalAlignment | None
    scale: float
    dropout_p: float
    return_weights: bool
    return_lse: bool = False

    # --- sizes ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group_size(self) -> int:
        """Query heads served by each key/value head."""
        return self.q_heads // self.kv_heads

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def value_dim(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.causal is not None

    @property
    def needs_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    # --- masks and scores, whole or by tile -------------------------------------------------
    @cached_property
    def causal_mask(self) -> MaskFn | None:
        """The causal mask as a function, with the offset its alignment implies."""
        if self.causal is None:
            return None
        offset = 0 if self.causal == "top_left" else self.kv_len - self.q_len
        return M.causal(offset)

    @cached_property
    def whole_mask(self) -> MaskFn | None:
        """Everything that masks this call as one mask: the causal flag, a mask function and a
        mask tensor (as :class:`qkv.masks.Dense`), combined with ``&``. This is the one place
        the combination rule lives; every backend evaluates, classifies or lowers this."""
        parts: list[MaskFn] = [] if self.causal_mask is None else [self.causal_mask]
        if isinstance(self.mask, Tensor):
            parts.append(M.Dense(self.mask, "mask"))
        elif self.mask is not None:
            parts.append(self.mask)
        return M.and_masks(*parts) if parts else None

    @cached_property
    def mask_fn(self) -> MaskFn | None:
        """Causal and a mask function combined, without a mask tensor (what a dense backend
        has to materialize)."""
        parts = [
            m for m in (self.causal_mask, self.mask) if m is not None and not isinstance(m, Tensor)
        ]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else M.and_masks(*parts)

    def mask_tile(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Tensor | None:
        """The mask of queries ``q_range`` x keys ``kv_range``, broadcastable to
        ``(B, Hq, Tq, Tk)``, or None when everything is attended."""
        if self.whole_mask is None:
            return None
        target = (self.batch, self.q_heads, q_range[1] - q_range[0], kv_range[1] - kv_range[0])
        return self._checked_mask(
            lambda m: m.tile(self.batch, self.q_heads, q_range, kv_range, self.device),
            target,
            lambda: (
                f"queries {q_range[0]}..{q_range[1] - 1} x keys {kv_range[0]}..{kv_range[1] - 1}"
            ),
        )

    def evaluate_mask(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """:attr:`whole_mask` on broadcastable index tensors (any selection of batch entries,
        heads, queries and keys), checked as :meth:`mask_tile` checks a tile."""
        target = broadcast_shape(b.shape, h.shape, q_idx.shape, kv_idx.shape)
        return self._checked_mask(
            lambda m: m(b, h, q_idx, kv_idx),
            target,
            lambda: f"queries {_span(q_idx)} x keys {_span(kv_idx)}",
        )

    def _checked_mask(
        self,
        evaluate: Callable[[MaskFn], Tensor],
        target: tuple[int, ...],
        block: Callable[[], str],
    ) -> Tensor:
        """``evaluate(whole_mask)``, or a ``ValueError``/``TypeError`` naming the mask and the
        block: a mask function that passed the corner check can still fail on a real tile (a
        fixed-size tensor, a lookup table too short for the call, a wrong dtype). The check
        compares shapes and dtype only; the message is built when there is one."""
        mask = self.whole_mask
        assert mask is not None

        def where() -> str:
            return (
                f"{block()} (index tensors broadcasting to {target}) of (B, Hq, Nq, Nk) = "
                f"{(self.batch, self.q_heads, self.q_len, self.kv_len)}"
            )

        try:
            out = evaluate(mask)
        except (RuntimeError, IndexError, TypeError, ValueError) as error:
            raise ValueError(
                f"mask: the mask function {mask!r} failed on {where()}: {error}"
            ) from error
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = f"dtype {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(
                f"mask: the mask function {mask!r} must return a bool tensor; got {got} on "
                f"{where()}"
            )
        if not broadcasts_to(tuple(out.shape), target):
            raise ValueError(
                f"mask: the mask function {mask!r} returned shape {tuple(out.shape)} on "
                f"{where()}; its result must broadcast to the index tensors' shape: compute it "
                "from the index tensors, not a fixed-size tensor"
            )
        return out

    def modify_scores(
        self, scores: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int]
    ) -> Tensor:
        """Add the bias and apply the score function to a tile of scaled scores ``(B, Hq, Tq, Tk)``."""
        if self.bias is not None:
            scores = scores + _tile(self.bias, q_range, kv_range).to(scores.dtype)
        if self.score_mod is not None:
            scores = self.score_mod(scores, *self.indices(q_range, kv_range))
        return scores

    def indices(
        self, q_range: tuple[int, int], kv_range: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return M.index_grid(self.batch, self.q_heads, q_range, kv_range, self.device)

    @property
    def full_q(self) -> tuple[int, int]:
        return (0, self.q_len)

    @property
    def full_kv(self) -> tuple[int, int]:
        return (0, self.kv_len)

    def dense_bias(self) -> Tensor | None:
        """Bias plus an additive score function as one float tensor broadcastable to
        ``(B, Hq, Nq, Nk)``, or None. Only valid when ``score_mod`` is additive."""
        if self.score_mod is None:
            return self.bias
        if not is_additive(self.score_mod):
            raise ValueError(f"score function {self.score_mod!r} is not additive")
        zeros = torch.zeros((), dtype=stats_dtype(self.dtype), device=self.device)
        return self.modify_scores(zeros, self.full_q, self.full_kv)

    # --- memory -------------------------------------------------------------------------------
    @property
    def score_elements(self) -> int:
        """Entries of the full score matrix, ``B * Hq * Nq * Nk``."""
        return self.batch * self.q_heads * self.q_len * self.kv_len

    def dense_mask_elements(self) -> int:
        """Entries of the mask a dense backend materializes (0 if none): the broadcast shape a
        mask function produces, found (once per request) by evaluating it on a 2 x 2 corner."""
        return self._dense_mask_elements

    @cached_property
    def _dense_mask_elements(self) -> int:
        if self.mask_fn is None:
            return 0
        corner = self.mask_fn(*self.indices((0, min(2, self.q_len)), (0, min(2, self.kv_len))))
        batch = self.batch if corner.ndim == 4 and corner.shape[0] > 1 else 1
        heads = self.q_heads if corner.ndim >= 3 and corner.shape[-3] > 1 else 1
        return batch * heads * self.q_len * self.kv_len

    def describe(self) -> str:
        """One line naming the shapes and options, for messages and ``explain``."""
        parts = [
            f"q {tuple(self.q.shape)}",
            f"k {tuple(self.k.shape)}",
            f"v {tuple(self.v.shape)}",
            str(self.dtype).removeprefix("torch."),
            self.device.type,
        ]
        if self.causal:
            parts.append(f"causal={self.causal}")
        if isinstance(self.mask, Tensor):
            parts.append(f"mask=bool{tuple(self.mask.shape)}")
        elif self.mask is not None:
            parts.append(f"mask={self.mask!r}")
        if self.bias is not None:
            parts.append(f"bias={tuple(self.bias.shape)}")
        if self.score_mod is not None:
            parts.append(f"score_mod={self.score_mod!r}")
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.return_weights:
            parts.append("return_weights")
        if self.return_lse:
            parts.append("return_lse")
        return ", ".join(parts)


def _span(index: Tensor) -> str:
    """``a..b``, the smallest and largest of some indices, for messages."""
    if index.numel() == 0:
        return "(none)"
    return f"{int(index.min())}..{int(index.max())}"


def _tile(t: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Tensor:
    """Slice the last two dims of a broadcastable tensor, leaving size-1 (broadcast) dims alone."""
    rows = slice(*q_range) if t.shape[-2] > 1 else slice(None)
    cols = slice(*kv_range) if t.shape[-1] > 1 else slice(None)
    return t[..., rows, cols]


# --- validation ---------------------------------------------------------------------------------


def build_request(
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
) -> AttentionRequest:
    """Validate the arguments of :func:`qkv.attention` and bundle them. Raises ``TypeError`` or
    ``ValueError`` naming the argument and the shapes or values involved."""
    _check_qkv(q, k, v)
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    mask_value = _check_mask(mask, target, q.device)
    bias_tensor, score_mod = _check_bias(bias, target, q.device)
    return AttentionRequest(
        q=q,
        k=k,
        v=v,
        mask=mask_value,
        bias=bias_tensor,
        score_mod=score_mod,
        causal=_causal_that_hides(_check_causal(causal), q.shape[2], k.shape[2]),
        scale=_check_scale(scale, q.shape[-1]),
        dropout_p=_check_dropout(dropout_p),
        return_weights=bool(return_weights),
        return_lse=bool(return_lse),
    )


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t, letter in (("q", q, "Hq, Nq, D"), ("k", k, "Hkv, Nk, D"), ("v", v, "Hkv, Nk, Dv")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(
                f"{name} must have shape (B, {letter}); got a {t.ndim}-d tensor of shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}"
        )
    if q.device.type == "meta":
        raise ValueError(
            "q, k and v are on the meta device, which holds no values; attention needs "
            "tensors with values (on cpu or cuda)"
        )
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must share the batch size B (dim 0); got {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads Hkv (dim 1); got {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads Hq ({q.shape[1]}) must be a multiple of key/value heads Hkv ({k.shape[1]}); got {shapes}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length Nk (dim 2); got {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D (dim 3); got {shapes}")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be >= 1; got {shapes}")


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (without growing its rank past it)."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def as_4d(t: Tensor) -> Tensor:
    """``t`` with leading size-1 dims up to rank 4 (a view): a ``(Nk,)`` mask becomes
    ``(1, 1, 1, Nk)``, so every backend can slice its last two dims as queries and keys, and a
    bias's gradient still flows back to the tensor the caller passed."""
    return t.reshape((1,) * (4 - t.ndim) + tuple(t.shape)) if t.ndim < 4 else t


def _check_mask(
    mask: MaskArg, target: tuple[int, int, int, int], device: torch.device
) -> Tensor | MaskFn | None:
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = attend); got dtype {mask.dtype}. "
                "Pass an additive float mask as bias= instead."
            )
        if not broadcasts_to(tuple(mask.shape), target):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to (B, Hq, Nq, Nk) = {target}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but q is on {device}")
        return as_4d(mask)
    if callable(mask):
        fn = M.mask_function(mask)
        # The call's sizes are known only now: lengths per batch entry, id lengths, a dense
        # tensor's shape, and what a mask function of the user's returns.
        batch, heads, q_len, kv_len = target
        fn.check_call(batch, heads, q_len, kv_len, device)
        return fn
    raise TypeError(
        f"mask must be a bool tensor, a mask function or None; got {type(mask).__name__}"
    )


def _check_bias(
    bias: BiasArg, target: tuple[int, ...], device: torch.device
) -> tuple[Tensor | None, ScoreFunction | None]:
    if bias is None:
        return None, None
    if isinstance(bias, Tensor):
        if not bias.dtype.is_floating_point:
            raise TypeError(
                f"bias must be a floating-point tensor; got dtype {bias.dtype}. Pass a bool mask as mask=."
            )
        if not broadcasts_to(tuple(bias.shape), target):
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to (B, Hq, Nq, Nk) = {target}"
            )
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but q is on {device}")
        return as_4d(bias), None
    if callable(bias):
        if isinstance(bias, torch.nn.Module):
            for name, t in (*bias.named_parameters(), *bias.named_buffers()):
                if t.device != device:
                    raise ValueError(
                        f"bias: the score function {bias!r} holds {name} on {t.device} but q is "
                        f"on {device}; move it with .to({str(device)!r})"
                    )
        check_score_call(bias, *target)
        return None, bias.for_call(*target) if isinstance(bias, ScoreMod) else bias
    raise TypeError(
        f"bias must be a float tensor, a score function or None; got {type(bias).__name__}"
    )


def _check_causal(causal: CausalArg) -> CausalAlignment | None:
    if causal is None or causal is False:
        return None
    if causal is True:
        return "top_left"
    if causal in ("top_left", "bottom_right"):
        return causal
    raise ValueError(f'causal must be False, True, "top_left" or "bottom_right"; got {causal!r}')


def _causal_that_hides(
    causal: CausalAlignment | None, q_len: int, kv_len: int
) -> CausalAlignment | None:
    """``causal``, or None where it hides no key from any query: a decoding step (one query,
    bottom-right) or a single key. Every backend then runs the call unmasked, which is exact
    and skips the mask's tile classification, lowering and SDPA's mask tensor."""
    if causal is None:
        return None
    offset = 0 if causal == "top_left" else kv_len - q_len
    return None if offset >= kv_len - 1 else causal  # query 0 already sees key Nk - 1


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, Tensor) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number or None; got {scale!r}")
    return float(scale)


def _check_dropout(dropout_p: float) -> float:
    if not isinstance(dropout_p, int | float) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    return float(dropout_p)
