"""Timing on a CUDA GPU: CUDA events around a CUDA graph (or eager calls), the L2 size and
how many weight copies keep the cache cold."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch

FALLBACK_L2_BYTES = 50 * 2**20  # H100; the H200 reports 60 MiB


def l2_cache_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES)


def rotation_copies(weight_bytes: int, l2_bytes: int, cap: int = 256) -> int:
    """Copies so that the others, read between two uses of one copy, exceed 2x the L2."""
    return min(cap, max(2, math.ceil(2 * l2_bytes / max(1, weight_bytes)) + 1))


def short_error(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for a table cell."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def capture_graph(run: Callable[[], object]) -> tuple[Callable[[], object], str]:
    """``run`` captured once in a CUDA graph: (its replay, "graph"); if capture fails,
    (``run``, "eager (graph capture failed: ...)")."""
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # capture wants the work seen once on a side stream
            run()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            run()
    except Exception as exc:  # noqa: BLE001 - reported in the table, timed eagerly
        torch.cuda.synchronize()
        return run, f"eager (graph capture failed: {short_error(exc)})"
    torch.cuda.synchronize()
    return graph.replay, "graph"


def time_calls(calls: Sequence[Callable[[], object]], *, warmup: int, repeats: int,
               mode: str) -> tuple[float, str]:
    """Median microseconds per call (each sample runs every call once) and the timing used."""
    def run_all() -> None:
        for call in calls:
            call()

    for _ in range(max(1, warmup)):
        run_all()
    torch.cuda.synchronize()
    run: Callable[[], object] = run_all
    used = "eager"
    if mode == "graph":
        run, used = capture_graph(run_all)
        for _ in range(2):
            run()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / len(calls))
    return statistics.median(samples), used


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; for a wrapper subclass (semi-structured) its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float32."""
    return float((out.float() - ref.float()).abs().max()
                 / ref.float().abs().max().clamp_min(1e-12))


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
