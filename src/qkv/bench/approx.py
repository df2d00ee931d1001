r"""``qkv bench approx``: approximate attention (:mod:`qkv.approx`) against exact, on one machine.

Four parts, each a table (and one plot) in ``docs/efficient.md``:

- **error** -- relative output error ``||o~ - o||_F / ||o||_F`` and the mean row KL divergence
  ``KL(P~ || P)`` of the implied attention rows (where an approximation has rows: not Nystrom,
  whose implied matrix can be negative; not Linformer, whose rows are over projected keys) vs
  its knob (features, landmarks, window, block), on real activations (``q, k, v`` captured from
  the sentiment classifier trained in the task part, run over real reviews concatenated to
  ``real_n`` tokens) and on synthetic Gaussian ``q, k, v`` of ``error_n`` tokens, with the
  time of one call beside it (the plot: error vs cost).
- **speed** -- forward time (median of ``repeats`` after a warm-up) and peak extra resident
  memory (sampled during the first call) vs N, each case in a fresh process, against exact attention through ``auto`` and
  through ``chunked``; the crossover N from which each approximation is faster than both.
- **task** -- the sentiment classifier (``builtin:rt``) trained with each attention for the same
  wall-clock budget, several seeds; test accuracy mean and spread; BPE tokens (N ~ 30) and
  characters (N ~ 120, the long-sequence variant).
- **drop-in** -- the classifier trained with exact attention, evaluated with each approximation
  swapped in (:func:`qkv.approx.swap_attention`) without retraining. With ``--model FOLDER``
  (a fine-tuned pretrained classifier) it is that model instead, on the Rotten Tomatoes test
  split, at the settings of :data:`PRETRAINED_METHODS` (:func:`pretrained_dropin`), and nothing
  is trained. :func:`dropin_accuracy` is the hook for any other model and score.

Sizes: :class:`LabSizes` (defaults: under 30 minutes on a 2-core CPU); ``--quick`` for tests.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qkv
from qkv import approx

__all__ = [
    "PRETRAINED_METHODS",
    "LabSizes",
    "crossovers",
    "dropin_accuracy",
    "error_rows",
    "pretrained_dropin",
    "register",
    "run_lab",
    "speed_rows",
]

#: The exact peers every approximation is timed against.
EXACT = ("exact-auto", "exact-chunked")
#: Approximations timed vs N, with their settings (N-dependent ones filled in by ``_call``).
SPEED_METHODS: dict[str, dict[str, Any]] = {
    "linear": {},
    "performer": {"num_features": 256},
    "nystrom": {"num_landmarks": 64},
    "linformer": {"rank": 256},
    "bigbird": {"block_size": 64},
    "local": {"window": 128},
}
#: Knob swept in the error part, per approximation.
ERROR_SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "linear": ("-", (0,)),
    "performer": ("num_features", (16, 32, 64, 128, 256, 512)),
    "nystrom": ("num_landmarks", (8, 16, 32, 64, 128, 256)),
    "local": ("window", (8, 16, 32, 64, 128, 256)),
    "bigbird": ("block_size", (4, 8, 16, 32, 64)),
}


@dataclass(frozen=True)
class LabSizes:
    """How big each part of the lab is.

    Attributes:
        speed_ns: sequence lengths of the speed part.
        heads, head_dim: ``H`` and ``D`` of the speed and synthetic error parts (batch 1).
        repeats: timed calls per speed case (median reported).
        error_n: synthetic sequence length of the error part.
        real_n: tokens of real text the captured activations cover.
        task_budget_s: training seconds per (attention, seed, tokens) run.
        seeds: seeds per run.
        token_modes: ``"bpe"`` and/or ``"char"``.
        train_limit, test_limit: examples used (None: all).
        timeout_s: per speed case.
        isolate: each speed case in its own process (peak memory measured); False runs them
            here, without memory figures (quick mode: no interpreter start per case).
    """

    speed_ns: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    heads: int = 4
    head_dim: int = 64
    repeats: int = 3
    error_n: int = 4096
    real_n: int = 512
    task_budget_s: float = 15.0
    seeds: int = 3
    token_modes: tuple[str, ...] = ("bpe", "char")
    train_limit: int | None = None
    test_limit: int | None = None
    timeout_s: float = 300.0
    isolate: bool = True

    @classmethod
    def quick(cls) -> LabSizes:
        """Seconds in all: for tests and a first look."""
        return cls(
            speed_ns=(64, 128),
            heads=2,
            head_dim=16,
            repeats=1,
            error_n=128,
            real_n=64,
            task_budget_s=0.3,
            seeds=2,
            token_modes=("char",),
            train_limit=128,
            test_limit=64,
            timeout_s=60.0,
            isolate=False,
        )


# --- calling any method the same way ---------------------------------------------------------


def _call(name: str, n: int, head_dim: int, **options: Any) -> Callable[..., Tensor]:
    """``fn(q, k, v, mask=None) -> out`` for ``name`` (an approximation or an exact peer)."""
    if name == "exact-auto":
        return lambda q, k, v, mask=None: qkv.attention(q, k, v, mask=mask)
    if name == "exact-chunked":
        return lambda q, k, v, mask=None: qkv.attention(q, k, v, mask=mask, backend="chunked")
    if name == "linformer":
        options = {"max_len": n, **options, "rank": min(options.get("rank", 256), n)}
    if name in ("bigbird", "local"):
        options = {"backend": "chunked", **options}  # the exact sparse (tile-skipping) kernel
    fn = approx.make_attention(name, head_dim=head_dim, **options)
    return lambda q, k, v, mask=None: fn(q, k, v, mask=mask)


def _gaussian(n: int, heads: int, head_dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))  # type: ignore[return-value]


# --- speed: one case per process -------------------------------------------------------------


def _current_rss_bytes() -> int | None:
    """This process's resident set now (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_during(fn: Callable[[], Any]) -> int | None:
    """Largest resident set seen while ``fn()`` runs, sampled every 0.5 ms by a thread (torch
    releases the GIL in its kernels). ``ru_maxrss`` cannot serve: importing torch sets a
    high-water mark that the calls here stay under."""
    if _current_rss_bytes() is None:
        return None
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _current_rss_bytes() or 0)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return peak


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Peak extra memory and time of one forward call of ``case["method"]`` at ``case["n"]``.

    Memory comes first, from the first call in the process: the largest resident set seen
    during it minus the resident set before it (the inputs are in the baseline). Measured
    after other calls it would read low, as the allocator keeps their freed pages. Then the
    time: the median of ``case["repeats"]`` calls after that one. Run in a fresh process by
    :func:`speed_rows`."""
    torch.manual_seed(0)
    q, k, v = _gaussian(case["n"], case["heads"], case["head_dim"])
    fn = _call(case["method"], case["n"], case["head_dim"], **case.get("options", {}))
    with torch.no_grad():
        gc.collect()
        baseline = _current_rss_bytes()
        peak = _peak_rss_during(lambda: fn(q, k, v))  # also the warm-up
        times = []
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - start)
    extra = None if peak is None or baseline is None else max(0, peak - baseline)
    return {"seconds": statistics.median(times), "peak_extra_bytes": extra}


def speed_rows(
    sizes: LabSizes, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Time and memory of the exact peers and every approximation at every N of ``sizes``."""
    rows = []
    methods = [*EXACT, *SPEED_METHODS]
    for n in sizes.speed_ns:
        for method in methods:
            case = {
                "method": method,
                "n": n,
                "heads": sizes.heads,
                "head_dim": sizes.head_dim,
                "repeats": sizes.repeats,
                "options": SPEED_METHODS.get(method, {}),
            }
            if progress:
                progress(f"speed {method} N={n}")
            if sizes.isolate:
                rows.append({**case, **_in_subprocess(case, sizes.timeout_s)})
            else:
                rows.append({**case, **measure_case(case), "peak_extra_bytes": None})
    return rows


