"""Where a swapped layer is slower than ``nn.Linear`` on the CPU: small layers, warm.

    python benchmarks/cpu_small_layers.py      # writes benchmarks/results/cpu_small_layers.md

``benchmarks/cpu_kernels.py`` times LLM-sized weights read cold from memory, where reading fewer
bytes wins. A small layer's weight stays in cache and its product takes microseconds, so what
decides is the cost of a call: ``NMLinear``'s Python checks, casts and the ctypes call (about
15-25 us on a 2-core EPYC) against ``nn.Linear``'s (about 7 us). Per shape (default 256x64 and
256x256, the demo MLP's, up to 4096x4096), dtype and row count: the median time of ``nn.Linear``,
of the same weight pruned 2:4 and swapped (``NMLinear``, called as users call it) and, for bf16
on a CPU with AVX512_BF16, prepared (``PreparedNMLinear``), under ``torch.no_grad``, the three
taking turns round after round on one warm weight each; and their speedups over ``nn.Linear``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch import nn

from benchmarks.cpu_kernels import features_line, load_text
from nmsparse.kernels import NMLinear, cpu, prepare_cpu
from nmsparse.machine import cpu_model
from nmsparse.tables import format_table

OUT = Path(__file__).resolve().parent / "results" / "cpu_small_layers.md"


def pruned_linear(out_features: int, in_features: int, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, dtype=dtype)
    groups = layer.weight.data.view(-1, 4)
    groups.scatter_(1, groups.float().abs().argsort(dim=1)[:, :2], 0)
    return layer


def per_call_us(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def measure(shape: tuple[int, int], dtype: torch.dtype, rows: int, rounds: int) -> list[object]:
    out_features, in_features = shape
    dense = pruned_linear(out_features, in_features, dtype)
    methods = {"nn.Linear": dense, "NMLinear": NMLinear.from_linear(dense, 2, 4)}
    if dtype == torch.bfloat16 and cpu.isa() == "avx512bf16":
        prepared = nn.Sequential(NMLinear.from_linear(dense, 2, 4))
        prepare_cpu(prepared)
        methods["prepared"] = prepared
    x = torch.randn(rows, in_features, dtype=dtype)
    # about 20 ms of calls per method and round
    calls = max(10, int(2e4 / (7 + out_features * in_features * rows / 2e5)))
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for module in methods.values():
            per_call_us(lambda module=module: module(x), 5)  # build, fill caches
        for _ in range(rounds):
            for name, module in methods.items():
                times[name].append(per_call_us(lambda module=module: module(x), calls))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["nn.Linear"]
    row: list[object] = [f"{out_features}x{in_features}", str(dtype).replace("torch.", ""), rows,
                         f"{base:.1f}", f"{medians['NMLinear']:.1f}",
                         f"{base / medians['NMLinear']:.2f}x"]
    if "prepared" in medians:
        row += [f"{medians['prepared']:.1f}", f"{base / medians['prepared']:.2f}x"]
    else:
        row += ["", ""]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="256x64,256x256,1024x1024,4096x4096",
                        help="OUTxIN,...")
    parser.add_argument("--rows", default="1,16,64,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_text()
    torch.manual_seed(0)
    table = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (int(v) for v in args.rows.split(",")):
                table.append(measure((out_features, in_features), dtype, rows, args.rounds))
                print(" ".join(map(str, table[-1])), flush=True)
    command = "python benchmarks/cpu_small_layers.py " + " ".join(argv or sys.argv[1:])
    text = "\n".join([
        "# Small layers on the CPU: nn.Linear against NMLinear (2:4), warm",
        "",
        f"* Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: "
        f"`{command.strip()}`",
        f"* Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"* {features_line()}",
        f"* Load average (1, 5, 15 min): {load_before} at the start, {load_text()} at the end",
        f"* Median of {args.rounds} rounds in which the methods take turns, each round about "
        "20 ms of calls per method on one warm weight; microseconds per call of the module, "
        "`torch.no_grad()`. What it measures: the docstring of "
        "`benchmarks/cpu_small_layers.py`.",
        "",
        format_table(["weight", "dtype", "rows", "nn.Linear us", "NMLinear us", "speedup",
                      "prepared us", "speedup"], table),
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
