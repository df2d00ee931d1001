"""The fuzz cases of ``tests/test_fuzz.py`` and ``tests/test_fuzz_hostile.py``: drawing a case,
calling a backend on it, an independent float64 oracle, comparing and counting.

The oracle builds its masks and score modifiers from the case's *parameters* with plain torch
broadcasting (``kv_idx <= q_idx + offset``, ``q_ids[:, :, None] == k_ids[:, None, :]``, ...),
never through :mod:`qkv.masks`, :mod:`qkv.scores` or ``AttentionRequest.mask_tile``, so a bug
in the code the backends share cannot pass unnoticed; it applies qkv's rule for non-finite
inputs itself (a masked-out score never matters, an attended NaN or ``+inf`` score makes its
row NaN). Cases are drawn from a seeded ``random.Random``: random shapes (empty dims included),
grouped heads, every mask kind and combinations, tensor masks and biases of every broadcast
shape, ALiBi, softcap, learnable relative biases, custom scales, non-contiguous inputs, fully
masked rows, extreme logits and the float16 range limits.

Counts (run / not served / failed) are printed as ``fuzz {...}`` lines; set
``QKV_FUZZ_REPORT`` to a file path to also get them as JSON lines.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import qkv
from qkv import masks, scores
from qkv.backends import get_backend
from qkv.backends.chunked import chunked_attention
from qkv.request import build_request

EPS = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


# --- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """Everything one call is built from; both the qkv arguments and the oracle read it."""

    seed: int
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float | None
    causal: bool | str
    masks: list[dict[str, Any]] = field(default_factory=list)  # and-combined
    mask_tensor: Tensor | None = None
    bias_tensor: Tensor | None = None
    score: dict[str, Any] | None = None
    return_weights: bool = False

    def describe(self) -> str:
        kinds = [m["kind"] for m in self.masks]
        return (
            f"seed={self.seed} {str(self.dtype)[6:]} B={self.B} Hq={self.Hq} Hkv={self.Hkv} "
            f"Nq={self.Nq} Nk={self.Nk} D={self.D} Dv={self.Dv} causal={self.causal} "
            f"masks={kinds} tensor_mask={self.mask_tensor is not None} "
            f"bias={self.bias_tensor is not None} score={self.score and self.score['kind']} "
            f"scale={self.scale} weights={self.return_weights} "
            f"contiguous={self.q.is_contiguous() and self.k.is_contiguous()}"
        )


def _broadcast_shape(rng: random.Random, full: tuple[int, int, int, int]) -> tuple[int, ...]:
    """A shape that broadcasts to ``full``: some dims 1, maybe fewer dims."""
    shape = tuple(s if rng.random() < 0.6 else 1 for s in full)
    drop = rng.choice([0, 0, 0, 1, 2])
    while drop and shape and shape[0] == 1:
        shape, drop = shape[1:], drop - 1
    return shape


def _tensor(
    rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype, magnitude: float
) -> Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * magnitude
    if rng.random() < 0.25:  # non-contiguous: the same values through a transposed layout
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype)


def draw_case(seed: int, *, max_len: int = 80) -> Case:
    rng = random.Random(seed)
    dtype = rng.choices(
        [torch.float32, torch.float64, torch.float16, torch.bfloat16], [5, 2, 2, 1.5]
    )[0]
    empty = rng.random() < 0.06
    B = rng.choice([1, 1, 2, 3]) if not (empty and rng.random() < 0.3) else 0
    Hkv = rng.choice([1, 1, 2])
    Hq = Hkv * rng.choice([1, 1, 2, 3])
    Nq = rng.choice([1, 2, 5, rng.randint(1, max_len)])
    Nk = rng.choice([Nq, Nq, 1, 3, rng.randint(1, max_len)])
    if empty and B:
        if rng.random() < 0.5:
            Nk = 0
        else:
            Nq = 0
    D = rng.choice([1, 4, 8, 16, 64])
    Dv = rng.choice([1, 3, 8, D])
    regime = rng.choices(["normal", "extreme", "fp16-range"], [6, 2, 1.5])[0]
    q_mag = k_mag = 1.0
    v_mag = 1.0
    if regime == "extreme":  # logits of 1e2..1e4: near one-hot rows, large row maxima
        target = 10 ** rng.uniform(2, 4 if dtype in (torch.float32, torch.float64) else 3.5)
        q_mag = k_mag = math.sqrt(target / math.sqrt(D))
    elif regime == "fp16-range":  # scaled logits and values near float16's limits
        limit = 3e4 if dtype == torch.float16 else 3e5
        q_mag = k_mag = math.sqrt(limit / 8 / math.sqrt(D))
        v_mag = 1e4 if dtype == torch.float16 else 1e5
    if dtype == torch.float16:
        # Keep every scaled logit (and a few sigma of q, k) inside the float16 range.
        q_mag = min(q_mag, math.sqrt(6e4 / 20 / math.sqrt(D)))
        k_mag = q_mag
    q = _tensor(rng, (B, Hq, Nq, D), dtype, q_mag)
    k = _tensor(rng, (B, Hkv, Nk, D), dtype, k_mag)
    v = _tensor(rng, (B, Hkv, Nk, Dv), dtype, v_mag)
    if rng.random() < 0.1 and D > 1:  # non-contiguous in the last dim: every other feature
        wide = _tensor(rng, (B, Hq, Nq, 2 * D), dtype, q_mag)
        q = wide[..., ::2]
    scale = None if rng.random() < 0.7 else rng.choice([0.05, 0.3, 1.0, 2.0])
    causal: bool | str = rng.choice([False, False, False, True, "top_left", "bottom_right"])
    case = Case(seed, dtype, B, Hq, Hkv, Nq, Nk, D, Dv, q, k, v, scale, causal)

    for _ in range(rng.choice([0, 0, 1, 1, 1, 2])):
        case.masks.append(_draw_mask(rng, case))
    if rng.random() < 0.15:
        shape = _broadcast_shape(rng, (B, Hq, Nq, Nk))
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        case.mask_tensor = torch.rand(shape, generator=g) < rng.uniform(0.2, 0.9)
    if rng.random() < 0.15:
        shape = _broadcast_shape(rng, (B, Hq, Nq, Nk))
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        case.bias_tensor = (torch.randn(shape, generator=g) * 2).to(dtype)
    if case.bias_tensor is None and rng.random() < 0.25:  # bias= takes one or the other
        case.score = _draw_score(rng, case)
    case.return_weights = rng.random() < 0.15
    return case


def _lengths(rng: random.Random, B: int, limit: int) -> list[int]:
    count = rng.choice([1, B]) if B else 1
    return [rng.randint(0, limit) for _ in range(count)]


def _draw_mask(rng: random.Random, case: Case) -> dict[str, Any]:
    B, Nq, Nk = case.B, case.Nq, case.Nk
    kind = rng.choice(
        ["key_padding", "query_padding", "window", "prefix", "document", "dense", "custom", "not"]
    )
    if kind == "key_padding":
        return {"kind": kind, "lengths": _lengths(rng, B, Nk)}
    if kind == "query_padding":
        return {"kind": kind, "lengths": _lengths(rng, B, Nq)}
    if kind == "window":
        return {
            "kind": kind,
            "left": rng.randint(0, 8),
            "right": rng.choice([0, 0, rng.randint(0, 8)]),
            "offset": rng.choice([0, 0, Nk - Nq]),
        }
    if kind == "prefix":
        if rng.random() < 0.5:
            return {"kind": kind, "lengths": rng.randint(0, Nk + 2)}
        return {"kind": kind, "lengths": _lengths(rng, B, Nk)}
    if kind == "document":
        rows = rng.choice([1, B]) if B else 1
        docs = rng.randint(1, 4)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        q_ids = torch.randint(0, docs, (rows, Nq), generator=g)
        k_ids = torch.randint(0, docs, (rows, Nk), generator=g)
        if rng.random() < 0.5:  # packed: sorted ids
            q_ids, k_ids = q_ids.sort(-1).values, k_ids.sort(-1).values
        return {"kind": kind, "q_ids": q_ids, "k_ids": k_ids}
    if kind == "dense":
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        shape = _broadcast_shape(rng, (B, case.Hq, Nq, Nk))
        return {"kind": kind, "tensor": torch.rand(shape, generator=g) < 0.6}
    if kind == "custom":  # a plain function of the user's
        return {"kind": kind, "modulus": rng.randint(2, 4)}
    return {"kind": kind, "lengths": _lengths(rng, B, Nk)}  # ~key_padding: only the tail


def _draw_score(rng: random.Random, case: Case) -> dict[str, Any]:
    kind = rng.choice(["alibi", "softcap", "chain", "relative"])
    out: dict[str, Any] = {"kind": kind, "offset": rng.choice([0, case.Nk - case.Nq])}
    if kind in ("softcap", "chain"):
        out["cap"] = rng.choice([0.5, 5.0, 30.0])
    if kind == "relative":
        out["max_distance"] = rng.randint(0, 6)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        out["table"] = torch.randn(case.Hq, 2 * out["max_distance"] + 1, generator=g)
    return out


# --- the qkv call ---------------------------------------------------------------------------------


def qkv_arguments(case: Case) -> dict[str, Any]:
    """The case as ``qkv.attention`` keyword arguments (through qkv's own mask helpers)."""
    parts: list[Any] = []
    for m in case.masks:
        kind = m["kind"]
        if kind == "key_padding":
            parts.append(masks.key_padding(m["lengths"]))
        elif kind == "query_padding":
            parts.append(masks.query_padding(m["lengths"]))
        elif kind == "window":
            parts.append(masks.sliding_window(m["left"], m["right"], offset=m["offset"]))
        elif kind == "prefix":
            parts.append(masks.prefix_lm(m["lengths"]))
        elif kind == "document":
            parts.append(masks.document(m["q_ids"], m["k_ids"]))
        elif kind == "dense":
            parts.append(masks.dense(m["tensor"]))
        elif kind == "custom":
            mod = m["modulus"]
            parts.append(lambda b, h, q, kv, mod=mod: (q + 2 * kv + h) % mod != 0)
        else:
            parts.append(~masks.key_padding(m["lengths"]))
    mask: Any = None
    if parts:
        mask = parts[0] if len(parts) == 1 else masks.and_masks(*parts)
    if case.mask_tensor is not None:
        mask = case.mask_tensor if mask is None else masks.dense(case.mask_tensor) & mask
    bias: Any = case.bias_tensor
    if case.score is not None:
        s = case.score
        if s["kind"] == "alibi":
            bias = scores.alibi(case.Hq, offset=s["offset"])
        elif s["kind"] == "softcap":
            bias = scores.softcap(s["cap"])
        elif s["kind"] == "chain":
            bias = scores.chain(scores.alibi(case.Hq, offset=s["offset"]), scores.softcap(s["cap"]))
        else:
            rel = scores.RelativePositionBias(case.Hq, s["max_distance"], offset=s["offset"])
            with torch.no_grad():
                rel.table.copy_(s["table"])
            bias = rel
    return {
        "mask": mask,
        "bias": bias,
        "causal": case.causal,
        "scale": case.scale,
        "return_weights": case.return_weights,
    }


# --- the oracle: plain float64 torch from the parameters -------------------------------------------


def _slopes(n: int) -> list[float]:
    """ALiBi slopes as in the paper's reference code, written out here."""

    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n - closest]


