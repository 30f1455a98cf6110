"""Kernel benchmark: dense vs 2:4 sparse tensor cores vs packed N:M Triton kernels, and decode.

For every weight shape (``OUTxIN``, the ``nn.Linear`` weight's shape) and batch size, in bf16:

* ``dense (cuBLAS)``: ``F.linear`` on the dense weight;
* ``2:4 cuSPARSELt`` / ``2:4 CUTLASS``: PyTorch's semi-structured sparse tensors through
  :class:`nmsparse.kernels.semi_structured.SemiStructuredLinear` (what ``accelerate`` installs);
* ``N:M Triton`` for 2:4, 4:8, 1:4, 2:8: ``nmsparse.kernels.nm_linear`` on
  ``nmsparse.packing.pack`` weights (``NMSPARSE_KERNELS=triton``: no silent fallback).

Every kernel is called eagerly (no ``torch.compile``) and timed by CUDA events around a CUDA
graph that replays one call per weight copy (``--timing graph``, the default: no Python or launch
overhead, for every kernel alike) or around the same calls made from Python (``--timing
eager``). The weight is rotated among enough copies that the L2 cache (50 MB on H100) holds
none of them when it is read again. Reported: median time per call, speedup over dense,
achieved bandwidth (bytes of weight + input + output / time), the memory-bound limit (bytes of
the dense call / bytes of this call) and the fraction of it reached, and the relative error
against ``F.linear`` on the same pruned weight.

End to end: greedy decoding of ``nmsparse.models`` ``gpt_1b`` (bf16, batch 1) with a static KV
cache, dense vs 2:4 (``accelerate`` and Triton) vs 2:8 (Triton), each decode step replayed as one
CUDA graph; tokens per second.

    python benchmarks/kernels.py                     # full run, writes docs/kernels.md
    python benchmarks/kernels.py --quick             # 2 shapes, fewer repeats, 32 tokens
    python benchmarks/kernels.py --shapes 4096x4096 --batches 1,16 --no-decode --no-write

Needs an NVIDIA GPU of compute capability >= 8.0; elsewhere it exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nmsparse._table import format_table

DEFAULT_OUT = Path("docs") / "kernels.md"  # relative to where it is run: the repository root
DEFAULT_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
QUICK_SHAPES = [(4096, 4096), (8192, 8192)]
DEFAULT_BATCHES = [1, 16, 256, 4096]
DEFAULT_PATTERNS = ["2:4", "4:8", "1:4", "2:8"]
EXIT_NO_GPU = 2
FALLBACK_L2_BYTES = 50 * 2**20  # H100 / H200
DTYPE = torch.bfloat16
COMMAND = "python benchmarks/kernels.py --out docs/kernels.md"

# (label, kernel kind) of the 2:4 tensor-core rows; Triton rows are added per pattern.
TENSOR_CORE_KERNELS = [("2:4 cuSPARSELt (torch)", "cusparselt"),
                       ("2:4 CUTLASS (torch)", "cutlass")]


# ------------------------------------------------------------------------------ arguments

def parse_shape(text: str) -> tuple[int, int]:
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r} is not OUTxIN with positive integers "
                                         "(e.g. 4096x11008)")
    return int(parts[0]), int(parts[1])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [parse_shape(part) for part in text.split(",") if part.strip()]


def parse_batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batches {text!r} are not integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batches {text!r} must be positive integers")
    return values


def parse_patterns(text: str) -> list[str]:
    from nmsparse import parse_pattern

    patterns = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            pattern = parse_pattern(part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        patterns.append(f"{pattern.n}:{pattern.m}")
    return patterns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time dense, 2:4 tensor-core and packed N:M Triton linear kernels and GPT "
                    "decode on a CUDA GPU; write the results as markdown.")
    parser.add_argument("--quick", action="store_true",
                        help="shapes 4096x4096 and 8192x8192 (unless --shapes), 3 warm-up and "
                             "10 timed runs, 32 decode tokens")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="markdown file to write (default: docs/kernels.md)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated weight shapes OUTxIN (default: "
                             + ",".join(f"{o}x{i}" for o, i in DEFAULT_SHAPES) + ")")
    parser.add_argument("--batches", type=parse_batches, default=None,
                        help="comma-separated batch sizes, rows of x (default: "
                             + ",".join(map(str, DEFAULT_BATCHES)) + ")")
    parser.add_argument("--patterns", type=parse_patterns, default=None,
                        help="N:M patterns of the Triton kernels (default: "
                             + ",".join(DEFAULT_PATTERNS) + ")")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 50)")
    parser.add_argument("--timing", choices=("graph", "eager"), default="graph",
                        help="replay the calls in a CUDA graph (default) or call them from "
                             "Python")
    parser.add_argument("--no-decode", action="store_true", help="skip the gpt_1b decode")
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="tokens generated per decode run (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    args.batches = args.batches or DEFAULT_BATCHES
    args.patterns = args.patterns or DEFAULT_PATTERNS
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    args.repeats = args.repeats if args.repeats is not None else (10 if args.quick else 50)
    if args.decode_tokens is None:
        args.decode_tokens = 32 if args.quick else 128
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for name in ("repeats", "decode_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def gpu_problem() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return (f"no CUDA GPU (torch.cuda.is_available() is False, torch {torch.__version__}); "
                "this benchmark needs an NVIDIA GPU of compute capability >= 8.0")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; 2:4 "
                "sparse tensor cores need 8.0 or newer")
    return None


# ------------------------------------------------------------------------------ results

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


def _shape_text(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _dense_of(results: Sequence[KernelResult], result: KernelResult) -> KernelResult | None:
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


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


KERNEL_HEADERS = ["shape", "batch", "kernel", "time (us)", "speedup", "GB/s", "limit",
                  "of limit", "rel err", "timing", "note"]


def kernel_rows(results: Sequence[KernelResult]) -> list[list[str]]:
    rows = []
    for result in results:
        m = metrics(result, _dense_of(results, result))
        rows.append([_shape_text(result.shape), str(result.batch), result.kernel,
                     _fmt(result.time_us, ".1f"), _fmt(m["speedup"], ".2f", "x"),
                     _fmt(m["gbps"], ".0f"), _fmt(m["limit"], ".2f", "x"),
                     _fmt(None if m["fraction"] is None else 100 * m["fraction"], ".0f", "%"),
                     _fmt(result.error, ".1e"), result.mode, result.note])
    return rows


def format_kernel_table(results: Sequence[KernelResult]) -> str:
    return format_table(KERNEL_HEADERS, kernel_rows(results), right_aligned=range(1, 9))


DECODE_HEADERS = ["model", "variant", "Linear layers", "tokens", "tokens/s", "speedup",
                  "logit err", "timing", "note"]


def decode_rows(results: Sequence[DecodeResult]) -> list[list[str]]:
    dense = next((r for r in results if r.pattern == "dense" and r.tokens_per_s), None)
    rows = []
    for result in results:
        speedup = (result.tokens_per_s / dense.tokens_per_s
                   if dense and result.tokens_per_s else None)
        rows.append([result.model, result.variant, result.layers, str(result.tokens),
                     _fmt(result.tokens_per_s, ".1f"), _fmt(speedup, ".2f", "x"),
                     _fmt(result.logit_error, ".1e"), result.mode, result.note])
    return rows


def format_decode_table(results: Sequence[DecodeResult]) -> str:
    return format_table(DECODE_HEADERS, decode_rows(results), right_aligned=range(3, 7))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


# ------------------------------------------------------------------------------ targets

@dataclass(frozen=True)
class Target:
    label: str
    patterns: tuple[str, ...]
    batch: int
    threshold: float
    kinds: tuple[str, ...] = ()  # kernel label fragments; empty: any kernel of the pattern
    shapes: tuple[tuple[int, int], ...] = ()  # empty: every shape measured
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
                speedup = metrics(result, _dense_of(results, result))["speedup"]
                if speedup is not None and (best is None or speedup > best[1]):
                    best = (result.kernel, speedup)
            where = f"{_shape_text(shape)}, batch {target.batch}"
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
        label = f"gpt_1b decode end to end, {pattern} (same threshold, for reference)"
        if not dense or not candidates:
            if decode:
                rows.append([label, "batch 1", "-", "not measured", f">= {threshold}x", "-"])
            continue
        best = max(candidates, key=lambda r: r.tokens_per_s)
        speedup = best.tokens_per_s / dense.tokens_per_s
        rows.append([label, "batch 1", best.variant, f"{speedup:.2f}x", f">= {threshold}x",
                     "yes" if speedup >= threshold else "no"])
    return rows


TARGET_HEADERS = ["target", "where", "kernel", "measured", "threshold", "met"]


# ------------------------------------------------------------------------------ markdown

METHOD_MD = """\
## What is compared