def _in_subprocess(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qkv.bench.approx", json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(os.environ),
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "peak_extra_bytes": None, "error": f"over {timeout_s:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"seconds": None, "peak_extra_bytes": None, "error": last}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def crossovers(rows: Sequence[dict[str, Any]]) -> dict[str, int | None]:
    """Per approximation, the smallest N from which it is faster than both exact peers at that
    N and at every larger N measured; None if it never is."""
    by = {(r["method"], r["n"]): r.get("seconds") for r in rows}
    ns = sorted({r["n"] for r in rows})
    out: dict[str, int | None] = {}
    for method in sorted({r["method"] for r in rows} - set(EXACT)):
        wins = []
        for n in ns:
            mine = by.get((method, n))
            peers = [by.get((p, n)) for p in EXACT]
            known = [p for p in peers if p is not None]
            wins.append(mine is not None and bool(known) and mine < min(known))
        start = None
        for i in range(len(ns) - 1, -1, -1):
            if not wins[i]:
                break
            start = ns[i]
        out[method] = start
    return out


# --- error: against exact attention on the same inputs ---------------------------------------


def _rows_of(name: str, q: Tensor, k: Tensor, knob: int, keep: Tensor | None) -> Tensor | None:
    """Implied attention rows ``(B, H, Nq, Nk)`` of an approximation, where it has them."""
    s = q.shape[-1] ** -0.5
    if name == "linear":
        fq, fk = approx.elu_feature_map(q), approx.elu_feature_map(k)
    elif name == "performer":
        w = approx.orthogonal_features(
            knob, q.shape[-1], generator=torch.Generator().manual_seed(0), dtype=q.dtype
        )
        fq = approx.positive_features(q * s**0.5, w)
        every = keep if keep is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
        fk = approx.positive_features(k * s**0.5, w, over_keys=every[:, None, :])
    elif name in ("local", "bigbird"):
        pattern: qkv.masks.MaskFn
        if name == "local":
            pattern = qkv.masks.sliding_window(knob, knob)
        else:
            pattern = approx.bigbird_mask(max(q.shape[2], k.shape[2]), block_size=knob)
        b, h, qi, ki = qkv.masks.index_grid(1, 1, (0, q.shape[2]), (0, k.shape[2]))
        allowed = pattern(b, h, qi, ki)
        if keep is not None:
            allowed = allowed & keep[:, None, None, :]
        scores = (q @ k.transpose(-1, -2) * s).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, -1)
    else:
        return None
    if keep is not None:
        fk = fk * keep[:, None, :, None]
    w_ij = fq @ fk.transpose(-1, -2)
    return w_ij / w_ij.sum(-1, keepdim=True)


