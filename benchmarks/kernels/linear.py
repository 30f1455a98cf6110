"""The Linear-layer runs: every kernel on every weight shape and batch size, cold weights."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from nmsparse import nm_mask
from nmsparse.kernels import nm_linear, semi_structured
from nmsparse.packing import pack

from . import timing
from .results import KernelResult, progress_line

DTYPE = torch.bfloat16
# (label, kernel kind) of the 2:4 tensor-core rows; Triton rows are added per pattern.
TENSOR_CORE_KERNELS = [("2:4 cuSPARSELt (torch)", "cusparselt"),
                       ("2:4 CUTLASS (torch)", "cutlass")]


def prune(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    n, m = map(int, pattern.split(":"))
    return weight * nm_mask(weight, n, m)


def kernel_specs(patterns: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, pattern, kind) of every kernel timed on each shape."""
    specs = [("dense (cuBLAS)", "dense", "dense")]
    specs += [(label, "2:4", kind) for label, kind in TENSOR_CORE_KERNELS]
    specs += [(f"{pattern} Triton (nmsparse)", pattern, "triton") for pattern in patterns]
    return specs


def build_copies(kind: str, pattern: str, weight: torch.Tensor, l2: int,
                 ) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], int]:
    """Callables ``f(x)``, one per weight copy, and the bytes of one copy."""
    if kind == "dense":
        one = timing.tensor_bytes(weight)
        copies = [weight.clone() for _ in range(timing.rotation_copies(one, l2))]
        return [partial(_dense_call, w) for w in copies], one
    if kind in ("cusparselt", "cutlass"):
        error = semi_structured.backend_error(kind, weight.device, weight.dtype)
        if error:
            raise RuntimeError(error)
        first = semi_structured.semi_structured_linear(weight, backend=kind)
        one = timing.tensor_bytes(first.weight)
        modules = [first] + [semi_structured.semi_structured_linear(weight.clone(), backend=kind)
                             for _ in range(timing.rotation_copies(one, l2) - 1)]
        return list(modules), one
    n, m = map(int, pattern.split(":"))
    first = pack(weight, n, m)
    one = first.nbytes
    packed = [first] + [pack(weight.clone(), n, m)
                        for _ in range(timing.rotation_copies(one, l2) - 1)]
    return [partial(_packed_call, p.values, p.indices, n, m) for p in packed], one


def _dense_call(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _packed_call(values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                 x: torch.Tensor) -> torch.Tensor:
    return nm_linear(x, values, indices, n, m)


def run_kernels(args: argparse.Namespace, log: Callable[[str], None] = print,
                device: str = "cuda",
                progress: Callable[[list[KernelResult]], None] | None = None,
                ) -> list[KernelResult]:
    """Every kernel of :func:`kernel_specs` on ``args.shapes`` x ``args.batches``; a kernel
    that cannot be built or run gets rows saying why instead of times. ``progress`` gets the
    results so far after each new one (to save partial results)."""
    device = torch.device(device)
    l2 = timing.l2_cache_bytes()
    element = torch.finfo(DTYPE).bits // 8
    results: list[KernelResult] = []

    def add(result: KernelResult) -> None:
        results.append(result)
        log(progress_line(results, result))
        if progress:
            progress(results)

    for shape in args.shapes:
        out_features, in_features = shape
        generator = torch.Generator(device=device).manual_seed(args.seed)
        dense_weight = torch.randn(out_features, in_features, device=device, dtype=DTYPE,
                                   generator=generator) * 0.02
        inputs = {batch: torch.randn(batch, in_features, device=device, dtype=DTYPE,
                                     generator=generator) for batch in args.batches}
        pruned: dict[str, torch.Tensor] = {}
        for label, pattern, kind in kernel_specs(args.patterns):
            if pattern != "dense" and pattern not in pruned:
                pruned[pattern] = prune(dense_weight, pattern)
            weight = dense_weight if pattern == "dense" else pruned[pattern]
            try:
                calls, one = build_copies(kind, pattern, weight, l2)
            except Exception as exc:  # noqa: BLE001 - the row says why it is missing
                for batch in args.batches:
                    result = KernelResult(shape, batch, label, pattern, 0,
                                          batch * (in_features + out_features) * element,
                                          note=f"unavailable: {timing.short_error(exc)}")
                    add(result)
                continue
            for batch in args.batches:
                x = inputs[batch]
                result = KernelResult(shape, batch, label, pattern, one,
                                      batch * (in_features + out_features) * element)
                try:
                    with torch.no_grad():
                        result.error = timing.relative_error(calls[0](x), F.linear(x, weight))
                        bound = [partial(call, x) for call in calls]
                        result.time_us, result.mode = timing.time_calls(
                            bound, warmup=args.warmup, repeats=args.repeats, mode=args.timing)
                    result.note = f"{len(calls)} weight copies"
                except Exception as exc:  # noqa: BLE001
                    result.note = f"failed: {timing.short_error(exc)}"
                add(result)
            del calls
            timing.empty_cache()
    return results