def _rows(values: Tensor, B: int) -> Tensor:
    """A per-batch parameter of 1 or B rows as B rows."""
    return values.expand(B, *values.shape[1:]) if values.shape[0] == 1 else values


def oracle(case: Case) -> tuple[Tensor, Tensor]:
    """``out (B, Hq, Nq, Dv)`` and ``weights (B, Hq, Nq, Nk)`` in float64."""
    B, Hq, Nq, Nk, D = case.B, case.Hq, case.Nq, case.Nk, case.D
    G = Hq // case.Hkv
    q, k, v = case.q.double(), case.k.double(), case.v.double()
    k = k.repeat_interleave(G, dim=1)  # query head h reads key/value head h // G
    v = v.repeat_interleave(G, dim=1)
    scale = case.scale if case.scale is not None else 1 / math.sqrt(D)
    s = q @ k.transpose(-1, -2) * scale  # (B, Hq, Nq, Nk)
    i = torch.arange(Nq).view(1, 1, Nq, 1)
    j = torch.arange(Nk).view(1, 1, 1, Nk)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    allowed = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    if case.causal in (True, "top_left"):
        allowed &= j <= i
    elif case.causal == "bottom_right":
        allowed &= j <= i + (Nk - Nq)
    for m in case.masks:
        kind = m["kind"]
        if kind in ("key_padding", "not"):
            lengths = _rows(torch.tensor(m["lengths"]).view(-1, 1, 1, 1), B)
            part = j < lengths
            allowed &= part if kind == "key_padding" else ~part
        elif kind == "query_padding":
            allowed &= i < _rows(torch.tensor(m["lengths"]).view(-1, 1, 1, 1), B)
        elif kind == "window":
            distance = i + m["offset"] - j
            allowed &= (distance <= m["left"]) & (distance >= -m["right"])
        elif kind == "prefix":
            lengths = torch.tensor(m["lengths"]).view(-1, 1, 1, 1)
            allowed &= (j < _rows(lengths, B)) | (j <= i)
        elif kind == "document":
            q_ids, k_ids = _rows(m["q_ids"], B), _rows(m["k_ids"], B)
            allowed &= (q_ids[:, None, :, None] == k_ids[:, None, None, :]).expand_as(allowed)
        elif kind == "dense":
            allowed &= m["tensor"]
        elif kind == "custom":
            allowed &= (i + 2 * j + h) % m["modulus"] != 0
    if case.mask_tensor is not None:
        allowed &= case.mask_tensor
    if case.bias_tensor is not None:
        s = s + case.bias_tensor.double()
    if case.score is not None:
        sc = case.score
        distance = (i + sc["offset"] - j).abs().double()
        if sc["kind"] in ("alibi", "chain"):
            slopes = torch.tensor(_slopes(Hq), dtype=torch.float64).view(1, Hq, 1, 1)
            s = s - slopes * distance
        if sc["kind"] in ("softcap", "chain"):
            s = sc["cap"] * torch.tanh(s / sc["cap"])
        if sc["kind"] == "relative":
            md = sc["max_distance"]
            rel = (j - i - sc["offset"]).clamp(-md, md) + md  # (1, 1, Nq, Nk)
            table = sc["table"].double()  # (Hq, 2 md + 1)
            s = s + table[h.expand(1, Hq, Nq, Nk), rel.expand(1, Hq, Nq, Nk)]
    if Nk == 0:  # no keys: zeros, and no probabilities
        return s @ v, s  # (B, Hq, Nq, 0) @ (B, Hq, 0, Dv): zeros, and zero gradients
    s = s.masked_fill(~allowed, -math.inf)  # a masked-out score never matters, NaN included
    # An attended NaN or +inf score makes its row NaN (qkv.attention's rule for non-finite
    # inputs); an attended -inf score has probability 0, and a row of them gives zeros.
    poisoned = (s.isnan() | (s == math.inf)).any(-1, keepdim=True)
    scored = s != -math.inf  # attended keys whose score is not -inf
    s = s.masked_fill(poisoned, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros(()).double())
    e = torch.exp(s - row_max)
    total = e.sum(-1, keepdim=True)
    weights = e / torch.where(total > 0, total, torch.ones(()).double())
    # NaN where a poisoned row attends (a -inf score has weight 0 in any row), 0 at its masked
    # keys: dV is NaN exactly at the keys a NaN row attends.
    weights = torch.where(poisoned & scored, math.nan, weights)
    return weights @ v, weights