def _row_kl(approximate: Tensor, exact: Tensor) -> float:
    """Mean over rows of ``KL(P~ || P) = sum_j P~ log(P~ / P)`` (0 log 0 = 0)."""
    terms = torch.where(
        approximate > 0, approximate * (approximate.log() - exact.clamp_min(1e-300).log()), 0.0
    )
    return float(terms.sum(-1).mean())


def _approximation(name: str, knob: int, head_dim: int) -> Callable[..., Tensor]:
    options: dict[str, Any] = {}
    if name == "performer":
        options = {"num_features": knob, "seed": 0}
    elif name == "nystrom":
        options = {"num_landmarks": knob}
    elif name == "local":
        options = {"window": knob}
    elif name == "bigbird":
        options = {"block_size": knob}
    fn = approx.make_attention(name, head_dim=head_dim, **options)
    if isinstance(fn, nn.Module):
        fn.to(torch.float64)
    return fn


def error_rows(
    source: str, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None
) -> list[dict[str, Any]]:
    """Relative output error, row KL and the time of one call for every approximation and knob
    of :data:`ERROR_SWEEPS` on ``q, k, v (1, H, N, D)`` (computed in float64; timed in
    float32), with ``keep (1, N)`` key padding."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    n, head_dim = k.shape[2], q.shape[-1]
    s = head_dim**-0.5
    exact_p: Tensor | None = None
    if n <= 4096:  # the dense rows, for KL; 4096^2 x H float64 is the largest we form
        scores = q64 @ k64.transpose(-1, -2) * s
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        exact_p = torch.softmax(scores, -1)
    gold = qkv.attention(q64, k64, v64, mask=_mask4(keep))
    rows = [
        {
            "source": source,
            "method": "exact",
            "knob": "-",
            "value": 0,
            "rel_error": 0.0,
            "row_kl": 0.0,
            "ms": _time_ms(lambda: qkv.attention(q, k, v, mask=_mask4(keep))),
        }
    ]
    for name, (knob_name, values) in ERROR_SWEEPS.items():
        for value in values:
            if knob_name in ("num_landmarks", "window", "block_size") and value >= n:
                continue  # as large as the sequence: nothing left to approximate
            fn = _approximation(name, value, head_dim)
            out = fn(q64, k64, v64, mask=keep)
            implied = _rows_of(name, q64, k64, value, keep) if exact_p is not None else None
            fn32 = fn.float() if isinstance(fn, nn.Module) else fn
            rows.append(
                {
                    "source": source,
                    "method": name,
                    "knob": knob_name,
                    "value": value,
                    "rel_error": float((out - gold).norm() / gold.norm()),
                    "row_kl": None
                    if implied is None or exact_p is None
                    else _row_kl(implied, exact_p),
                    "ms": _time_ms(functools.partial(fn32, q, k, v, mask=keep)),
                }
            )
    return rows


def _mask4(keep: Tensor | None) -> Tensor | None:
    return None if keep is None else keep[:, None, None, :]


def _time_ms(fn: Callable[[], Any], repeats: int = 3) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# --- the task: sentiment at an equal time budget ---------------------------------------------

#: Attention settings of the task part: knobs sized for reviews of ~30 (BPE) to ~120 (chars)
#: tokens, so that each method really approximates.
TASK_METHODS: dict[str, dict[str, Any]] = {
    "exact": {},
    "linear": {},
    "performer": {"num_features": 32},
    "nystrom": {"num_landmarks": 16},
    "linformer": {"rank": 16},
    "bigbird": {"block_size": 8},
    "local": {"window": 8},
}


@dataclass
class _TaskData:
    mode: str
    vocab_size: int
    max_len: int
    train: list[tuple[list[int], int]]
    test: list[tuple[list[int], int]]
    mean_len: float = 0.0


def _task_data(mode: str, sizes: LabSizes) -> _TaskData:
    from qkv.data.labeled import load_labeled
    from qkv.data.tokenizer import TextTokenizer

    splits = load_labeled("builtin:rt")
    # Subsets are sampled, not cut: a split may be ordered by label.
    pick = random.Random(0)
    train = _sample(splits.train, sizes.train_limit, pick)
    test = _sample(splits.test, sizes.test_limit, pick)
    labels = sorted({e.label for e in splits.train})
    tokenizer = TextTokenizer.train(
        [e.text for e in train],
        mode="bpe" if mode == "bpe" else "char",
        vocab_size=8000 if mode == "bpe" else None,
    )
    max_len = 64 if mode == "bpe" else 256

    def encode(examples: Sequence[Any]) -> list[tuple[list[int], int]]:
        ids = tokenizer.encode_all([e.text for e in examples], max_length=max_len)
        return [(row, labels.index(e.label)) for row, e in zip(ids, examples, strict=True)]

    data = _TaskData(mode, tokenizer.vocab_size, max_len, encode(train), encode(test))
    data.mean_len = statistics.fmean(len(r) for r, _ in data.train)
    return data


def _sample(items: Sequence[Any], limit: int | None, pick: random.Random) -> list[Any]:
    return list(items) if limit is None or limit >= len(items) else pick.sample(list(items), limit)


def _batch(items: Sequence[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
    from qkv.data.tokenizer import pad_ids

    padded = pad_ids([ids for ids, _ in items])
    return padded.ids, padded.padding_mask, torch.tensor([y for _, y in items])


def _classifier(data: _TaskData, attention: str, seed: int) -> nn.Module:
    from qkv.models.classifier import AttentionClassifier, ClassifierConfig

    options = dict(TASK_METHODS[attention])
    if attention == "linformer":
        options["max_len"] = data.max_len
    torch.manual_seed(seed)
    config = ClassifierConfig(
        data.vocab_size,
        2,
        "transformer",
        embed_dim=64,
        hidden_dim=128,
        num_layers=2,
        num_heads=4,
        pool_dim=64,
        dropout=0.1,
        attention=attention,
        attention_options=options or None,
    )
    return AttentionClassifier(config)


def _accuracy(model: nn.Module, data: _TaskData) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(data.test), 128):
            ids, mask, labels = _batch(data.test[start : start + 128])
            right += int((model(ids, mask).logits.argmax(-1) == labels).sum())
    return right / max(len(data.test), 1)


def train_for(
    data: _TaskData, attention: str, seed: int, budget_s: float
) -> tuple[nn.Module, float, int]:
    """Train the classifier with ``attention`` for ``budget_s`` seconds of wall clock (batches of
    32, AdamW 2e-3); return it, its test accuracy and the steps it took."""
    model = _classifier(data, attention, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    steps, start = 0, time.perf_counter()
    model.train()
    while time.perf_counter() - start < budget_s:
        perm = torch.randperm(len(data.train), generator=order).tolist()
        for lo in range(0, len(perm), 32):
            ids, mask, labels = _batch([data.train[i] for i in perm[lo : lo + 32]])
            loss = F.cross_entropy(model(ids, mask).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= budget_s:
                break
    return model, _accuracy(model, data), steps


def dropin_accuracy(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    methods: dict[str, dict[str, Any]] | Sequence[tuple[str, dict[str, Any]]],
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` as trained (exact) and with each approximation swapped into every
    :class:`qkv.nn.MultiHeadAttention` (no retraining), then restore exact attention.

    This is the hook for a pretrained encoder: ``dropin_accuracy(loaded, my_eval, methods)``
    (:func:`pretrained_dropin` does it for a fine-tuned pretrained classifier).

    Args:
        model: any module tree holding qkv ``MultiHeadAttention``.
        evaluate: ``evaluate(model) -> accuracy`` (or any score).
        methods: name -> options, e.g. :data:`TASK_METHODS`, or ``(name, options)`` pairs when
            one method appears with several settings (:data:`PRETRAINED_METHODS`).
        progress: called with each method's name before it is evaluated.

    Returns:
        One row per setting: ``method``, ``options``, ``score``, ``change`` (vs exact).
    """
    say = progress or (lambda text: None)
    pairs = list(methods.items()) if isinstance(methods, dict) else list(methods)
    approx.swap_attention(model, "exact")
    say("exact")
    base = evaluate(model)
    rows: list[dict[str, Any]] = [{"method": "exact", "options": {}, "score": base, "change": 0.0}]
    try:
        for name, options in pairs:
            if name == "exact":
                continue
            say(f"{name} {options}")
            torch.manual_seed(0)  # the same random features / projections on every run
            approx.swap_attention(model, name, **options)
            score = evaluate(model)
            rows.append(
                {"method": name, "options": dict(options), "score": score, "change": score - base}
            )
    finally:
        approx.swap_attention(model, "exact")
    return rows