For each weight shape `OUTxIN` (the `nn.Linear` weight, bf16) and batch size (rows of the
input):

* **dense (cuBLAS)**: `torch.nn.functional.linear` on the dense weight;
* **2:4 cuSPARSELt (torch)** and **2:4 CUTLASS (torch)**: PyTorch's semi-structured sparse
  tensors (`torch.sparse.SparseSemiStructuredTensorCUSPARSELT` / `...CUTLASS`) through
  `nmsparse.kernels.semi_structured.SemiStructuredLinear`, the layer `accelerate(model)`
  installs (it pads the input rows to a multiple of 8 itself). Each backend is first probed
  with a small matmul checked against the dense result; a backend that cannot run on the GPU
  (PyTorch's CUTLASS 2:4 kernels check for compute capability 8.x) gets a row saying why;
* **N:M Triton (nmsparse)** at 2:4, 4:8, 1:4 and 2:8: `nmsparse.kernels.nm_linear` on weights
  packed by `nmsparse.packing.pack` (kept values + bit-packed in-group positions), with
  `NMSPARSE_KERNELS=triton` so that an unsupported call fails instead of silently timing the
  unpack + `F.linear` fallback.

End to end: greedy decoding with the `gpt_1b` preset of `nmsparse.models` (24 layers,
d_model 2048, byte vocabulary; built on the GPU, cast to bf16), batch 1, dense vs the same
model pruned by magnitude (`nmsparse.sparsify(model, "2:4", "fixed")` then
`nmsparse.finalize`) at 2:4 (converted by `accelerate` and, separately, by
`nmsparse.kernels.swap_linear_layers`) and at 2:8 (`swap_linear_layers`). Decoding uses a
static KV cache written for the benchmark from the model's own modules (each step feeds one
token, so every Linear sees one row, as in real decoding); the greedy next token is computed
on the GPU, so one step is one CUDA-graph replay with no host synchronisation (the decoder
is checked against the model's full forward on the CPU in `tests/test_bench_kernels.py`). The
weights are random (untrained): the tokens are meaningless, the arithmetic is the same.
**logit err** compares the first step's logits with the same pruned model in dense format.

## Method

* Timing: CUDA events; the median over the timed runs after warm-up runs (which also compile
  the Triton kernels). No `torch.compile` anywhere: every kernel is called eagerly, and with
  `--timing graph` (the default) the calls are captured once in a CUDA graph and the graph is
  replayed, which removes Python and launch overhead for every kernel alike (`--timing eager`
  times the Python calls instead; the `timing` column says which applied, and a failed capture
  falls back to eager and says so).
* Cold weights: each kernel gets `k` copies of its weight and one graph replay (or timed run)
  calls it once per copy in turn, so a copy is read again only after the others, together at
  least twice the L2 cache (50 MB on H100), went through; the time is divided by `k`. The
  input is one tensor per batch size (a layer's input is usually in cache in a model).
* Bytes: weight as stored (dense; compressed values + metadata for the 2:4 tensors; values +
  index bytes for the packed format) + input + output. **GB/s** = bytes / time.
  **limit** = bytes of the dense call / bytes of this call: the speedup a purely memory-bound
  kernel could reach. **of limit** = speedup / limit.
* **rel err**: max |y - y_ref| / max |y_ref| against `F.linear` with the same pruned weight
  (bf16: differences of order 1e-3 are rounding, order 1 would be a broken kernel).
"""

USAGE_MD = """\
## Using the kernels

```python
import nmsparse
from nmsparse.kernels import swap_linear_layers
from nmsparse.kernels.semi_structured import accelerate

nmsparse.finalize(model)                    # masks baked in: pruned weights are exact zeros
model = model.to("cuda", torch.bfloat16).eval()
print(accelerate(model))                    # 2:4 tensor cores, backend="auto" (or
                                            # "cusparselt", "cutlass")
# or, for any N:M with M in {4, 8, 16}: print(swap_linear_layers(model, "2:8"))
```

`accelerate` verifies every weight is 2:4 along the input dim before compressing it (PyTorch
does not check and would compute garbage), pads shapes that miss the kernels' tiles by at most
12.5 % (else leaves the layer dense), probes each backend, compares every converted layer with
its dense product, and with `backend="auto"` times both backends per weight shape. It returns
a per-layer report (converted or skipped with the reason, backend); `plan(model)` gives the
same verdicts without a GPU. Without CUDA, or on a GPU older than compute capability 8.0, it
raises `RuntimeError`.
"""

PLACEHOLDER_MD = f"""\
**GPU figures not yet measured.** No GPU was available in the session that wrote this page,
so it holds no measurement: the tables below only show what will be reported. To produce the
figures, on an NVIDIA H100 or H200 (torch 2.11, Triton 3.6) run

```
{COMMAND}
```

which replaces this page with the measured tables, the machine, the command and the date.
"""


def render_markdown(command: str = COMMAND, machine: dict[str, str] | None = None,
                    results: Sequence[KernelResult] | None = None,
                    decode: Sequence[DecodeResult] | None = None, settings: str = "") -> str:
    """The page: measured (``results`` given) or the placeholder saying nothing is measured."""
    parts = ["# N:M sparse linear kernels: benchmark", ""]
    measured = results is not None
    if measured:
        parts += ["These figures are measured by `benchmarks/kernels.py` on the machine below "
                  "(not estimated).", "",
                  markdown_table(["machine", ""], [[key, value] for key, value in
                                            (machine or {}).items()]), "",
                  f"Command: `{command}`", ""]
        if settings:
            parts += [f"Settings: {settings}", ""]
    else:
        parts += [PLACEHOLDER_MD]
    parts += [METHOD_MD, "## Targets", ""]
    target_lines = [
        "* batch-1 decode (one input row): 2:4 >= 1.6x dense; 1:4 and 2:8 >= 2.8x (the",
        "  memory-bound limits in bf16 are about 1.8x for 2:4, 3.6x for 1:4 and 3.2x for 2:8:",
        "  the packed weight takes 9/16, 9/32 and 5/16 of the dense bytes);",
        "* 8192x8192 at batch 4096 through the 2:4 sparse tensor cores (cuSPARSELt or",
        "  CUTLASS) >= 1.3x dense on H100; the published H100 figure is about 1.2x.",
        "",
    ]
    parts += target_lines
    if measured:
        parts += [markdown_table(TARGET_HEADERS, target_rows(results, decode or [])), ""]
        parts += ["## Linear layers", ""]
        for shape in dict.fromkeys(r.shape for r in results):
            subset = [r for r in results if r.shape == shape]
            rows = [row[1:] for row in kernel_rows(subset)]
            parts += [f"### {_shape_text(shape)} (out x in)", "",
                      markdown_table(KERNEL_HEADERS[1:], rows), ""]
        if decode:
            parts += ["## End-to-end decode", "",
                      markdown_table(DECODE_HEADERS, decode_rows(decode)), ""]
    else:
        parts += [markdown_table(["target", "threshold", "measured"], [
            ["batch-1 decode, 2:4", ">= 1.6x", "not yet measured"],
            ["batch-1 decode, 1:4", ">= 2.8x", "not yet measured"],
            ["batch-1 decode, 2:8", ">= 2.8x", "not yet measured"],
            ["8192x8192, batch 4096, 2:4 tensor cores (H100)", ">= 1.3x",
             "not yet measured"],
        ]), ""]
    parts += [USAGE_MD, "## Reproduce", "", "```", command, "```", "",
              "`--quick` for a shorter run, `--shapes 4096x4096,8192x8192 --batches 1,4096`",
              "to pick cases, `--no-decode` to skip the model, `--no-write` to print only.", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ timing

def l2_cache_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES)


def rotation_copies(weight_bytes: int, l2_bytes: int, cap: int = 256) -> int:
    """Copies so that the others, read between two uses of one copy, exceed 2x the L2."""
    return min(cap, max(2, math.ceil(2 * l2_bytes / max(1, weight_bytes)) + 1))


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def time_calls(calls: Sequence[Callable[[], object]], *, warmup: int, repeats: int,
               mode: str) -> tuple[float, str]:
    """Median microseconds per call (each sample runs every call once) and the timing used."""
    for _ in range(max(1, warmup)):
        for call in calls:
            call()
    torch.cuda.synchronize()
    run: Callable[[], object] | None = None
    used = "eager"
    if mode == "graph":
        graph = torch.cuda.CUDAGraph()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # capture wants the work seen once on a side stream
                for call in calls:
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
            run, used = graph.replay, "graph"
            for _ in range(2):
                run()
        except Exception as exc:  # noqa: BLE001 - reported in the table, timed eagerly
            run, used = None, f"eager (graph capture failed: {_short(exc)})"
        torch.cuda.synchronize()
    if run is None:
        def run() -> None:
            for call in calls:
                call()
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


# ------------------------------------------------------------------------------ kernels

def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def _prune(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    from nmsparse import nm_mask

    n, m = map(int, pattern.split(":"))
    return weight * nm_mask(weight, n, m)


def _kernel_specs(patterns: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, pattern, kind) of every kernel timed on each shape."""
    specs = [("dense (cuBLAS)", "dense", "dense")]
    specs += [(label, "2:4", kind) for label, kind in TENSOR_CORE_KERNELS]
    specs += [(f"{pattern} Triton (nmsparse)", pattern, "triton") for pattern in patterns]
    return specs


def _build_copies(kind: str, pattern: str, weight: torch.Tensor, l2: int,
                  ) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], int]:
    """Callables ``f(x)``, one per weight copy, and the bytes of one copy."""
    if kind == "dense":
        one = tensor_bytes(weight)
        copies = [weight.clone() for _ in range(rotation_copies(one, l2))]
        return [partial(_dense_call, w) for w in copies], one
    if kind in ("cusparselt", "cutlass"):
        from nmsparse.kernels.semi_structured import backend_error, semi_structured_linear

        error = backend_error(kind, weight.device, weight.dtype)
        if error:
            raise RuntimeError(error)
        first = semi_structured_linear(weight, backend=kind)
        one = tensor_bytes(first.weight)
        modules = [first] + [semi_structured_linear(weight.clone(), backend=kind)
                             for _ in range(rotation_copies(one, l2) - 1)]
        return list(modules), one
    from nmsparse.kernels import nm_linear
    from nmsparse.packing import pack

    n, m = map(int, pattern.split(":"))
    first = pack(weight, n, m)
    one = first.nbytes
    packed = [first] + [pack(weight.clone(), n, m) for _ in range(rotation_copies(one, l2) - 1)]
    return [partial(_packed_call, nm_linear, p.values, p.indices, n, m) for p in packed], one


