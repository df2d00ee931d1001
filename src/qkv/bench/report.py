"""The benchmark as a text table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qkv.bench.run import BenchResult


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def format_table(
    results: list[BenchResult],
    matmul_tflops: float | None = None,
    *,
    matmul_dtype: str = "bf16",
    tera: bool | None = None,
) -> str:
    """One line per result. With ``matmul_tflops`` (a ``matmul_dtype`` matmul rate measured in
    the same run) a ``% mm`` column gives each rate's share of it; rates are in TFLOP/s when
    ``tera`` (default: when a matmul rate is given, as on CUDA), else GFLOP/s (the CPU)."""
    share = matmul_tflops is not None
    tera = share if tera is None else tera
    rate_head = "TFLOP/s" if tera else "GFLOP/s"
    w = max([12, *(len(r.case.backend_label) for r in results)])
    header = f"{'mask':<15} {'N':>6} {'mode':<8} {'backend':<{w}} {'ms':>10} {rate_head:>8} {'peak MiB':>9} {'given MiB':>9} {'est MiB':>8} {'x sdpa':>7}"
    header += f" {'% mm':>5}" if share else ""
    lines = [header, "-" * len(header)]
    if matmul_tflops is not None:
        peak = f"{matmul_tflops:,.0f} TFLOP/s" if tera else f"{matmul_tflops * 1e3:,.0f} GFLOP/s"
        lines.insert(0, f"{matmul_dtype} matmul, same run: {peak}")
    for r in results:
        c = r.case
        head = f"{c.mask_kind:<15} {c.seq_len:>6} {c.mode:<8} {c.backend_label:<{w}}"
        if r.error is not None:
            lines.append(f"{head} {'failed: ' + r.error}")
            continue
        assert r.seconds is not None and r.gflops is not None
        ratio = "-" if r.ratio_to_sdpa is None else f"{r.ratio_to_sdpa:.2f}"
        rate = r.gflops / 1e3 if tera else r.gflops
        line = f"{head} {r.seconds * 1e3:>10.1f} {rate:>8.1f} {_mib(r.peak_extra_bytes):>9} {_mib(r.given_bytes):>9} {_mib(r.estimated_bytes):>8} {ratio:>7}"
        if share:
            part = "-" if r.matmul_share is None else f"{100 * r.matmul_share:.0f}%"
            line += f" {part:>5}"
        lines.append(line)
    compiled = [r for r in results if r.case.backend == "flex" and r.first_seconds is not None]
    for r in compiled:  # its compilation is not in the timed calls: reported on its own
        assert r.first_seconds is not None
        lines.append(
            f"flex compile + first call, {r.case.label()}: {r.first_seconds:,.1f} s (not in ms)"
        )
    return "\n".join(lines)


def write_json(results: list[BenchResult], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([r.to_json() for r in results], indent=2))
    tmp.replace(path)


def backend_colours(results: list[BenchResult]) -> dict[str, str]:
    """One colour per backend label for the whole chart (so ``cpu`` is the same colour in every
    panel, whichever backends a panel has), in the order the labels first appear."""
    labels = list(dict.fromkeys(r.case.backend_label for r in results))
    palette = [f"C{i}" for i in range(10)] + ["black", "grey", "olive", "navy", "teal"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def bench_figure(results: list[BenchResult]) -> Any:
    """The chart: time and peak memory against N, one panel pair per mask kind and mode."""
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(r.case.mask_kind for r in results))
    modes = list(dict.fromkeys(r.case.mode for r in results))
    colours = backend_colours(results)
    fig = Figure(figsize=(4 * len(kinds) * len(modes), 7))
    axes = fig.subplots(2, len(kinds) * len(modes), squeeze=False)
    for col, (kind, mode) in enumerate((k, m) for k in kinds for m in modes):
        chosen = [
            r
            for r in results
            if r.case.mask_kind == kind and r.case.mode == mode and r.error is None
        ]
        for backend in dict.fromkeys(r.case.backend_label for r in chosen):
            rows = sorted(
                (r for r in chosen if r.case.backend_label == backend),
                key=lambda r: r.case.seq_len,
            )
            n = [r.case.seq_len for r in rows]
            style = {"marker": "o", "label": backend, "color": colours[backend]}
            axes[0][col].plot(n, [r.seconds for r in rows], **style)
            axes[1][col].plot(n, [(r.peak_extra_bytes or 0) / 2**20 for r in rows], **style)
        axes[0][col].set_title(f"{kind}, {mode}")
        for row, ylabel in ((0, "seconds"), (1, "peak extra MiB")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            # Time spans decades; memory is drawn linear so linear growth in N reads as such.
            ax.set_yscale("log" if row == 0 else "linear")
            ax.set_xlabel("N")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plot(results: list[BenchResult], path: Path) -> bool:
    """Write :func:`bench_figure` to ``path``. Returns False when matplotlib is not installed
    (``pip install -e ".[viz]"``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    from qkv.viz import save_figure

    save_figure(bench_figure(results), path)
    return True
