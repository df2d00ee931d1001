"""Masks and score modifiers describe themselves; kernels never read meaning from names.

The oracle here builds every mask from Python integers and plain torch, never through
``qkv.masks``, so a backend that took a user's function for a built-in (or wrapped an extent
around int64) cannot agree with it by accident.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

import qkv
from qkv import masks, scores
from qkv.backends import available_backends
from qkv.request import build_request

CPU_BACKENDS = [b for b in ("reference", "chunked", "sdpa", "cpu") if b in available_backends()]
BACKENDS_SRC = Path(qkv.__file__).parent / "backends"


def test_no_backend_reads_names_closures_or_reprs() -> None:
    forbidden = re.compile(
        r"__qualname__|__closure__|co_freevars|cell_contents|repr\(|__name__\s*=="
    )
    offenders = [
        f"{path.relative_to(BACKENDS_SRC)}:{number}: {line.strip()}"
        for path in sorted(BACKENDS_SRC.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if forbidden.search(line)
    ]
    assert not offenders, "\n".join(offenders)


# --- user functions named like every built-in, meaning something else ----------------------------
# Each factory has the built-in's name and closes over variables of the built-in's names, which is
# exactly what a name-reading kernel would have recognised.


def causal(offset: int = 0) -> Callable[..., Tensor]:  # a look-ahead mask
    return lambda b, h, q, kv: kv >= q - offset


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> Callable[..., Tensor]:
    def window(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:  # dilated
        distance = q + offset - kv
        return (distance <= left) & (distance >= -right) & (distance % 2 == 0)

    return window


def key_padding(lengths: list[int]) -> Callable[..., Tensor]:  # hides the first keys
    lengths_t = torch.tensor(lengths)
    return lambda b, h, q, kv: kv >= lengths_t[b]


def query_padding(lengths: list[int]) -> Callable[..., Tensor]:  # hides the first queries
    lengths_t = torch.tensor(lengths)
    return lambda b, h, q, kv: q >= lengths_t[b]


def document(q_ids: Tensor, k_ids: Tensor | None = None) -> Callable[..., Tensor]:
    k_ids = q_ids if k_ids is None else k_ids

    def _index_ids(q_ids: Tensor, k_ids: Tensor) -> Callable[..., Tensor]:
        def same_document(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return q_ids[q] != k_ids[kv]  # other documents only

        return same_document

    return _index_ids(q_ids, k_ids)


def prefix_lm(n: int) -> Callable[..., Tensor]:  # the suffix sees only the prefix
    return lambda b, h, q, kv: (kv < n) | (q < n)


def dense(mask: Tensor) -> Callable[..., Tensor]:
    m4 = mask

    def lookup(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return ~m4[q, kv]  # inverted

    return lookup


def alibi(num_heads: int, *, offset: int = 0) -> scores.ScoreMod:
    slopes = torch.linspace(0.5, 1.0, num_heads)

    def linear_bias(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return score + slopes[h] * (q + offset - kv).abs().to(score.dtype)  # rewards distance

    return scores.ScoreMod(linear_bias, f"alibi({num_heads} heads)", additive=True)


def softcap(cap: float) -> scores.ScoreMod:
    return scores.ScoreMod(lambda s, b, h, q, kv: cap * torch.sin(s / cap), f"softcap({cap})")


B, H, N, D = 2, 2, 21, 8
IDS = torch.arange(N) // 5
DENSE = torch.rand(N, N, generator=torch.Generator().manual_seed(0)) > 0.5

LOOKALIKES: dict[str, dict[str, object]] = {
    "causal": {"mask": causal(0)},
    "sliding_window": {"mask": sliding_window(6, 2)},
    "key_padding": {"mask": key_padding([3, 9])},
    "query_padding": {"mask": query_padding([4, 0])},
    "document": {"mask": document(IDS)},
    "prefix_lm": {"mask": prefix_lm(5)},
    "dense": {"mask": dense(DENSE)},
    "alibi": {"bias": alibi(H)},
    "softcap": {"bias": softcap(2.0)},
}


def _inputs(seed: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))  # type: ignore[return-value]


def _oracle(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """Plain float64 attention with a dense ``(B or 1, H or 1, Nq, Nk)`` mask and a bias (a
    tensor added to the scaled scores, or a function of them); fully masked rows give zeros."""
    s = (q.double() @ k.double().transpose(-2, -1)) / q.shape[-1] ** 0.5
    if callable(bias):
        s = bias(s)
    elif bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v.double()


def _grid() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.arange(B).view(-1, 1, 1, 1),
        torch.arange(H).view(1, -1, 1, 1),
        torch.arange(N).view(1, 1, -1, 1),
        torch.arange(N).view(1, 1, 1, -1),
    )


def _run_or_refuse(
    backend: str, want: Tensor, q: Tensor, k: Tensor, v: Tensor, **kw: object
) -> None:
    try:
        got = qkv.attention(q, k, v, backend=backend, **kw)  # type: ignore[arg-type]
    except ValueError as refusal:
        assert "cannot serve" in str(refusal)
        return
    tol = 1e-10 if q.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "auto"])
@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_user_functions_named_like_builtins_keep_their_own_meaning(backend: str, name: str) -> None:
    q, k, v = _inputs(1)
    options = LOOKALIKES[name]
    b, h, qi, ki = _grid()
    if "mask" in options:
        fn = options["mask"]
        assert callable(fn)
        want = _oracle(q, k, v, fn(b, h, qi, ki).expand(B, H, N, N), None)
    else:
        mod = options["bias"]
        assert callable(mod)
        want = _oracle(q, k, v, None, lambda s: mod(s, b, h, qi, ki))
    _run_or_refuse(backend, want, q, k, v, **options)


def test_auto_never_takes_a_lookalike_window_for_the_builtin_at_length() -> None:
    # The case that went wrong: a dilated window named sliding_window at N = 4096.
    n = 4096
    q = torch.randn(1, 1, n, 16)
    request = build_request(q, q, q, mask=sliding_window(64))
    assert qkv.explain(q, q, q, mask=sliding_window(64)).chosen != "cpu"
    assert get_reason("cpu", request) is not None


def get_reason(backend: str, request: object) -> str | None:
    from qkv.backends import get_backend

    return get_backend(backend).supports(request)  # type: ignore[arg-type]


# --- extents at the edge of int64 ---------------------------------------------------------------

HUGE = [2**62, sys.maxsize]


def _band(lo: int | None, hi: int | None) -> Tensor:
    """Keys with ``lo <= kv - q < hi`` from Python integers: ``(1, 1, N, N)``."""
    rows = [
        [(lo is None or kv - q >= lo) and (hi is None or kv - q < hi) for kv in range(N)]
        for q in range(N)
    ]
    return torch.tensor(rows)[None, None]


EXTENT_CASES: dict[str, tuple[Callable[[int], dict[str, object]], Callable[[int], Tensor]]] = {
    "causal(+x)": (lambda x: {"mask": masks.causal(x)}, lambda x: _band(None, x + 1)),
    "causal(-x)": (lambda x: {"mask": masks.causal(-x)}, lambda x: _band(None, -x + 1)),
    "window(x)": (lambda x: {"mask": masks.sliding_window(x)}, lambda x: _band(-x, 1)),
    "window(0, x)": (lambda x: {"mask": masks.sliding_window(0, x)}, lambda x: _band(0, x + 1)),
    "window(x, x)": (lambda x: {"mask": masks.sliding_window(x, x)}, lambda x: _band(-x, x + 1)),
    "window offset +x": (
        lambda x: {"mask": masks.sliding_window(3, offset=x)},
        lambda x: _band(x - 3, x + 1),
    ),
    "window offset -x": (
        lambda x: {"mask": masks.sliding_window(3, 2, offset=-x)},
        lambda x: _band(-x - 3, -x + 3),
    ),
    "prefix_lm(x)": (
        lambda x: {"mask": masks.prefix_lm(x)},
        lambda x: torch.ones(1, 1, N, N, dtype=torch.bool),
    ),
    "causal(x) & window": (
        lambda x: {"mask": masks.causal(x) & masks.sliding_window(2, x)},
        lambda x: _band(-2, None),
    ),
    "~window(x)": (lambda x: {"mask": ~masks.sliding_window(x)}, lambda x: ~_band(-x, 1)),
}


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "auto"])
@pytest.mark.parametrize("extent", HUGE, ids=["2**62", "maxsize"])
@pytest.mark.parametrize("case", list(EXTENT_CASES))
def test_huge_mask_extents_are_exact(backend: str, extent: int, case: str) -> None:
    options, dense_of = EXTENT_CASES[case]
    q, k, v = _inputs(2)
    want = _oracle(q, k, v, dense_of(extent), None)
    _run_or_refuse(backend, want, q, k, v, **options(extent))


def _alibi_bias(slopes: Tensor, offset: int) -> Tensor:
    """ALiBi's bias with the row's smallest distance subtracted in Python integers (softmax
    does not see a per-row constant), so a huge offset costs no float precision."""
    rows = []
    for q in range(N):
        distances = [abs(q + offset - kv) for kv in range(N)]
        nearest = min(distances)
        rows.append([d - nearest for d in distances])
    relative = torch.tensor(rows, dtype=torch.float64)  # (N, N)
    return -slopes.double().view(1, -1, 1, 1) * relative


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "auto"])
@pytest.mark.parametrize(
    "extent", [*HUGE, -(2**62), -sys.maxsize], ids=["+2**62", "+max", "-2**62", "-max"]
)
def test_huge_score_offsets_are_exact(backend: str, extent: int) -> None:
    q, k, v = _inputs(3)
    mod = scores.alibi(H, offset=extent)
    want = _oracle(q, k, v, None, _alibi_bias(mod.slopes, extent))
    _run_or_refuse(backend, want, q, k, v, bias=mod)

    rel = scores.RelativePositionBias(H, max_distance=4, offset=extent)
    with torch.no_grad():
        rel.table.copy_(torch.randn(H, 9, generator=torch.Generator().manual_seed(4)))
    bucket = 0 if extent > 0 else 8  # every key - query - offset is past the edge
    want = _oracle(q, k, v, None, rel.table.detach().double()[:, bucket].view(1, H, 1, 1))
    _run_or_refuse(backend, want, q, k, v, bias=rel)


# --- the description is what kernels read ---------------------------------------------------------


def test_kernel_form_of_or_and_not_matches_evaluation() -> None:
    # The lowered intervals keep exactly the keys the mask function keeps, per row and batch.
    lengths = torch.tensor([0, 7])
    cases = [
        masks.causal() | masks.sliding_window(0, 3),
        ~masks.sliding_window(2, 1, offset=4),
        (masks.prefix_lm([2, 5]) | masks.sliding_window(1, 1)) & ~masks.key_padding(lengths),
        ~(masks.causal(-3) | masks.key_padding([4, 2])),
        masks.query_padding([3, 21]) & ~masks.causal(),
    ]
    b, h, qi, ki = _grid()
    for mask in cases:
        lowered = mask.lower(B, N, N)
        assert not isinstance(lowered, str), (mask, lowered)
        assert lowered.lo is not None and lowered.hi is not None
        kv = torch.arange(N).view(1, 1, 1, N)
        lo, hi = lowered.lo[..., None], lowered.hi[..., None]  # (K, Bm, Nq, 1)
        kept = ((kv >= lo) & (kv < hi)).any(0)  # (1 or B, ...) -> (Bm, 1?, Nq, Nk)
        kept = kept.reshape(-1, N, N).expand(B, N, N)
        want = mask(b, h, qi, ki).expand(B, H, N, N)[:, 0]
        assert torch.equal(kept, want), mask


def test_opaque_masks_say_why_the_kernel_cannot_take_them() -> None:
    reason = masks.mask_function(causal(0), name="causal()").lower(B, N, N)
    assert isinstance(reason, str) and "of your own" in reason
    assert isinstance((masks.causal() | masks.document(IDS)).lower(B, N, N), str)


def test_every_builtin_factory_returns_a_described_mask() -> None:
    # A new mask kind overrides lower() and classify(); the opaque base class does neither.
    built = [
        masks.causal(),
        masks.sliding_window(3),
        masks.key_padding([3, 4]),
        masks.query_padding([3, 4]),
        masks.document(IDS),
        masks.prefix_lm(4),
        masks.dense(DENSE),
    ]
    for mask in built:
        assert type(mask).lower is not masks.MaskFn.lower, mask
        assert type(mask).classify is not masks.MaskFn.classify, mask
        assert not isinstance(mask.lower(B, N, N), str), mask
    assert inspect.getsource(masks).count("__qualname__") == 0


def _random_interval_mask(rng: torch.Generator, depth: int) -> masks.MaskFn:
    """A random &, |, ~ tree over the masks that lower to key intervals."""
    pick = int(torch.randint(0, 7 if depth > 0 else 4, (), generator=rng))
    small = lambda hi: int(torch.randint(0, hi, (), generator=rng))  # noqa: E731
    if pick == 0:
        return masks.causal(small(9) - 4)
    if pick == 1:
        return masks.sliding_window(small(5), small(5), offset=small(7) - 3)
    if pick == 2:
        return masks.key_padding([small(N + 1), small(N + 1)])
    if pick == 3:
        return masks.prefix_lm([small(N + 1), small(N + 1)])
    if pick == 4:
        return ~_random_interval_mask(rng, depth - 1)
    a, b = _random_interval_mask(rng, depth - 1), _random_interval_mask(rng, depth - 1)
    return a & b if pick == 5 else a | b


def test_random_combinations_lower_to_what_they_evaluate() -> None:
    # Every lowered form keeps exactly the evaluated keys, or says why it cannot be lowered
    # (more than MAX_INTERVALS intervals per row).
    rng = torch.Generator().manual_seed(11)
    b, h, qi, ki = _grid()
    kv = torch.arange(N).view(1, 1, 1, N)
    lowered_count = 0
    for _ in range(300):
        mask = _random_interval_mask(rng, 3)
        lowered = mask.lower(B, N, N)
        if isinstance(lowered, str):
            assert "intervals per query row" in lowered, (mask, lowered)
            continue
        lowered_count += 1
        want = mask(b, h, qi, ki).expand(B, H, N, N)[:, 0]
        if lowered.lo is None or lowered.hi is None:
            assert bool(want.all()), mask
            continue
        kept = ((kv >= lowered.lo[..., None]) & (kv < lowered.hi[..., None])).any(0)
        assert torch.equal(kept.reshape(-1, N, N).expand(B, N, N), want), mask
    assert lowered_count > 200


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the cpu kernel is not available")
def test_cpu_kernel_runs_random_combinations_exactly() -> None:
    rng = torch.Generator().manual_seed(12)
    q, k, v = _inputs(5)
    b, h, qi, ki = _grid()
    ran = 0
    while ran < 12:
        mask = _random_interval_mask(rng, 2)
        if isinstance(mask.lower(B, N, N), str):
            continue
        want = _oracle(q, k, v, mask(b, h, qi, ki).expand(B, H, N, N), None)
        got = qkv.attention(q, k, v, mask=mask, backend="cpu")
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        ran += 1


def test_wider_tiles_pooled_from_narrow_ones_equal_their_own_classification() -> None:
    # The cpu backend's census classifies the narrowest key tiles once and pools the wider ones.
    from qkv.backends.block_mask import _pool_columns, hinted_status

    n = 1000
    ids = torch.sort(torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(3))).values
    cases = [
        masks.sliding_window(100) & masks.causal(),
        masks.document(ids),
        masks.prefix_lm(130) | masks.sliding_window(5, 5),
        masks.key_padding([700]),
        masks.mask_function(lambda b, h, q, kv: kv <= q),  # opaque: UNKNOWN everywhere
    ]
    for mask in cases:
        narrow = hinted_status(mask, n, n, 64, 64)
        for factor in (2, 4):
            direct = hinted_status(mask, n, n, 64, 64 * factor)
            assert torch.equal(_pool_columns(narrow, factor), direct), (mask, factor)
