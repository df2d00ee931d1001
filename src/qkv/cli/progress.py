"""A dependency-free progress bar on stderr (the library itself never prints)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``[#####.....] 5/10  12s  <note>``, redrawn in place on a terminal, one line per step
    otherwise (so CI logs stay readable)."""

    def __init__(self, total: int, *, width: int = 24, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.width = width
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.interactive = self.stream.isatty()

    def step(self, note: str = "") -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.start
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {note}"
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
