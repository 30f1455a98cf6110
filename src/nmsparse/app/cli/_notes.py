"""One-line notes the command line prints before a long job, when a setting is likely to
make it much slower than it needs to be. Notes go to stderr and never stop anything."""

from __future__ import annotations

import os
import sys


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_machine_note(threads_given: bool, cores: int | None = None,
                      load: float | None = None) -> str | None:
    """A hint to use fewer threads when other processes already keep the cores busy:
    PyTorch's intra-op threads then wait on each other (issue 10 reports 10-40x slower than
    one thread on a loaded 2-core machine)."""
    if threads_given or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    if cores < 2 or load < 0.75 * cores:
        return None
    return (f"note: the machine is busy (load {load:.1f} on {cores} cores); if training is "
            "slow, try --threads 1 (or OMP_NUM_THREADS=1)")


def cpu_amp_note(device_type: str, amp: str) -> str | None:
    """bf16/fp16 autocast on a CPU is usually several times slower than fp32 (issue 10 reports
    ~7x for bf16 on the digits MLP): say so rather than let a run crawl."""
    if device_type != "cpu" or amp == "none":
        return None
    return (f"note: --amp {amp} on the CPU is usually several times slower than fp32 "
            "(mixed precision pays off on GPUs); drop --amp for CPU runs")


def say(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr, flush=True)