#: Drop-in settings for a pretrained encoder on short sentences (Rotten Tomatoes: N ~ 25
#: wordpieces, 60 at most): each knob from far below N to about N.
PRETRAINED_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("linear", {}),
    ("performer", {"num_features": 16}),
    ("performer", {"num_features": 64}),
    ("performer", {"num_features": 256}),
    ("nystrom", {"num_landmarks": 8}),
    ("nystrom", {"num_landmarks": 16}),
    ("nystrom", {"num_landmarks": 32}),
    ("linformer", {"max_len": 512, "rank": 32}),  # untrained projections: a floor, not a method
    ("local", {"window": 4}),
    ("local", {"window": 8}),
    ("local", {"window": 16}),
    ("bigbird", {"block_size": 4}),
    ("bigbird", {"block_size": 8}),
)


def pretrained_dropin(
    classifier: Any,
    examples: Sequence[Any],
    methods: Sequence[tuple[str, dict[str, Any]]] = PRETRAINED_METHODS,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`dropin_accuracy` of a fine-tuned pretrained classifier on labelled texts.

    Args:
        classifier: a ``qkv.tasks.pretrained_sentiment.PretrainedTextClassifier``.
        examples: ``LabeledText`` items (e.g. the Rotten Tomatoes test split).
        methods: ``(name, options)`` pairs.
        progress: called with each method before it is evaluated.

    Returns:
        :func:`dropin_accuracy`'s rows (``score`` is the accuracy).
    """
    from qkv.tasks.pretrained_sentiment import evaluate_pretrained

    def accuracy(model: nn.Module) -> float:
        return float(evaluate_pretrained(classifier, examples)["accuracy"])

    return dropin_accuracy(classifier.model, accuracy, methods, progress)


def _pretrained_rows(folder: Path, limit: int | None, say: Callable[[str], None]) -> list[Any]:
    from qkv.data.labeled import load_labeled
    from qkv.tasks.pretrained_sentiment import PretrainedTextClassifier

    classifier = PretrainedTextClassifier.load(folder)
    test = _sample(load_labeled("builtin:rt").test, limit, random.Random(0))
    return pretrained_dropin(classifier, test, progress=lambda t: say(f"drop-in pretrained {t}"))


# --- capturing real activations --------------------------------------------------------------


def capture_qkv(model: nn.Module, ids: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(q, k, v)`` of every qkv ``MultiHeadAttention`` call while ``model(ids, mask)`` runs
    (after projection and RoPE, exactly what attention sees), in call order."""
    from qkv.nn.multihead import MultiHeadAttention

    seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def spy(q: Tensor, k: Tensor, v: Tensor, *, mask: Any = None, causal: Any = False) -> Tensor:
        seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return qkv.attention(q, k, v, mask=mask, causal=causal)

    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    before = [(m.attention_name, m.attention_impl) for m in modules]
    for m in modules:
        m.set_attention(spy)
    try:
        model.eval()
        with torch.no_grad():
            model(ids, mask)
    finally:
        for m, (name, impl) in zip(modules, before, strict=True):
            m.set_attention("exact" if impl is None else impl)
            m.attention_name = name
    return seen


def _long_text(data: _TaskData, n: int) -> tuple[Tensor, Tensor]:
    """Test reviews concatenated into one sequence of ``n`` tokens: ``(1, n)`` ids and mask."""
    tokens: list[int] = []
    for ids, _ in data.test:
        tokens.extend(ids)
        if len(tokens) >= n:
            break
    row = torch.tensor([tokens[:n]])
    return row, row != 0


# --- the lab ---------------------------------------------------------------------------------


@dataclass
class LabResult:
    sizes: LabSizes
    load: tuple[float, float, float]
    threads: int
    error: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)
    crossover: dict[str, int | None] = field(default_factory=dict)
    task: list[dict[str, Any]] = field(default_factory=list)
    dropin: list[dict[str, Any]] = field(default_factory=list)
    dropin_pretrained: list[dict[str, Any]] = field(default_factory=list)
    dropin_source: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sizes": asdict(self.sizes)}


