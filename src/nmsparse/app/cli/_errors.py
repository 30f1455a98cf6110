"""How the command line reports failures: one line on stderr, a fixed exit status.

* bad input of any kind (a flag, a recipe, data, a checkpoint, a run folder, a full disk, a
  diverged run, a missing optional package): ``nmsparse CMD: error: ...`` and exit 2. A
  message of several lines (a per-layer reason table) is folded into that one line, so no
  reason is lost;
* Ctrl-C: exit 130, SIGTERM: exit 143, each with a one-line note (``train`` says how to
  resume);
* running out of memory (a model or batch too large for the machine): one line, exit 2;
* a traceback only with ``--debug``.
"""

from __future__ import annotations

import signal
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# What counts as bad input or a fault of the environment rather than a bug of nmsparse.
EXPECTED = (ValueError, OSError, FloatingPointError, ImportError)


class Terminated(Exception):
    """SIGTERM, turned into an exception so that clean-up (locks, process groups) runs."""


def one_line(text: str) -> str:
    """Fold a message of several lines into one: lines joined by '; ', table rules and
    repeated blanks dropped."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    lines = [line for line in lines if line and set(line) - set("-= ")]
    folded = ""
    for line in lines:
        if folded:
            folded += " " if folded.endswith(":") else "; "
        folded += line
    return folded


def out_of_memory(error: BaseException) -> str | None:
    """A one-line message for running out of memory (a model or batch too large for the
    machine: torch's allocation errors, ``MemoryError``), else None (other RuntimeErrors are
    bugs and keep their traceback)."""
    text = " ".join(str(error).split())
    if not (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError)
                and ("can't allocate memory" in text or "not enough memory" in text
                     or "out of memory" in text.lower()))):
        return None
    detail = text.split("] ", 1)[-1].split(". ", 1)[-1] if text else type(error).__name__
    return (f"out of memory: {detail[:200]}; choose a smaller model (--model-option), a "
            "smaller --batch-size or --seq-len, or a device with more memory")


def describe(error: BaseException) -> str:
    if isinstance(error, ImportError) and not str(error):
        return f"a package is missing: {error.name}"
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return one_line(str(error)) or type(error).__name__


def report(command: str, message: str) -> None:
    print(f"nmsparse {command}: {message}", file=sys.stderr, flush=True)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def catch_sigterm():
    """From now on SIGTERM raises :class:`Terminated` in the main thread; returns the previous
    handler (to restore), or None when not in the main thread (signals cannot be set)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None


def restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
