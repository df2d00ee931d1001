r"""``qkv bench approx``: approximate attention (:mod:`qkv.approx`) against exact, as instruments.

Two parts, each a table (and one plot) in ``docs/efficient.md``:

- **error** -- relative output error ``||o~ - o||_F / ||o||_F`` and the mean row KL divergence
  ``KL(P~ || P)`` of the implied attention rows (where an approximation has rows, see
  :attr:`qkv.approx.Approximation.rows`) vs its knob (features, landmarks, window, block), on
  given ``q, k, v`` (:func:`error_rows`) and on synthetic Gaussian ``q, k, v`` of ``error_n``
  tokens, with the time of one call beside it (the plot: error vs cost).
- **speed** -- forward time (median of ``repeats`` after a warm-up) and peak extra resident
  memory (sampled during the first call) vs N, each case in a fresh process, against exact
  attention through ``auto`` and through ``chunked``; the crossover N from which each
  approximation is faster than both (:mod:`qkv.bench.approx_speed`).

What each approximation is swept over and timed with comes from its registry entry
(:data:`qkv.approx.APPROXIMATIONS`), so a new approximation needs no change here. The
experiments that train models (task accuracy at an equal budget, drop-in without retraining,
errors on a trained model's activations) are in ``benchmarks/approx_lab.py``.

Sizes: :class:`BenchSizes`; ``--quick`` for tests.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import qkv
from qkv.approx import APPROXIMATIONS, make_attention
from qkv.bench.approx_speed import (
    EXACT,
    SPEED_METHODS,
    crossovers,
    gaussian,
    speed_rows,
    speed_tables,
)

__all__ = [
    "ERROR_SWEEPS",
    "EXACT",
    "PARTS",
    "SPEED_METHODS",
    "BenchResult",
    "BenchSizes",
    "crossovers",
    "error_rows",
    "error_table",
    "format_tables",
    "gaussian",
    "parse_lengths",
    "run_bench",
    "save_result",
    "speed_rows",
    "speed_tables",
    "write_plot",
]

#: Knob swept in the error part, per approximation (each registry entry's ``knob``/``sweep``).
ERROR_SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    name: (entry.knob or "-", entry.sweep) for name, entry in APPROXIMATIONS.items() if entry.sweep
}
#: The parts of ``qkv bench approx``.
PARTS = ("error", "speed")


@dataclass(frozen=True)
class BenchSizes:
    """How big each part is.

    Attributes:
        speed_ns: sequence lengths of the speed part.
        heads, head_dim: ``H`` and ``D`` of the speed and synthetic error parts (batch 1).
        repeats: timed calls per speed case (median reported).
        error_n: synthetic sequence length of the error part.
        timeout_s: per speed case.
        isolate: each speed case in its own process (peak memory measured); False runs them
            here, without memory figures (quick mode: no interpreter start per case).
    """

    speed_ns: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    heads: int = 4
    head_dim: int = 64
    repeats: int = 3
    error_n: int = 4096
    timeout_s: float = 300.0
    isolate: bool = True

    @classmethod
    def quick(cls) -> BenchSizes:
        """Seconds in all: for tests and a first look."""
        return cls(
            speed_ns=(64, 128),
            heads=2,
            head_dim=16,
            repeats=1,
            error_n=128,
            timeout_s=60.0,
            isolate=False,
        )


@dataclass
class BenchResult:
    """What :func:`run_bench` measured (the lab adds its experiments' rows)."""

    sizes: Any
    load: tuple[float, float, float]
    threads: int
    error: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)
    crossover: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sizes": asdict(self.sizes)}


# --- error: against exact attention on the same inputs ---------------------------------------


def _row_kl(approximate: Tensor, exact: Tensor) -> float:
    """Mean over rows of ``KL(P~ || P) = sum_j P~ log(P~ / P)`` (0 log 0 = 0)."""
    terms = torch.where(
        approximate > 0, approximate * (approximate.log() - exact.clamp_min(1e-300).log()), 0.0
    )
    return float(terms.sum(-1).mean())


def _approximation(name: str, knob: int, head_dim: int) -> Callable[..., Tensor]:
    fn = make_attention(name, head_dim=head_dim, **APPROXIMATIONS[name].knob_options(knob))
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
        entry = APPROXIMATIONS[name]
        for value in values:
            if entry.knob_below_length and value >= n:
                continue  # as large as the sequence: nothing left to approximate
            fn = _approximation(name, value, head_dim)
            out = fn(q64, k64, v64, mask=keep)
            implied = None
            if exact_p is not None and entry.rows is not None:
                implied = entry.rows(q64, k64, value, keep)
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


# --- the benchmark ---------------------------------------------------------------------------


def run_bench(
    sizes: BenchSizes,
    parts: Sequence[str] = PARTS,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the chosen parts: the error part on synthetic Gaussian ``q, k, v`` of
    ``sizes.error_n`` tokens, the speed part at every N of ``sizes.speed_ns``.

    Raises:
        ValueError: an unknown part, naming the known ones.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    started = time.perf_counter()
    result = BenchResult(sizes, os.getloadavg(), torch.get_num_threads())
    measure_parts(result, sizes, parts, progress)
    result.seconds = time.perf_counter() - started
    return result


def measure_parts(
    result: BenchResult,
    sizes: BenchSizes,
    parts: Sequence[str],
    progress: Callable[[str], None] | None = None,
) -> None:
    """Add the synthetic error rows and the speed rows of ``parts`` to ``result``."""
    say = progress or (lambda text: None)
    if "error" in parts:
        say("error synthetic")
        q, k, v = gaussian(sizes.error_n, sizes.heads, sizes.head_dim, seed=1)
        result.error += error_rows(f"synthetic (N={sizes.error_n})", q, k, v)
    if "speed" in parts:
        result.speed = speed_rows(sizes, progress)
        result.crossover = crossovers(result.speed)


def parse_lengths(text: str) -> tuple[int, ...]:
    """Sequence lengths from comma-separated text (``"256,1024"``).

    Raises:
        ValueError: anything but integers, naming ``--n`` and the text.
    """
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise ValueError(f"--n must be comma-separated integers; got {text!r}") from None


def save_result(result: BenchResult, folder: Path) -> list[Path]:
    """Write ``approx.json`` (every row) and, with matplotlib and error rows, the error-vs-cost
    plot ``efficient.png`` into ``folder``; return the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "approx.json"
    data.write_text(json.dumps(result.to_json(), indent=1))
    plot = folder / "efficient.png"
    return [data, plot] if write_plot(result, plot) else [data]


# --- tables and the plot ---------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_tables(result: BenchResult) -> str:
    """Markdown tables of every part that ran."""
    out = [
        f"load average {result.load[0]:.2f} {result.load[1]:.2f} {result.load[2]:.2f} at the "
        f"start, torch threads {result.threads}, {result.seconds / 60:.1f} min in all",
        "",
    ]
    if result.error:
        out += error_table(result.error)
    if result.speed:
        out += speed_tables(result)
    return "\n".join(out)


def error_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The error part's Markdown table."""
    out = ["### Error vs exact attention", ""]
    out += [
        "| source | method | knob | rel. error | row KL(P~‖P) | ms/call |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        knob = "-" if r["knob"] == "-" else f"{r['knob']}={r['value']}"
        out.append(
            f"| {r['source']} | {r['method']} | {knob} | {r['rel_error']:.3g} | "
            f"{_fmt(r['row_kl'], '.3g')} | {r['ms']:.1f} |"
        )
    out.append("")
    return out


def write_plot(result: BenchResult, path: Path) -> bool:
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
