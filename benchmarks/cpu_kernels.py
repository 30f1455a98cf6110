"""CPU N:M Linear kernels vs dense ``F.linear``, and greedy GPT decoding, on this machine.

    python benchmarks/cpu_kernels.py                 # full run, writes docs/cpu_kernels.md
    python benchmarks/cpu_kernels.py --quick         # fewer repeats, a smaller decode model
    python benchmarks/cpu_kernels.py --threads 2 --out /tmp/cpu.md
    python benchmarks/cpu_kernels.py --threads 1 --clock cpu   # for a busy machine, see below

**Linear.** For each weight ``OUTxIN`` (4096x4096, 4096x11008, 11008x4096) and input rows
(1, 4, 16, 64): dense fp32 and dense bf16 ``F.linear`` against ``nm_linear`` (the
``torch.ops.nmsparse.nm_linear`` op with ``NMSPARSE_KERNELS=cpu``, i.e. the kernels of
``nmsparse.kernels.cpu`` or an error) on the same weight pruned to 2:4, 4:8, 1:4, 2:8, 1:8
and 1:16 by magnitude, in fp32 and bf16. Same process, same thread count
(``torch.set_num_threads``). Cold weights: every method cycles through enough copies of its
weight to read at least ``--cold-mb`` (default 320 MB, ten times a 32 MB L3) between two uses
of one copy. The methods of one shape and row count run in turn, round after round, so a
busy machine slows all alike; the table gives the median over the rounds. ``--clock wall``
(default) times with ``time.perf_counter``. On a machine shared with other jobs, waiting for
the CPU dominates wall times (an OpenMP region waits for its slowest thread to be scheduled),
so ``--clock cpu`` (only with ``--threads 1``) times with ``time.process_time``: the CPU time
the one thread spent, stalls on memory included, time spent descheduled excluded.

Columns: ms (median), GB/s (weight bytes read per second: dense bytes, or packed values +
positions), speedup over dense fp32 (the fastest dense path here) and over dense of the same
dtype, the bandwidth limit (dense bytes of that dtype / packed bytes: the speedup a kernel
reading only the packed bytes at dense's GB/s would get) and the fraction of it reached.

**Decode.** Greedy decoding (one token per step, static KV cache: ``GPT.decoder``) of a
byte-level GPT of ``--layers`` x ``--width`` (default 16 x 1024, 202M parameters, fp32,
random weights), dense vs the same model with every Linear pruned to 2:4, 2:8, 1:4 by
magnitude and swapped to ``NMLinear`` (``swap_linear_layers``). tokens/s is the median over
repeats; "same tokens" compares the tokens with the pruned model run dense.
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.kernels import nm_linear, swap_linear_layers
from nmsparse.kernels.cpu import build_error
from nmsparse.machine import cpu_model
from nmsparse.masks import nm_mask
from nmsparse.models.gpt import GPT, gpt_param_count
from nmsparse.packing import pack
from nmsparse.tables import format_table

OUT = Path(__file__).resolve().parents[1] / "docs" / "cpu_kernels.md"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
ROWS = [1, 4, 16, 64]
PATTERNS = [(2, 4), (4, 8), (1, 4), (2, 8), (1, 8), (1, 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_PATTERNS = ["2:4", "2:8", "1:4"]


class Method:
    """One way of computing ``x @ W.T`` with its own cold copies of the weight."""

    def __init__(self, name: str, dtype: str, pattern: str, copies: list, nbytes: int,
                 dense_nbytes: int) -> None:
        self.name, self.dtype, self.pattern = name, dtype, pattern
        self.copies, self.nbytes, self.dense_nbytes = copies, nbytes, dense_nbytes
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        weight = self.copies[i % len(self.copies)]
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight)
        return nm_linear(x, weight.values, weight.indices, weight.n, weight.m)


def copies_for(nbytes: int, cold_bytes: int) -> int:
    return max(2, math.ceil(cold_bytes / nbytes))


def linear_methods(out_f: int, in_f: int, cold_bytes: int) -> list[Method]:
    generator = torch.Generator().manual_seed(out_f * 7 + in_f)
    base = torch.randn(out_f, in_f, generator=generator)
    methods = []
    for dtype_name, dtype in DTYPES.items():
        dense = base.to(dtype)
        nbytes = dense.numel() * dense.element_size()
        copies = [dense.clone() for _ in range(copies_for(nbytes, cold_bytes))]
        methods.append(Method(f"dense {dtype_name}", dtype_name, "dense", copies, nbytes,
                              nbytes))
    for n, m in PATTERNS:
        pruned = base * nm_mask(base, n, m)
        for dtype_name, dtype in DTYPES.items():
            packed = pack(pruned.to(dtype), n, m)
            copies = [type(packed)(packed.values.clone(), packed.indices.clone(), n, m,
                                   packed.shape) for _ in range(copies_for(packed.nbytes,
                                                                           cold_bytes))]
            methods.append(Method(f"{n}:{m} {dtype_name}", dtype_name, f"{n}:{m}", copies,
                                  packed.nbytes, packed.dense_nbytes))
    return methods


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_TEXT = {"wall": "wall (time.perf_counter)",
              "cpu": "cpu (time.process_time: CPU time of the one thread)"}
clock = time.perf_counter


def time_linear(out_f: int, in_f: int, rows_list: list[int], repeats: int, cold_bytes: int,
                log) -> list[list[str]]:
    methods = linear_methods(out_f, in_f, cold_bytes)
    table = []
    for rows in rows_list:
        x32 = torch.randn(rows, in_f)
        inputs = {"fp32": x32, "bf16": x32.bfloat16()}
        for method in methods:
            method.times = []
            for i in range(len(method.copies)):  # warm-up: touch every copy once
                method(inputs[method.dtype], i)
        for round_ in range(repeats):
            for method in methods:
                x = inputs[method.dtype]
                start = clock()
                method(x, round_)
                method.times.append(clock() - start)
        median = {method.name: statistics.median(method.times) for method in methods}
        for method in methods:
            t = median[method.name]
            same = median[f"dense {method.dtype}"]
            limit = method.dense_nbytes / method.nbytes
            speed_same = same / t
            table.append([f"{out_f}x{in_f}", rows, method.name, f"{t * 1e3:.3f}",
                          f"{method.nbytes / t / 1e9:.1f}", f"{median['dense fp32'] / t:.2f}x",
                          f"{speed_same:.2f}x", f"{limit:.2f}x",
                          "" if method.pattern == "dense" else f"{speed_same / limit:.0%}"])
        log(format_table(HEAD, table[-len(methods):], right_aligned=range(1, 9)))
    return table


HEAD = ["weight", "rows", "method", "ms", "GB/s", "vs dense fp32", "vs dense same dtype",
        "bandwidth limit", "of limit"]


def magnitude_prune(model: nn.Module, n: int, m: int) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(nm_mask(module.weight, n, m))


def decode_rate(model: GPT, steps: int, repeats: int) -> tuple[float, list[int]]:
    decoder = model.decoder(steps)
    rates, tokens = [], []
    for _ in range(repeats + 1):  # the first run warms up (and builds the kernels)
        start = clock()
        tokens = decoder.generate(steps, token=0)[0]
        rates.append(steps / (clock() - start))
    return statistics.median(rates[1:] or rates), tokens


def time_decode(layers: int, width: int, steps: int, repeats: int, log) -> list[list[str]]:
    torch.manual_seed(0)
    model = GPT(vocab_size=256, max_seq_len=max(steps, 64), n_layer=layers,
                n_head=width // 64, d_model=width).eval()
    rows = []
    with torch.no_grad():
        dense_rate, _ = decode_rate(model, steps, repeats)
        rows.append(["dense fp32", "nn.Linear", f"{dense_rate:.2f}", "1.00x", ""])
        log(format_table(DECODE_HEAD, rows[-1:]))
        for pattern in DECODE_PATTERNS:
            n, m = map(int, pattern.split(":"))
            pruned = copy.deepcopy(model)
            magnitude_prune(pruned, n, m)
            _, dense_tokens = decode_rate(pruned, steps, 0)
            report = swap_linear_layers(pruned, pattern)
            rate, tokens = decode_rate(pruned, steps, repeats)
            rows.append([f"{pattern} fp32", f"{len(report.swapped)} NMLinear", f"{rate:.2f}",
                         f"{rate / dense_rate:.2f}x", "yes" if tokens == dense_tokens else "no"])
            log(format_table(DECODE_HEAD, rows[-1:]))
            del pruned
    return rows


DECODE_HEAD = ["model", "linear layers", "tokens/s", "vs dense", "same tokens"]


def machine_line(threads: int) -> str:
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{threads} threads, Python {platform.python_version()}")


def load_line() -> str:
    try:
        return "load average (1, 5, 15 min) at the end: " + ", ".join(
            f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 repeats, rows 1 and 16, decode 8 x 512 for 16 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cold-mb", type=int, default=320)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="tokens decoded per run")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    global clock
    clock = CLOCKS[args.clock]
    error = build_error()
    if error:
        print(f"the CPU kernels cannot run here: {error}", file=sys.stderr)
        return 1
    os.environ["NMSPARSE_KERNELS"] = "cpu"  # a kernel that cannot run fails, never falls back
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    rows_list = [1, 16] if args.quick else ROWS
    layers = args.layers or (8 if args.quick else 16)
    width = args.width or (512 if args.quick else 1024)
    steps = args.steps or (16 if args.quick else 32)
    started = datetime.datetime.now(datetime.timezone.utc)

    def log(text: str) -> None:
        print(text, flush=True)

    linear_rows: list[list[str]] = []
    for out_f, in_f in SHAPES:
        linear_rows += time_linear(out_f, in_f, rows_list, repeats, args.cold_mb << 20, log)
    decode_rows = [] if args.no_decode else time_decode(layers, width, steps, repeats, log)
    params = gpt_param_count(n_layer=layers, d_model=width, max_seq_len=max(steps, 64))
    command = "python benchmarks/cpu_kernels.py " + shlex.join(argv if argv is not None
                                                               else sys.argv[1:])
    page = [
        "# CPU N:M kernels: measured",
        "",
        f"* Date: {started:%Y-%m-%d %H:%M} UTC; command: `{command.strip()}`",
        f"* Machine: {machine_line(args.threads)}",
        f"* {load_line()} (the machine may have been shared: compare rows of one table, "
        "which ran interleaved, rather than absolute times)",
        f"* Clock: {CLOCK_TEXT[args.clock]}. "
        f"Median of {repeats} interleaved rounds; each method cycles through copies of its "
        f"weight totalling >= {args.cold_mb} MB (cold). What the columns mean, and how to "
        "rerun: the docstring of `benchmarks/cpu_kernels.py`.",
        "",
        "## Linear: x @ W.T",
        "",
        format_table(HEAD, linear_rows, right_aligned=range(1, 9), markdown=True),
        "",
    ]
    if decode_rows:
        page += [
            f"## Greedy decode: GPT {layers} layers x {width} ({params / 1e6:.0f}M parameters, "
            f"fp32, batch 1, {steps} tokens)",
            "",
            format_table(DECODE_HEAD, decode_rows, right_aligned=[2, 3], markdown=True),
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text("\n".join(page))
    os.replace(temporary, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
