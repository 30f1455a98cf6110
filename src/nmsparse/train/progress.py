"""Progress output: a live bar on a terminal, plain log lines otherwise (files, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One epoch's progress: ``update(done, **metrics)`` after every batch."""

    def __init__(self, total: int, title: str, *, enabled: bool = True,
                 stream: TextIO | None = None, lines: int = 4) -> None:
        self.total, self.title, self.enabled = total, title, enabled
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
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
            self.stream.write(f"\r{self.title} [{bar}] {done}/{self.total}  {shown}  "
                              f"{rate:,.0f} samples/s  ETA {_duration(eta)} ")
        else:
            self.stream.write(f"{self.title} {done}/{self.total}  {shown}  "
                              f"{rate:,.0f} samples/s  ETA {_duration(eta)}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