# --- running and comparing -------------------------------------------------------------------------


def tolerance(case: Case) -> float:
    """Allowed |out - oracle|: the dtype's rounding of the output and probabilities, plus the
    logit rounding error (``eps * scale * |q| |k|``, a Lipschitz bound of softmax)."""
    eps = EPS[case.dtype]
    if case.q.numel() == 0 or case.v.numel() == 0:
        return 0.0
    v_max = float(case.v.double().abs().max())
    scale = abs(case.scale) if case.scale is not None else 1 / math.sqrt(case.D)
    # Norms of the finite entries: rows with NaN or inf are compared by their NaN pattern.
    q_norm = float(finite_part(case.q).norm(dim=-1).max())
    k_norm = float(finite_part(case.k).norm(dim=-1).max())
    logit_error = 4 * eps * scale * q_norm * k_norm
    if case.bias_tensor is not None:
        logit_error += 4 * eps * float(case.bias_tensor.double().abs().max())
    if case.score is not None:
        logit_error += 4 * eps * (case.Nq + case.Nk + 30)  # ALiBi distances, tables, caps
    base = 1e-12 if case.dtype == torch.float64 else 8 * eps
    return (base + 2 * logit_error) * max(v_max, 1e-30) + 1e-12


def finite_part(t: Tensor) -> Tensor:
    """``t`` in float64 with NaN and inf entries replaced by 0."""
    return t.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def run_backend(case: Case, name: str) -> tuple[Tensor, Tensor | None] | str:
    """The backend's ``(out, weights)``, or the reason it does not serve the case."""
    kwargs = qkv_arguments(case)
    request = build_request(case.q, case.k, case.v, **kwargs)
    if name == "chunked-tiles":  # several tiles per row and column, on small inputs too
        return chunked_attention(request, tile_q=8, tile_kv=16)
    if name != "auto":
        reason = get_backend(name).supports(request)
        if reason is not None:
            return reason
    result = qkv.attention(case.q, case.k, case.v, backend=name, **kwargs)
    return result if isinstance(result, tuple) else (result, None)


