"""What caps the CPU pairs kernel: its inner loop on synthetic data, per vdpbf16ps.

    python -m benchmarks.pairs_loop.run             # writes docs/cpu_pairs_loop.md

``loop.cpp`` (next to this file) repeats the inner loop of ``pair_slice`` in
``src/nmsparse/kernels/cpu/nm_avx512.h`` on one thread: per pair of kept 2:4
weights, the table entry's place from 4 position bits, a broadcast weight word, and V zmm of
the entry (16 V rows) into ``vdpbf16ps``, over tables of a few to a few hundred units, and
``vdpbf16ps`` alone from registers. It is compiled here with ``g++ -O3`` and run
``--repeats`` times; the table gives the median ns per instruction. Needs a CPU with
AVX512_BF16 (the compiled program checks nothing: it would stop on an illegal instruction,
so this script refuses first). Dense bf16 GEMM (oneDNN) needs twice the instructions of the
pairs loop for 2:4, so the pairs loop beats it where its ns per instruction is under twice
oneDNN's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from benchmarks.cpu_kernels import features_line, load_text
from nmsparse.kernels import cpu
from nmsparse.machine import cpu_model
from nmsparse.tables import format_table

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "docs" / "cpu_pairs_loop.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if "avx512bf16" not in cpu.features():
        print("this CPU has no AVX512_BF16 (or the kernels cannot be built): nothing to measure",
              file=sys.stderr)
        return 2
    started, load_start = datetime.datetime.now(datetime.timezone.utc), load_text()
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "loop"
        subprocess.run([os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-o", str(binary),
                        str(HERE / "loop.cpp")], check=True)
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            output = subprocess.run([str(binary)], check=True, capture_output=True, text=True)
            for line in output.stdout.splitlines():
                *name, ns, _ = line.split()
                runs.setdefault(" ".join(name), []).append(float(ns))
    rows = [[name, f"{statistics.median(values):.3f}", f"{min(values):.3f}-{max(values):.3f}"]
            for name, values in runs.items()]
    table = format_table(["case", "ns per vdpbf16ps (median)", "range"], rows, markdown=True)
    text = "\n".join([
        "# The CPU pairs kernel's inner loop, alone", "",
        f"* Date: {started:%Y-%m-%d %H:%M} UTC; command: `python -m benchmarks.pairs_loop.run "
        f"--repeats {args.repeats}`",
        f"* Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, one thread",
        f"* {features_line()}",
        f"* Load average (1, 5, 15 min): {load_start} at the start, {load_text()} at the end",
        "* What the cases are: the docstrings of `benchmarks/pairs_loop/run.py` and "
        "`loop.cpp`. `touched_KiB`: the table entries the loop reads (6 of 16 per unit).", "",
        table, ""])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
