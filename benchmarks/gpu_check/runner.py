"""Run one command under a time cap; on the cap, kill its whole process group (pytest,
inductor's compile workers and anything else it started), so no hang outlives its part."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TAIL_CHARS = 4000


@dataclass
class Outcome:
    status: str  # "ok", "failed" (non-zero exit or no result), "timed out", "skipped"
    seconds: float = 0.0
    returncode: int | None = None
    cap_s: float = 0.0
    tail: str = ""  # end of the output
    reason: str = ""


def run_capped(command: list[str], cap_s: float, log: Path, cwd: Path,
               env: dict[str, str] | None = None) -> Outcome:
    """Run ``command`` (output to ``log``) for at most ``cap_s`` seconds."""
    start = time.perf_counter()
    with log.open("wb") as out:
        try:
            proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            return Outcome("failed", 0.0, None, cap_s, reason=f"could not start: {exc}")
        try:
            code = proc.wait(timeout=cap_s)
            status = "ok" if code == 0 else "failed"
            reason = "" if code == 0 else f"exit status {code}"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code, status, reason = None, "timed out", f"killed at its cap of {cap_s:.0f} s"
        _kill_group(proc)  # leftovers of a finished part (a daemon it started) go too
    seconds = time.perf_counter() - start
    return Outcome(status, seconds, code, cap_s, tail=read_tail(log), reason=reason)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def read_tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4 * chars))
            return handle.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""
