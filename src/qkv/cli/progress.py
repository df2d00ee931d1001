"""A dependency-free progress bar on stderr (the library itself never prints)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``[#####.....] 5/10  12s  <note>``, redrawn in place on a terminal, one line per update
    otherwise (so CI logs stay readable).

    With ``unit="s"`` the bar counts seconds against a time limit: ``[###.....] 14s/60s <note>``.
    """

    def __init__(
        self, total: int, *, width: int = 24, stream: TextIO | None = None, unit: str = ""
    ) -> None:
        self.total = max(total, 1)
        self.unit = unit
        self.done = 0
        self.width = width
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.interactive = self.stream.isatty()

    def step(self, note: str = "") -> None:
        """One more unit done."""
        self.update(self.done + 1, note)

    def update(self, done: int, note: str = "", *, elapsed: float | None = None) -> None:
        """``done`` units of ``total`` done (``elapsed`` overrides the bar's own clock, e.g.
        for a resumed training run)."""
        self.done = min(done, self.total)
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        seconds = time.monotonic() - self.start if elapsed is None else elapsed
        if self.unit == "s":  # the bar is the time itself
            line = f"[{bar}] {seconds:.0f}s/{self.total}s {note}"
        else:
            line = f"[{bar}] {self.done}/{self.total} {seconds:5.0f}s {note}"
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (e.g. a validation result) without breaking the bar."""
        self.stream.write(("\r\033[K" if self.interactive else "") + text + "\n")
        self.stream.flush()
