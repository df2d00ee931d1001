"""Hostile inputs for every CPU backend, against the float64 oracle of ``tests/fuzz_cases.py``.

Five lanes, each drawn from seeded cases and counted per backend (run / not served / failed,
printed as ``fuzz {...}`` lines and appended to ``QKV_FUZZ_REPORT`` when set):

- ``nan``: NaN or inf in ``q`` or ``k``, in single rows and in blocks that fill whole key or
  query tiles (16 wide for chunked-tiles, 64 to 256 for cpu and chunked), on every path ``auto``
  can take: no mask, ``is_causal``, windows, documents, padding, and long windowed or document
  calls where ``auto`` picks the cpu kernel. The oracle applies the rule: a masked-out score never
  matters, an attended NaN or ``+inf`` score makes its row NaN.
- ``scale``: causal calls (both alignments, with and without other masks) at scale 0 and
  negative scales.
- ``malformed``: mask functions that return the wrong shape or dtype, or index out of range,
  on real tiles; the call must raise an error that names the mask.
- ``create_graph``: second-order gradients (``create_graph=True``) against autograd through the
  oracle, or a clear refusal, never a gradient that silently lacks its graph.
- ``half-range``: float16 and bfloat16 scaled logits from 2e4 up to past float16's 65,504.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from torch import Tensor

import qkv
from fuzz_cases import (
    EPS,
    Case,
    Tally,
    compare,
    draw_case,
    oracle,
    qkv_arguments,
    report,
    run_backend,
    skip_unavailable,
)
from qkv import masks
from qkv.backends import get_backend
from qkv.backends.chunked import chunked_attention
from qkv.request import build_request

BACKENDS = ["reference", "chunked", "chunked-tiles", "sdpa", "cpu", "auto", "triton"]
NAN_CASES = 160
NAN_GRAD_CASES = 50
SCALE_CASES = 60
MALFORMED_CASES = 40
CREATE_GRAPH_CASES = 30
HALF_CASES = 60


def _tally(name: str, lane: str, cases: list[Any], check: Any) -> Tally:
    """Run ``check(case, name)`` on every case: None passes, "not served" is counted apart."""
    tally = Tally()
    for case in cases:
        try:
            problem = check(case, name)
        except Exception as error:  # a crash is a failure, reported with the case
            problem = f"raised {type(error).__name__}: {error}"
        if problem == "not served":
            tally.not_served += 1
            continue
        tally.run += 1
        if problem is not None:
            tally.failed.append(f"{problem} | {case.describe()}")
    report(name, lane, tally)
    return tally


def _assert_clean(tally: Tally, minimum: int) -> None:
    assert tally.run >= minimum, f"only {tally.run} cases ran"
    assert not tally.failed, f"{len(tally.failed)} of {tally.run} failed:\n" + "\n".join(
        tally.failed[:10]
    )


# --- NaN and inf ------------------------------------------------------------------------------


def _long_case(rng: random.Random, seed: int) -> Case:
    """A call long enough for ``auto`` to pick the cpu kernel: a window or documents."""
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    Hq = rng.choice([1, 2])
    N = rng.randint(520, 700)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, Hq, N, 16, generator=g, dtype=torch.float64) for _ in range(3))
    case = Case(seed, dtype, 1, Hq, Hq, N, N, 16, 16, q.to(dtype), k.to(dtype), v.to(dtype),
                None, rng.choice([False, True]))  # fmt: skip
    if rng.random() < 0.5:
        case.masks.append({"kind": "window", "left": rng.randint(8, 64), "right": 0, "offset": 0})
    else:
        ids = (torch.arange(N) // rng.randint(40, 200))[None]
        case.masks.append({"kind": "document", "q_ids": ids, "k_ids": ids})
    return case


def _poison(rng: random.Random, case: Case) -> Case:
    """The case with NaN or inf written over a row or a tile-sized block of ``q`` or ``k``."""
    q, k = case.q.clone(), case.k.clone()
    target = rng.choice(["q", "k", "k"])
    x = q if target == "q" else k
    if x.numel() == 0:
        return case
    value = rng.choice([math.nan, math.nan, math.inf, -math.inf])
    n = x.shape[2]
    width = rng.choice([1, 1, 16, 64, 128, 256])
    start = rng.randrange(0, n, width) if width > 1 else rng.randrange(n)
    rows = slice(start, min(n, start + width))
    b = rng.randrange(x.shape[0]) if rng.random() < 0.5 else slice(None)
    h = rng.randrange(x.shape[1]) if rng.random() < 0.5 else slice(None)
    if rng.random() < 0.3:  # one feature: inf * k can be +inf or -inf by the sign of k
        x[b, h, rows, rng.randrange(x.shape[3])] = value
    else:
        x[b, h, rows] = value
    return Case(**{**case.__dict__, "q": q, "k": k, "return_weights": False})


def nan_cases() -> list[Case]:
    cases = []
    for seed in range(NAN_CASES):
        rng = random.Random(10_000 + seed)
        case = _long_case(rng, seed) if rng.random() < 0.12 else draw_case(10_000 + seed)
        cases.append(_poison(rng, case))
    return cases


def test_nan_lane_poisons_rows_the_oracle_says() -> None:
    """The lane is not vacuous: many cases have NaN rows, and masked-out NaN leaves rows finite."""
    nan_rows = finite_with_nan_inputs = 0
    for case in nan_cases():
        out, _ = oracle(case)
        poisoned_inputs = not (torch.isfinite(case.q).all() and torch.isfinite(case.k).all())
        nan_rows += bool(out.isnan().any())
        finite_with_nan_inputs += bool(poisoned_inputs and out.numel() and not out.isnan().any())
    assert nan_rows > NAN_CASES // 3
    assert finite_with_nan_inputs > 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_nan_and_inf_follow_the_rule(backend: str) -> None:
    skip_unavailable(backend)
    tally = _tally(backend, "nan", nan_cases(), compare)
    _assert_clean(tally, NAN_CASES // 5 if backend == "cpu" else NAN_CASES // 2)


def check_nan_value_gradient(case: Case, name: str) -> str | None:
    """dV of a poisoned case: NaN exactly at the keys a NaN row attends, elsewhere autograd
    through the oracle (dQ and dK of non-finite rows are not specified)."""
    g = torch.Generator().manual_seed(case.seed)
    grad_out = torch.randn(case.B, case.Hq, case.Nq, case.Dv, generator=g, dtype=torch.float64)
    v = case.v.detach().clone().requires_grad_()
    result = run_backend(Case(**{**case.__dict__, "v": v}), name)
    if isinstance(result, str):
        return "not served"
    (got,) = torch.autograd.grad(result[0], v, grad_out.to(case.dtype), allow_unused=True)
    ref_v = case.v.detach().double().requires_grad_()
    expected_out, _ = oracle(Case(**{**case.__dict__, "v": ref_v}))
    (want,) = torch.autograd.grad(expected_out, ref_v, grad_out, allow_unused=True)
    got = torch.zeros_like(want) if got is None else got.double()
    want = torch.zeros_like(got) if want is None else want
    if not torch.equal(got.isnan().any(-1), want.isnan().any(-1)):
        return f"dV NaN at {int(got.isnan().any(-1).sum())} keys, expected {int(want.isnan().any(-1).sum())}"
    finite = ~want.isnan()
    error = float((got - want)[finite].abs().max()) if finite.any() else 0.0
    scale = float(want[finite].abs().max()) + float(grad_out.abs().max()) if finite.any() else 1.0
    limit = 2000 * EPS[case.dtype] * scale + 1e-12
    return None if error <= limit else f"dV: max error {error:.3g} > {limit:.3g}"


def nan_gradient_cases() -> list[Case]:
    """Poisoned cases in float32/float64 at ordinary magnitudes (keys and queries below 8)."""
    out = []
    for case in nan_cases():
        q, k = case.q.double().nan_to_num(0, 0, 0), case.k.double().nan_to_num(0, 0, 0)
        ordinary = q.numel() and k.numel() and q.abs().max() < 8 and k.abs().max() < 8
        if case.dtype in (torch.float32, torch.float64) and ordinary:
            out.append(case)
    return out[:NAN_GRAD_CASES]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_fuzz_nan_value_gradients_reach_exactly_the_attended_keys(backend: str) -> None:
    tally = _tally(backend, "nan-grad", nan_gradient_cases(), check_nan_value_gradient)
    # sdpa declines CPU training calls with non-finite q or k (their logits are unbounded)
    few = backend in ("cpu", "sdpa")
    _assert_clean(tally, NAN_GRAD_CASES // 10 if few else NAN_GRAD_CASES // 2)


# --- zero and negative scales with causal -------------------------------------------------------


def _plain_case(rng: random.Random, like: Case) -> Case:
    """A causal call with nothing else, shaped for PyTorch's CPU flash kernel (no grouped heads,
    ``Dv = D``), which is the one that scaled its ``-inf`` mask: NaN rows at scale 0."""
    B, H, D = rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice([4, 8, 16, 64])
    Nq = rng.randint(2, 80)
    Nk = Nq if like.causal != "bottom_right" or rng.random() < 0.5 else rng.randint(Nq, 96)
    g = torch.Generator().manual_seed(like.seed)
    q, k, v = (
        torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(like.dtype)
        for n in (Nq, Nk, Nk)
    )
    return Case(like.seed, like.dtype, B, H, H, Nq, Nk, D, D, q, k, v, like.scale, like.causal)


def scale_cases() -> list[Case]:
    cases = []
    for seed in range(SCALE_CASES):
        rng = random.Random(20_000 + seed)
        case = draw_case(20_000 + seed)
        case.scale = rng.choice([0.0, 0.0, -0.05, -0.3, -1.0])
        case.causal = rng.choice([True, "top_left", "bottom_right"])
        case.return_weights = False  # SDPA serves the rest
        if rng.random() < 0.5:  # plain causal: SDPA's is_causal path, on its flash kernel
            case = _plain_case(rng, case)
        cases.append(case)
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_causal_with_zero_and_negative_scales(backend: str) -> None:
    skip_unavailable(backend)
    tally = _tally(backend, "scale", scale_cases(), compare)
    _assert_clean(tally, SCALE_CASES // 5 if backend == "cpu" else SCALE_CASES // 2)


# --- malformed mask functions ------------------------------------------------------------------

_TABLE = torch.tensor([True, False, True])  # a 3-entry lookup, for calls with Nk > 3

MALFORMED = {
    "fixed (2, 2)": lambda b, h, q, kv: torch.ones(2, 2, dtype=torch.bool),
    "first two keys": lambda b, h, q, kv: kv[..., :2] <= q,
    "first three keys": lambda b, h, q, kv: kv[..., :3] <= q,
    "short table": lambda b, h, q, kv: _TABLE[kv] & (q >= 0),
    "(Tk, Tq)": lambda b, h, q, kv: kv.transpose(-1, -2) <= q.transpose(-1, -2),
    "float on tiles": lambda b, h, q, kv: (kv <= q) if q.shape[-2] <= 2 else (kv <= q).float(),
}


def malformed_cases() -> list[Case]:
    cases = []
    seed = 30_000
    while len(cases) < MALFORMED_CASES:
        seed += 1
        case = draw_case(seed)
        if 0 in (case.B, case.Hq) or case.Nq < 4 or case.Nk < 4:
            continue  # the malformation shows only on calls of some size
        rng = random.Random(seed)
        name = rng.choice(sorted(MALFORMED))
        # Other masks that might hide every tile (so that a tiled backend rightly never
        # evaluates the malformed one) are left out.
        case.masks = [m for m in case.masks if m["kind"] in ("window", "dense", "prefix")]
        case.masks.append({"kind": "malformed", "name": name})
        cases.append(case)
    return cases


def check_malformed(case: Case, name: str) -> str | None:
    """None when the call raises an error naming the mask; else what happened."""
    bad = next(m["name"] for m in case.masks if m["kind"] == "malformed")
    others = [m for m in case.masks if m["kind"] != "malformed"]
    kwargs = qkv_arguments(Case(**{**case.__dict__, "masks": others}))
    malformed = masks.mask_function(MALFORMED[bad], "malformed")
    rest = kwargs["mask"]
    if isinstance(rest, Tensor):
        rest = masks.dense(rest)
    kwargs["mask"] = malformed if rest is None else malformed & rest
    try:
        request = build_request(case.q, case.k, case.v, **kwargs)  # the corner check
        if name == "chunked-tiles":
            chunked_attention(request, tile_q=8, tile_kv=16)
        else:
            if name != "auto" and get_backend(name).supports(request) is not None:
                return "not served"
            qkv.attention(case.q, case.k, case.v, backend=name, **kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)  # names the malformed mask, alone or in its combination
        if message.startswith("mask: the mask function") and "malformed" in message:
            return None
        return f"an error that does not name the mask: {type(error).__name__}: {error}"
    return "ran without error"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_malformed_mask_functions_are_named(backend: str) -> None:
    skip_unavailable(backend)
    tally = _tally(backend, "malformed", malformed_cases(), check_malformed)
    _assert_clean(tally, 0 if backend == "cpu" else MALFORMED_CASES // 2)


# --- second-order gradients ----------------------------------------------------------------------


def create_graph_cases() -> list[Case]:
    cases = []
    seed = 40_000
    while len(cases) < CREATE_GRAPH_CASES:
        seed += 1
        case = draw_case(seed, max_len=24)
        ordinary = case.q.numel() and float(case.q.double().abs().max()) < 8
        if case.dtype not in (torch.float32, torch.float64) or not ordinary or case.Nk == 0:
            continue
        if case.score is not None and case.score["kind"] == "relative":
            continue  # the table's second-order gradient is covered by test_double_backward
        case.return_weights = False
        cases.append(case)
    return cases


def check_create_graph(case: Case, name: str) -> str | None:
    """Gradient of ``|dQ . w1|`` + ``|dK . w2|`` style penalties: the backend's against autograd
    through the float64 oracle, or "not served" for a clear refusal."""
    g = torch.Generator().manual_seed(case.seed)
    grad_out = torch.randn(case.B, case.Hq, case.Nq, case.Dv, generator=g, dtype=torch.float64)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (case.q, case.k)]

    def penalised(c: Case, leaves: list[Tensor], backend: str | None) -> list[Tensor] | str:
        run = Case(**{**c.__dict__, "q": leaves[0], "k": leaves[1], "v": leaves[2]})
        result = oracle(run) if backend is None else run_backend(run, backend)
        if isinstance(result, str):
            return "not served"
        out = result[0]
        first = torch.autograd.grad(
            out, leaves[:2], grad_out.to(out.dtype), create_graph=True, allow_unused=True
        )
        if any(f is None or not f.requires_grad for f in first):
            return "a first-order gradient came back without its graph"
        penalty = sum((f * w.to(f.dtype)).sum() for f, w in zip(first, weights, strict=True))
        second = torch.autograd.grad(penalty, leaves, allow_unused=True)
        return [
            torch.zeros_like(x) if s is None else s for s, x in zip(second, leaves, strict=True)
        ]

    leaves = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v)]
    try:
        got = penalised(case, leaves, name)
    except RuntimeError as error:  # a clear refusal: PyTorch's SDPA, dropout
        message = str(error)
        if "not implemented" in message or "not supported by backend" in message:
            return "not served"
        raise
    if isinstance(got, str):
        return got
    ref = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    want = penalised(case, ref, None)
    assert not isinstance(want, str)
    eps = EPS[case.dtype]
    for label, a, b in zip("qkv", got, want, strict=True):
        scale = float(b.abs().max()) + 1.0
        error = float((a.double() - b).abs().max())
        if not math.isfinite(error) or error > 5000 * eps * scale:
            return f"second-order d{label}: max error {error:.3g} > {5000 * eps * scale:.3g}"
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_create_graph_is_right_or_refused(backend: str) -> None:
    skip_unavailable(backend)
    tally = _tally(backend, "create_graph", create_graph_cases(), check_create_graph)
    expected = {"sdpa": 0, "cpu": CREATE_GRAPH_CASES // 5}
    _assert_clean(tally, expected.get(backend, CREATE_GRAPH_CASES // 2))


# --- half precision near the range ----------------------------------------------------------------


def half_cases() -> list[Case]:
    cases = []
    for seed in range(HALF_CASES):
        rng = random.Random(50_000 + seed)
        dtype = rng.choice([torch.float16, torch.bfloat16])
        D = rng.choice([8, 16])
        target = 10 ** rng.uniform(math.log10(2e4), math.log10(1.5e5))  # typical |scaled logit|
        magnitude = math.sqrt(target)  # with the default scale 1/sqrt(D)
        Hkv = rng.choice([1, 2])
        Hq, N = Hkv * rng.choice([1, 2]), rng.randint(1, 60)
        Nk = rng.choice([N, rng.randint(1, 60)])
        g = torch.Generator().manual_seed(seed)
        q = (torch.randn(1, Hq, N, D, generator=g, dtype=torch.float64) * magnitude).to(dtype)
        k = (torch.randn(1, Hkv, Nk, D, generator=g, dtype=torch.float64) * magnitude).to(dtype)
        v = torch.randn(1, Hkv, Nk, 8, generator=g, dtype=torch.float64).to(dtype)
        causal = rng.choice([False, False, True, "bottom_right"])
        case = Case(50_000 + seed, dtype, 1, Hq, Hkv, N, Nk, D, 8, q, k, v, None, causal)
        if rng.random() < 0.3:
            case.masks.append(
                {"kind": "window", "left": rng.randint(0, 8), "right": 0, "offset": 0}
            )
        cases.append(case)
    return cases


def check_half(case: Case, name: str) -> str | None:
    """Every backend multiplies half inputs in float32: the output is finite and within the
    float32 logit rounding (``4 eps32 * max_ij sum_d |q_id k_jd| * scale``, twice, as a Lipschitz
    bound of softmax) plus half-precision output rounding."""
    result = run_backend(case, name)
    if isinstance(result, str):
        return "not served"
    out = result[0].detach()
    expected, _ = oracle(case)
    if not torch.isfinite(out).all():
        return "non-finite output"
    scale = 1 / math.sqrt(case.D)
    q, k = case.q.double().abs(), case.k.double().abs()
    G = case.Hq // case.Hkv
    spread = float((q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)).max()) * scale
    v_max = float(case.v.double().abs().max())
    tol = (8 * EPS[case.dtype] + 2 * 4 * 2.0**-23 * spread) * v_max
    error = float((out.double() - expected).abs().max())
    return None if error <= tol else f"max |out - oracle| = {error:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_half_precision_logits_near_the_range(backend: str) -> None:
    skip_unavailable(backend)
    tally = _tally(backend, "half-range", half_cases(), check_half)
    _assert_clean(tally, HALF_CASES // 5 if backend == "cpu" else HALF_CASES // 2)
