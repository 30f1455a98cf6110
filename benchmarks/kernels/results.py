"""Result rows of the kernel benchmark, their derived metrics, the targets and the tables.

Pure data and formatting: no GPU, no torch. The GPU check (``benchmarks/gpu_check``) builds
these rows from its fixtures in a dry run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from nmsparse.tables import format_table


@dataclass
class KernelResult:
    """One kernel on one weight shape and batch size."""

    shape: tuple[int, int]  # (out, in)
    batch: int
    kernel: str
    pattern: str  # "dense" or "N:M"
    weight_bytes: int
    act_bytes: int  # input + output
    time_us: float | None = None
    mode: str = ""
    error: float | None = None  # max |y - y_ref| / max |y_ref|
    note: str = ""

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.act_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass
class DecodeResult:
    variant: str
    pattern: str
    layers: str  # "converted / all Linear layers"
    tokens: int
    seconds: float | None = None
    mode: str = ""
    logit_error: float | None = None  # first step against the same weights in dense format
    note: str = ""
    model: str = "gpt_1b"

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def shape_text(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def dense_of(results: Sequence[KernelResult], result: KernelResult) -> KernelResult | None:
    for other in results:
        if (other.shape, other.batch, other.pattern) == (result.shape, result.batch, "dense"):
            return other
    return None


def metrics(result: KernelResult, dense: KernelResult | None) -> dict[str, float | None]:
    """Speedup over dense, achieved GB/s, memory-bound limit and the fraction of it reached."""
    out: dict[str, float | None] = {"speedup": None, "gbps": None, "limit": None,
                                    "fraction": None}
    if result.time_us:
        out["gbps"] = result.bytes / (result.time_us * 1e-6) / 1e9
    if dense is not None and result.weight_bytes:
        out["limit"] = dense.bytes / result.bytes
    if dense is not None and result.time_us and dense.time_us:
        out["speedup"] = dense.time_us / result.time_us
        if out["limit"]:
            out["fraction"] = out["speedup"] / out["limit"]
    return out


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


KERNEL_HEADERS = ["shape", "batch", "kernel", "time (us)", "speedup", "GB/s", "limit",
                  "of limit", "rel err", "timing", "note"]
KERNEL_NUMERIC = (1, 3, 4, 5, 6, 7, 8)  # columns of KERNEL_HEADERS aligned right


def kernel_rows(results: Sequence[KernelResult]) -> list[list[str]]:
    rows = []
    for result in results:
        m = metrics(result, dense_of(results, result))
        rows.append([shape_text(result.shape), str(result.batch), result.kernel,
                     fmt(result.time_us, ".1f"), fmt(m["speedup"], ".2f", "x"),
                     fmt(m["gbps"], ".0f"), fmt(m["limit"], ".2f", "x"),
                     fmt(None if m["fraction"] is None else 100 * m["fraction"], ".0f", "%"),
                     fmt(result.error, ".1e"), result.mode, result.note])
    return rows


def format_kernel_table(results: Sequence[KernelResult]) -> str:
    return format_table(KERNEL_HEADERS, kernel_rows(results), right_aligned=KERNEL_NUMERIC)


def progress_line(results: Sequence[KernelResult], result: KernelResult) -> str:
    """One result as a log line while the benchmark runs."""
    m = metrics(result, dense_of(results, result))
    return (f"{shape_text(result.shape):>10}  batch {result.batch:>5}  {result.kernel:<26}  "
            f"{fmt(result.time_us, '9.1f')} us  {fmt(m['speedup'], '5.2f', 'x')}  "
            f"err {fmt(result.error, '.1e')}  {result.mode}  {result.note}")


DECODE_HEADERS = ["model", "variant", "Linear layers", "tokens", "tokens/s", "speedup",
                  "logit err", "timing", "note"]
DECODE_NUMERIC = range(3, 7)


def decode_rows(results: Sequence[DecodeResult]) -> list[list[str]]:
    dense = next((r for r in results if r.pattern == "dense" and r.tokens_per_s), None)
    rows = []
    for result in results:
        speedup = (result.tokens_per_s / dense.tokens_per_s
                   if dense and result.tokens_per_s else None)
        rows.append([result.model, result.variant, result.layers, str(result.tokens),
                     fmt(result.tokens_per_s, ".1f"), fmt(speedup, ".2f", "x"),
                     fmt(result.logit_error, ".1e"), result.mode, result.note])
    return rows


def format_decode_table(results: Sequence[DecodeResult], markdown: bool = False) -> str:
    return format_table(DECODE_HEADERS, decode_rows(results), right_aligned=DECODE_NUMERIC,
                        markdown=markdown)


# ------------------------------------------------------------------------------ targets

@dataclass(frozen=True)
class Target:
    label: str
    patterns: tuple[str, ...]
    batch: int
    threshold: float
    kinds: tuple[str, ...] = ()  # substrings of the kernel label; empty: any kernel
    shapes: tuple[tuple[int, int], ...] = ()  # empty: every measured shape
    note: str = ""


TARGETS = [
    Target("batch-1 decode, 2:4 (best 2:4 kernel)", ("2:4",), 1, 1.6),
    Target("batch-1 decode, 1:4", ("1:4",), 1, 2.8),
    Target("batch-1 decode, 2:8", ("2:8",), 1, 2.8),
    Target("8192x8192 at batch 4096, 2:4 tensor cores", ("2:4",), 4096, 1.3,
           kinds=("cuSPARSELt", "CUTLASS"), shapes=((8192, 8192),),
           note="on H100; the published H100 figure is about 1.2x"),
]
DECODE_TARGETS = [("2:4", 1.6), ("2:8", 2.8)]
TARGET_HEADERS = ["target", "where", "kernel", "measured", "threshold", "met"]


def target_rows(results: Sequence[KernelResult],
                decode: Sequence[DecodeResult] = ()) -> list[list[str]]:
    """[target, where, best kernel, measured, threshold, met] per target and shape."""
    rows = []
    for target in TARGETS:
        shapes = target.shapes or tuple(dict.fromkeys(r.shape for r in results))
        for shape in shapes:
            best = None
            for result in results:
                if (result.shape != shape or result.batch != target.batch
                        or result.pattern not in target.patterns
                        or (target.kinds and not any(k in result.kernel for k in target.kinds))):
                    continue
                speedup = metrics(result, dense_of(results, result))["speedup"]
                if speedup is not None and (best is None or speedup > best[1]):
                    best = (result.kernel, speedup)
            where = f"{shape_text(shape)}, batch {target.batch}"
            if best is None:
                rows.append([target.label, where, "-", "not measured", f">= {target.threshold}x",
                             "-"])
            else:
                rows.append([target.label, where, best[0], f"{best[1]:.2f}x",
                             f">= {target.threshold}x", "yes" if best[1] >= target.threshold
                             else "no"])
    dense = next((r for r in decode if r.pattern == "dense" and r.tokens_per_s), None)
    for pattern, threshold in DECODE_TARGETS:
        candidates = [r for r in decode if r.pattern == pattern and r.tokens_per_s]
        model = decode[0].model if decode else "gpt_1b"
        label = f"{model} decode end to end, {pattern} (same threshold, for reference)"
        if not dense or not candidates:
            if decode:
                rows.append([label, "batch 1", "-", "not measured", f">= {threshold}x", "-"])
            continue
        best = max(candidates, key=lambda r: r.tokens_per_s)
        speedup = best.tokens_per_s / dense.tokens_per_s
        rows.append([label, "batch 1", best.variant, f"{speedup:.2f}x", f">= {threshold}x",
                     "yes" if speedup >= threshold else "no"])
    return rows
