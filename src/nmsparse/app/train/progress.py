"""Progress output: a live bar on a terminal, plain log lines otherwise (files, CI, pipes).

Plain lines go to stdout (with the epoch lines), the live bar to the terminal on stderr.
The live bar is cut to the terminal's width: a line that wrapped would make every ``\r``
update start a new line on a narrow terminal.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One epoch's progress: ``update(done, **metrics)`` after every batch."""

    def __init__(self, total: int, title: str, *, enabled: bool = True,
                 stream: TextIO | None = None, lines: int = 4,
                 width: int | None = None) -> None:
        self.total, self.title, self.enabled = total, title, enabled
        # live bar on a terminal (stderr); otherwise plain log lines on stdout, so that stderr
        # carries only notes and errors
        if stream is None:
            stream = sys.stderr if sys.stderr.isatty() else sys.stdout
        self.stream = stream
        self.live = enabled and self.stream.isatty()
        self.width = width
        self.every = max(1, total // lines)  # plain mode: a few lines per epoch
        self.start = time.perf_counter()

    def update(self, done: int, samples: int, **metrics: float) -> None:
        if not self.enabled or (not self.live and done % self.every and done != self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = samples / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - done) if done else 0.0
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if self.live:
            filled = int(20 * done / max(1, self.total))
            bar = "#" * filled + "." * (20 - filled)
            line = (f"{self.title} [{bar}] {done}/{self.total}  {shown}  "
                    f"{rate:,.0f} samples/s  ETA {_duration(eta)}")
            width = self._columns() - 1  # the last column would wrap on some terminals
            self.stream.write("\r" + line[:width].ljust(width))
        else:
            self.stream.write(f"{self.title} {done}/{self.total}  {shown}  "
                              f"{rate:,.0f} samples/s  ETA {_duration(eta)}\n")
        self.stream.flush()

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = os.environ.get("COLUMNS", "")
            return int(columns) if columns.isdigit() and int(columns) > 1 else 80

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