def _dense_call(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _packed_call(op: Callable, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                 x: torch.Tensor) -> torch.Tensor:
    return op(x, values, indices, n, m)


def _progress(results: Sequence[KernelResult], result: KernelResult) -> str:
    m = metrics(result, _dense_of(results, result))
    return (f"{_shape_text(result.shape):>10}  batch {result.batch:>5}  {result.kernel:<26}  "
            f"{_fmt(result.time_us, '9.1f')} us  {_fmt(m['speedup'], '5.2f', 'x')}  "
            f"err {_fmt(result.error, '.1e')}  {result.mode}  {result.note}")


def run_kernels(args: argparse.Namespace, log: Callable[[str], None] = print,
                device: str = "cuda") -> list[KernelResult]:
    device = torch.device(device)
    l2 = l2_cache_bytes()
    element = torch.finfo(DTYPE).bits // 8
    results: list[KernelResult] = []
    for shape in args.shapes:
        out_features, in_features = shape
        generator = torch.Generator(device=device).manual_seed(args.seed)
        dense_weight = torch.randn(out_features, in_features, device=device, dtype=DTYPE,
                                   generator=generator) * 0.02
        inputs = {batch: torch.randn(batch, in_features, device=device, dtype=DTYPE,
                                     generator=generator) for batch in args.batches}
        pruned: dict[str, torch.Tensor] = {}
        for label, pattern, kind in _kernel_specs(args.patterns):
            if pattern != "dense" and pattern not in pruned:
                pruned[pattern] = _prune(dense_weight, pattern)
            weight = dense_weight if pattern == "dense" else pruned[pattern]
            try:
                calls, one = _build_copies(kind, pattern, weight, l2)
            except Exception as exc:  # noqa: BLE001 - the row says why it is missing
                for batch in args.batches:
                    result = KernelResult(shape, batch, label, pattern, 0,
                                          batch * (in_features + out_features) * element,
                                          note=f"unavailable: {_short(exc)}")
                    results.append(result)
                    log(_progress(results, result))
                continue
            for batch in args.batches:
                x = inputs[batch]
                result = KernelResult(shape, batch, label, pattern, one,
                                      batch * (in_features + out_features) * element)
                try:
                    with torch.no_grad():
                        result.error = _relative_error(calls[0](x), F.linear(x, weight))
                        bound = [partial(call, x) for call in calls]
                        result.time_us, result.mode = time_calls(
                            bound, warmup=args.warmup, repeats=args.repeats, mode=args.timing)
                    result.note = f"{len(calls)} weight copies"
                except Exception as exc:  # noqa: BLE001
                    result.note = f"failed: {_short(exc)}"
                results.append(result)
                log(_progress(results, result))
            del calls
            _empty_cache()
    return results


# ------------------------------------------------------------------------------ decode

class StaticKVDecoder:
    """Greedy batch-1 decoding of an ``nmsparse.models`` GPT with a static KV cache.

    Reuses the model's modules (whatever their Linear layers are: dense, semi-structured or
    packed N:M): per step one token goes through every block; keys and values are written
    into preallocated caches at the current position and attention covers positions
    ``<= pos`` through a mask, so every tensor keeps its shape and address and one step can
    be captured in a CUDA graph. The argmax token and the position advance on the device.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        if max_len > model.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's {model.max_seq_len}")
        self.model = model
        self.max_len = max_len
        first = model.blocks[0].attn
        self.n_head = first.n_head
        self.d_model = model.tok_emb.embedding_dim
        head_dim = self.d_model // self.n_head
        weight = model.tok_emb.weight
        shape = (len(model.blocks), 1, self.n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros_like(self.keys)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=weight.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.tokens = torch.zeros(max_len, dtype=torch.long, device=weight.device)
        self.positions = torch.arange(max_len, device=weight.device)

    def reset(self, token: int = 0) -> None:
        """Back to position 0 with ``token`` as the first input (in place: graph-safe)."""
        self.keys.zero_()
        self.values.zero_()
        self.tokens.zero_()
        self.pos.zero_()
        self.token.fill_(token)

    def step(self) -> torch.Tensor:
        """Feed the current token at the current position; returns logits ``(1, vocab)``."""
        model, d_model, heads = self.model, self.d_model, self.n_head
        x = model.tok_emb(self.token) + model.pos_emb(self.pos)  # (1, 1, d)
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for i, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = (t.reshape(1, 1, heads, d_model // heads).transpose(1, 2)
                       for t in attn.qkv(block.ln1(x)).split(d_model, dim=2))
            self.keys[i].index_copy_(2, self.pos, k)
            self.values[i].index_copy_(2, self.pos, v)
            y = F.scaled_dot_product_attention(q, self.keys[i], self.values[i], attn_mask=mask)
            x = x + attn.resid_dropout(attn.proj(y.transpose(1, 2).reshape(1, 1, d_model)))
            x = x + block.mlp(block.ln2(x))
        logits = model.lm_head(model.ln_f(x))[:, -1]
        next_token = logits.argmax(-1)
        self.tokens.index_copy_(0, self.pos, next_token)
        self.token.copy_(next_token.view(1, 1))
        self.pos.add_(1)
        return logits

    def generate(self, steps: int, token: int = 0) -> list[int]:
        """Eager greedy decoding from ``token``: the ``steps`` tokens produced."""
        if steps > self.max_len:
            raise ValueError(f"{steps} steps exceed the cache of {self.max_len}")
        self.reset(token)
        with torch.no_grad():
            for _ in range(steps):
                self.step()
        return self.tokens[:steps].tolist()


def time_decode(model: nn.Module, tokens: int, mode: str, repeats: int = 3,
                ) -> tuple[float, str]:
    """Median seconds to generate ``tokens`` tokens greedily from token 0."""
    decoder = StaticKVDecoder(model, tokens)
    run: Callable[[], object] = decoder.step
    used = "eager"
    with torch.no_grad():
        decoder.reset()
        for _ in range(3):  # compiles the Triton kernels, initialises cuSPARSELt
            decoder.step()
        torch.cuda.synchronize()
        if mode == "graph":
            graph = torch.cuda.CUDAGraph()
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    decoder.step()
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    decoder.step()
                run, used = graph.replay, "graph"
            except Exception as exc:  # noqa: BLE001 - reported, timed eagerly
                used = f"eager (graph capture failed: {_short(exc)})"
            torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            decoder.reset()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(tokens):
                run()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples), used


def _first_logits(model: nn.Module) -> torch.Tensor:
    decoder = StaticKVDecoder(model, 1)
    decoder.reset()
    with torch.no_grad():
        return decoder.step().float()


def run_decode(args: argparse.Namespace, log: Callable[[str], None] = print,
               device: str = "cuda", model_name: str = "gpt_1b",
               options: dict | None = None) -> list[DecodeResult]:
    import nmsparse
    from nmsparse.kernels import swap_linear_layers
    from nmsparse.kernels.semi_structured import accelerate
    from nmsparse.models import create_model

    torch.manual_seed(args.seed)
    with torch.device(device):  # gpt_1b: ~4.8 GB of fp32 weights, built where it runs
        base = create_model(model_name, input_shape=(1024,), num_classes=256,
                            task="language_model", **(options or {}))
    base = base.to(DTYPE).eval()
    total = sum(isinstance(m, nn.Linear) for m in base.modules())
    results: list[DecodeResult] = []

    def measure(result: DecodeResult, model: nn.Module, reference: torch.Tensor | None) -> None:
        try:
            if reference is not None:
                result.logit_error = _relative_error(_first_logits(model), reference)
            result.seconds, result.mode = time_decode(model, args.decode_tokens, args.timing)
        except Exception as exc:  # noqa: BLE001
            result.note = f"failed: {_short(exc)}"
        results.append(result)
        log(format_decode_table(results).splitlines()[-1])

    measure(DecodeResult("dense (cuBLAS)", "dense", f"{total} dense", args.decode_tokens,
                         model=model_name), base, None)

    def via_accelerate(model: nn.Module) -> int:
        return len(accelerate(model).converted)

    def via_triton(pattern: str) -> Callable[[nn.Module], int]:
        return lambda model: len(swap_linear_layers(model, pattern).swapped)

    variants = {"2:4": [("2:4 tensor cores (accelerate)", via_accelerate),
                        ("2:4 Triton (swap_linear_layers)", via_triton("2:4"))],
                "2:8": [("2:8 Triton (swap_linear_layers)", via_triton("2:8"))]}
    for pattern, conversions in variants.items():
        pruned = copy.deepcopy(base)
        nmsparse.sparsify(pruned, pattern, "fixed")
        nmsparse.finalize(pruned)
        reference = _first_logits(pruned)
        for label, convert in conversions:
            result = DecodeResult(label, pattern, "-", args.decode_tokens, model=model_name)
            model = copy.deepcopy(pruned)
            try:
                result.layers = f"{convert(model)}/{total} {pattern}"
            except Exception as exc:  # noqa: BLE001
                result.note = f"conversion failed: {_short(exc)}"
                results.append(result)
                continue
            measure(result, model, reference)
            del model
            _empty_cache()
        del pruned
        _empty_cache()
    return results


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ main

def machine_info() -> dict[str, str]:
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    cusparselt_version = cusparselt.version() if cusparselt and cusparselt.is_available() \
        else "not available"
    return {
        "GPU": f"{props.name} (compute capability {props.major}.{props.minor}, "
               f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
               f"L2 {l2_cache_bytes() / 2**20:.0f} MiB)",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": triton_version,
        "cuSPARSELt": str(cusparselt_version),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    problem = gpu_problem()
    if problem:
        print(f"nmsparse bench: {problem}. Nothing was measured and "
              f"{args.out} was not written.", file=sys.stderr)
        return EXIT_NO_GPU
    # Time the Triton kernels, never their unpack + F.linear fallback.
    os.environ["NMSPARSE_KERNELS"] = "triton"
    torch.manual_seed(args.seed)
    machine = machine_info()
    print("\n".join(f"{key}: {value}" for key, value in machine.items()), flush=True)
    results = run_kernels(args, log=lambda line: print(line, flush=True))
    decode = [] if args.no_decode else run_decode(args, log=lambda line: print(line, flush=True))
    print()
    print(format_kernel_table(results))
    if decode:
        print()
        print(format_decode_table(decode))
    print()
    print(format_table(TARGET_HEADERS, target_rows(results, decode)))
    if not args.no_write:
        settings = (f"timing {args.timing}, {args.warmup} warm-up and {args.repeats} timed runs, "
                    f"bf16, decode {args.decode_tokens} tokens")
        command = "python benchmarks/kernels.py" + (" " + shlex.join(argv) if argv else "")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_markdown(command, machine, results, decode, settings))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