PARTS = ("task", "error", "speed", "dropin")


def run_lab(
    sizes: LabSizes,
    parts: Sequence[str] = PARTS,
    progress: Callable[[str], None] | None = None,
    model_folder: Path | None = None,
) -> LabResult:
    """Run the chosen parts (the error and drop-in parts reuse the exact model of the task part,
    which then trains at least that one model). With ``model_folder`` (a fine-tuned pretrained
    classifier's folder), the drop-in part evaluates that model on the Rotten Tomatoes test split
    (``sizes.test_limit`` sentences) instead, and trains nothing."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    say = progress or (lambda text: None)
    started = time.perf_counter()
    result = LabResult(sizes, os.getloadavg(), torch.get_num_threads())
    exact_model: nn.Module | None = None
    exact_data: _TaskData | None = None
    trains_for = {"task", "error"} | (set() if model_folder is not None else {"dropin"})
    if trains_for & set(parts):
        for mode in sizes.token_modes:
            data = _task_data(mode, sizes)
            methods = list(TASK_METHODS) if "task" in parts else ["exact"]
            for name in methods:
                for seed in range(sizes.seeds if "task" in parts else 1):
                    say(f"task {mode} {name} seed {seed}")
                    model, acc, steps = train_for(data, name, seed, sizes.task_budget_s)
                    result.task.append(
                        {
                            "tokens": mode,
                            "mean_len": data.mean_len,
                            "method": name,
                            "seed": seed,
                            "accuracy": acc,
                            "steps": steps,
                        }
                    )
                    if name == "exact" and seed == 0 and exact_model is None:
                        exact_model, exact_data = model, data
        if "task" not in parts:
            result.task = []
    if "dropin" in parts and model_folder is not None:
        result.dropin_pretrained = _pretrained_rows(model_folder, sizes.test_limit, say)
        result.dropin_source = str(model_folder)
    elif "dropin" in parts and exact_model is not None and exact_data is not None:
        say("drop-in")
        data_ = exact_data
        swaps = {n: o for n, o in TASK_METHODS.items() if n != "linformer"}  # learned E, F
        result.dropin = dropin_accuracy(exact_model, lambda m: _accuracy(m, data_), swaps)
    if "error" in parts and exact_model is not None and exact_data is not None:
        ids, mask = _long_text(exact_data, sizes.real_n)
        captured = capture_qkv(exact_model, ids, mask)
        for layer in (0, len(captured) - 1):
            q, k, v = captured[layer]
            say(f"error real layer {layer}")
            source = f"real ({exact_data.mode}, N={ids.shape[1]}, layer {layer + 1})"
            result.error += error_rows(source, q, k, v)
        say("error synthetic")
        q, k, v = _gaussian(sizes.error_n, sizes.heads, sizes.head_dim, seed=1)
        result.error += error_rows(f"synthetic (N={sizes.error_n})", q, k, v)
    if "speed" in parts:
        result.speed = speed_rows(sizes, progress)
        result.crossover = crossovers(result.speed)
    result.seconds = time.perf_counter() - started
    return result


# --- tables and the plot ---------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def format_tables(result: LabResult) -> str:
    """Markdown tables of every part that ran."""
    out = [
        f"load average {result.load[0]:.2f} {result.load[1]:.2f} {result.load[2]:.2f} at the "
        f"start, torch threads {result.threads}, {result.seconds / 60:.1f} min in all",
        "",
    ]
    if result.error:
        out += ["### Error vs exact attention", ""]
        out += [
            "| source | method | knob | rel. error | row KL(P~‖P) | ms/call |",
            "|---|---|---|---|---|---|",
        ]
        for r in result.error:
            knob = "-" if r["knob"] == "-" else f"{r['knob']}={r['value']}"
            out.append(
                f"| {r['source']} | {r['method']} | {knob} | {r['rel_error']:.3g} | "
                f"{_fmt(r['row_kl'], '.3g')} | {r['ms']:.1f} |"
            )
        out.append("")
    if result.speed:
        out += _speed_tables(result)
    if result.task:
        out += ["### Task accuracy at an equal time budget", ""]
        out += [
            f"sentiment (builtin:rt), {result.sizes.task_budget_s:g} s of training per run, "
            f"{result.sizes.seeds} seeds; test accuracy mean ± std (steps taken, mean)",
            "",
            "| tokens (mean N) | method | accuracy | steps |",
            "|---|---|---|---|",
        ]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in result.task:
            groups.setdefault((r["tokens"], r["method"]), []).append(r)
        for (mode, method), rs in groups.items():
            accs = [r["accuracy"] for r in rs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            steps = statistics.fmean(r["steps"] for r in rs)
            out.append(
                f"| {mode} ({rs[0]['mean_len']:.0f}) | {method} | "
                f"{statistics.fmean(accs):.3f} ± {spread:.3f} | {steps:.0f} |"
            )
        out.append("")
    if result.dropin:
        out += ["### Drop-in without retraining (classifier trained with exact attention)", ""]
        out += ["| method | accuracy | change |", "|---|---|---|"]
        for r in result.dropin:
            out.append(f"| {r['method']} | {r['score']:.3f} | {r['change']:+.3f} |")
        out.append("")
    if result.dropin_pretrained:
        n = result.sizes.test_limit
        out += [
            "### Drop-in on the fine-tuned pretrained encoder, without retraining",
            "",
            f"{result.dropin_source}; Rotten Tomatoes test, "
            + ("all sentences" if n is None else f"{n} sentences sampled with seed 0"),
            "",
            "| method | setting | accuracy | change |",
            "|---|---|---|---|",
        ]
        for r in result.dropin_pretrained:
            setting = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
            out.append(f"| {r['method']} | {setting} | {r['score']:.3f} | {r['change']:+.3f} |")
        out.append("")
    return "\n".join(out)


def _speed_tables(result: LabResult) -> list[str]:
    rows = result.speed
    ns = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["n"]): r for r in rows}
    s = result.sizes
    head = "| method | " + " | ".join(f"N={n}" for n in ns) + " |"
    rule = "|---|" + "---|" * len(ns)
    out = [
        "### Forward time vs N (ms)",
        "",
        f"B=1, H={s.heads}, D={s.head_dim}, float32, CPU, median of {s.repeats}; each case in "
        f"a fresh process; ratio to the faster exact peer in brackets",
        "",
        head,
        rule,
    ]
    for m in methods:
        cells = []
        for n in ns:
            sec = by[(m, n)].get("seconds")
            peers = [by[(p, n)].get("seconds") for p in EXACT if (p, n) in by]
            best = min((p for p in peers if p is not None), default=None)
            if sec is None:
                cells.append(by[(m, n)].get("error", "-")[:30])
            elif m in EXACT or best is None:
                cells.append(f"{1e3 * sec:.1f}")
            else:
                cells.append(f"{1e3 * sec:.1f} ({sec / best:.2f}x)")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "### Peak extra memory vs N (MiB, resident set growth)", "", head, rule]
    for m in methods:
        out.append(
            f"| {m} | " + " | ".join(_mib(by[(m, n)].get("peak_extra_bytes")) for n in ns) + " |"
        )
    out += ["", "### Crossover: faster than both exact peers from N = ", ""]
    out += ["| method | from N |", "|---|---|"]
    for m, n in result.crossover.items():
        out.append(f"| {m} | {n if n is not None else 'never (up to ' + str(ns[-1]) + ')'} |")
    out.append("")
    return out


def write_plot(result: LabResult, path: Path) -> bool:
    """Error vs cost (ms per call), one line per method over its knob: on the last captured
    layer's real activations and on the synthetic sequence, side by side. False without
    matplotlib or error rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sources = list(dict.fromkeys(r["source"] for r in result.error))
    chosen = [s for s in sources if s.startswith("real")][-1:] + [
        s for s in sources if s.startswith("synthetic")
    ]
    if not chosen:
        return False
    fig, axes = plt.subplots(1, len(chosen), figsize=(6.0 * len(chosen), 4.2), squeeze=False)
    for ax, source in zip(axes[0], chosen, strict=True):
        _plot_source(ax, [r for r in result.error if r["source"] == source])
        ax.set_title(source, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_source(ax: Any, rows: list[dict[str, Any]]) -> None:
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if method == "exact":
            ax.axvline(mine[0]["ms"], color="black", linestyle="--", label="exact (error 0)")
            continue
        ax.plot([r["ms"] for r in mine], [r["rel_error"] for r in mine], "o-", label=method)
        for r in mine:
            if r["knob"] != "-":
                ax.annotate(str(r["value"]), (r["ms"], r["rel_error"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time per forward call (ms, CPU, float32)")
    ax.set_ylabel("relative output error vs exact")
    ax.legend(fontsize=8)


# --- the command -----------------------------------------------------------------------------


def register(commands: Any) -> None:
    """Add ``approx`` to the ``qkv bench`` sub-commands."""
    p = commands.add_parser(
        "approx",
        help="approximate attention vs exact: error, time and memory vs N, task accuracy",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts from {','.join(PARTS)} (default all)",
    )
    p.add_argument("--n", default=None, help="speed part's sequence lengths, comma-separated")
    p.add_argument("--budget", type=float, default=None, help="training seconds per task run")
    p.add_argument("--seeds", type=int, default=None, help="seeds per task run")
    p.add_argument("--out", type=Path, default=None, help="folder for approx.json and the plot")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a fine-tuned pretrained classifier's folder: the dropin part swaps into it "
        "(Rotten Tomatoes test) instead of training one",
    )
    p.add_argument("--limit", type=int, default=None, help="test sentences used (default all)")
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    sizes = LabSizes.quick() if args.quick else LabSizes()
    if args.n:
        try:
            ns = tuple(int(x) for x in args.n.split(",") if x)
        except ValueError:
            raise ValueError(f"--n must be comma-separated integers; got {args.n!r}") from None
        sizes = replace(sizes, speed_ns=ns)
    if args.budget is not None:
        if not args.budget > 0:
            raise ValueError(f"--budget must be > 0 seconds; got {args.budget}")
        sizes = replace(sizes, task_budget_s=args.budget)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1; got {args.seeds}")
        sizes = replace(sizes, seeds=args.seeds)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1; got {args.limit}")
        sizes = replace(sizes, test_limit=args.limit)
    if args.model is not None and not args.model.is_dir():
        raise ValueError(f"--model: {args.model} is not a folder")
    parts = [p for p in args.parts.split(",") if p]
    result = run_lab(
        sizes,
        parts,
        progress=lambda text: print(f"  {text} ...", file=sys.stderr),
        model_folder=args.model,
    )
    print(format_tables(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "approx.json").write_text(json.dumps(result.to_json(), indent=1))
        plotted = write_plot(result, args.out / "efficient.png")
        print(f"wrote {args.out / 'approx.json'}" + (" and efficient.png" if plotted else ""))
    return 0


def main(argv: list[str]) -> int:
    """``python -m qkv.bench.approx CASE_JSON``: measure one speed case, print JSON."""
    print(json.dumps(measure_case(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