@dataclass
class Tally:
    run: int = 0
    not_served: int = 0
    failed: list[str] = field(default_factory=list)


def compare(case: Case, name: str) -> str | None:
    """None if the backend agrees with the oracle (or does not serve), else what differs."""
    result = run_backend(case, name)
    if isinstance(result, str):
        return "not served"
    out, weights = result[0].detach(), None if result[1] is None else result[1].detach()
    expected_out, expected_weights = oracle(case)
    if out.shape != expected_out.shape or out.dtype != case.dtype:
        return f"out {tuple(out.shape)} {out.dtype}, expected {tuple(expected_out.shape)}"
    nan_rows = expected_out.isnan()  # whole rows: an attended NaN score
    if not torch.equal(out.isnan(), nan_rows):
        wrong = int((out.isnan() != nan_rows).any(-1).sum())
        return f"NaN in {wrong} rows where the rule says otherwise ({int(nan_rows.any(-1).sum())} NaN rows expected)"
    if not torch.isfinite(out[~nan_rows]).all():
        return "non-finite output"
    tol = tolerance(case)
    error = (
        float((out.double() - expected_out)[~nan_rows].abs().max()) if (~nan_rows).any() else 0.0
    )
    if error > tol:
        return f"max |out - oracle| = {error:.3g} > {tol:.3g}"
    if case.return_weights and weights is not None:
        v_max = float(case.v.double().abs().max()) if case.v.numel() else 1.0
        w_tol = 8 * EPS[case.dtype] + tol / max(v_max, 1e-30)
        finite_rows = ~expected_weights.isnan().any(-1, keepdim=True).expand_as(expected_weights)
        w_diff = (weights.double() - expected_weights)[finite_rows]
        w_error = float(w_diff.abs().max()) if w_diff.numel() else 0.0
        if w_error > w_tol:
            return f"max |weights - oracle| = {w_error:.3g} > {w_tol:.3g}"
    return None


def fuzz(name: str, seeds: range) -> Tally:
    tally = Tally()
    for seed in seeds:
        case = draw_case(seed)
        try:
            problem = compare(case, name)
        except Exception as error:  # a crash is a failure, reported with the case
            problem = f"raised {type(error).__name__}: {error}"
        if problem == "not served":
            tally.not_served += 1
            continue
        tally.run += 1
        if problem is not None:
            tally.failed.append(f"{problem} | {case.describe()}")
    return tally


def report(name: str, lane: str, tally: Tally) -> None:
    line = {
        "backend": name,
        "lane": lane,
        "run": tally.run,
        "not_served": tally.not_served,
        "failed": len(tally.failed),
    }
    print(f"fuzz {json.dumps(line)}")
    path = os.environ.get("QKV_FUZZ_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def skip_unavailable(name: str) -> None:
    if name == "triton":
        probe = build_request(*(torch.zeros(1, 1, 1, 8) for _ in range(3)))
        reason = get_backend("triton").supports(probe)
        if reason is not None:
            pytest.skip(f"triton: {reason}")
