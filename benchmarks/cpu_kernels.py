"""CPU N:M Linear kernels vs dense ``F.linear``, and Llama decode / prefill, on this machine.

    python benchmarks/cpu_kernels.py                 # full run, writes docs/cpu_kernels.md
    python benchmarks/cpu_kernels.py --quick         # rows 1, 16, 64; 2:4 only; a small decode
    python benchmarks/cpu_kernels.py --threads 2 --out /tmp/cpu.md --no-decode
    python benchmarks/cpu_kernels.py --threads 1 --clock cpu   # for a busy machine, see below

**Linear.** For each weight ``OUTxIN`` (default 11008x4096 and 4096x11008, Llama-7B's MLP) and
input rows (1, 4, 16, 64, 256): dense fp32 and dense bf16 ``F.linear`` (oneDNN) against the same
weight pruned to each pattern (default 2:4, 2:8, 1:4, 4:8) by magnitude, in fp32 and bf16, through
every path of :mod:`nmsparse.kernels.cpu` this CPU runs: ``auto`` (an ``NMLinear`` called as users
call it, its Python overhead included: the best instruction set and the kernel its dispatch picks
for that many rows, named in brackets), ``avx2`` (the AVX2/FMA library), and each AVX-512 kernel
forced (``dot``, ``table``, ``pairs``, ``lanes``, ``dense``; with ``avx512bf16`` where the CPU has
it, else ``avx512``), and, for bf16 where the CPU has AVX512_BF16, ``prepared`` (what
``PreparedNMLinear`` runs after :func:`nmsparse.kernels.prepare_cpu`, the module called; the weight
laid out for its kernel once; its bytes are the layout's, padding included). Same process, same
thread count (``torch.set_num_threads``). Cold weights: the methods of one dtype take turns on
enough copies of the weight to read at least ``--cold-mb`` between two uses of one copy (default:
the larger of 1 GiB and twice the L3 cache), so no method reads a copy another has just brought
into cache. The methods of one shape, row count and pattern run in turn, round after round, so a
busy machine slows all alike; the table gives the median over the rounds. ``--clock wall``
(default) times with ``time.perf_counter``. On a machine shared with other jobs, waiting for the
CPU dominates wall times (an OpenMP region waits for its slowest thread to be scheduled), so
``--clock cpu`` (only with ``--threads 1``) times with ``time.process_time``: the CPU time the one
thread spent, stalls on memory included, time spent descheduled excluded.

Columns: ms (median), GB/s (weight bytes read per second: dense bytes, or packed values +
positions), speedup over dense fp32 and over dense of the same dtype (dense rows are timed
with every pattern; the table shows the first), the bandwidth limit (dense bytes of that dtype
/ packed bytes: the speedup a kernel reading only the packed bytes at dense's GB/s would get)
and the fraction of it reached.

**Decode.** :mod:`benchmarks.decode`: a Llama-shaped ``transformers`` model built from a config
(default 16 layers x 2048, 0.84B parameters, bf16), 2:4, swapped to ``NMLinear`` and then
prepared (``prepare_cpu``): tokens/s of ``model.generate`` at batch 1, 8, 32 and the time of a
512-token prefill, dense vs both.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: benchmarks/kernels would shadow `kernels`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F

from nmsparse.engine.masks import nm_mask
from nmsparse.kernels import NMLinear, PreparedNMLinear, cpu
from nmsparse.kernels.cpu import prepacked
from nmsparse.machine import cpu_model
from nmsparse.packing import pack
from nmsparse.tables import format_table

OUT = Path(__file__).resolve().parents[1] / "docs" / "cpu_kernels.md"
SHAPES = [(11008, 4096), (4096, 11008)]
ROWS = [1, 4, 16, 64, 256]
PATTERNS = ["2:4", "2:8", "1:4", "4:8"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNEL_PATHS = ("dot", "table", "pairs", "lanes", "dense")


class Copies(list):
    """Copies of one weight, handed out in turn to every method that shares them: a copy comes
    back only after all the others were read, whichever method read them (methods that each
    counted their own calls would read, within one round, the copy the previous method had
    just brought into L3)."""

    def __init__(self, items) -> None:
        super().__init__(items)
        self.cursor = 0

    def next(self):
        self.cursor += 1
        return self[(self.cursor - 1) % len(self)]


class Method:
    """One way of computing ``x @ W.T``, on cold copies of the weight."""

    def __init__(self, name: str, dtype: str, pattern: str, copies: Copies, nbytes: int,
                 dense_nbytes: int, isa: str | None = None, kernel: str = "auto") -> None:
        self.name, self.dtype, self.pattern = name, dtype, pattern
        self.copies, self.nbytes, self.dense_nbytes = copies, nbytes, dense_nbytes
        self.isa, self.kernel = isa, kernel
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.copies.next()
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight)
        if self.isa is None:
            os.environ.pop(cpu.ENV_ISA, None)
        else:
            os.environ[cpu.ENV_ISA] = self.isa
        if self.kernel == "prepared":  # the module, as users call it
            return weight(x)
        if self.kernel in ("prepared/dense", "prepared/amx"):  # a prepared layer's path, forced
            return prepacked.nm_linear_prepacked(x, weight.layout, weight.n, weight.m,
                                                 weight.in_features, weight.out_features,
                                                 kernel=self.kernel.split("/")[1])
        if self.kernel == "auto":  # the NMLinear users get from swap_linear_layers
            return weight(x)
        return cpu.nm_linear_cpu(x, weight.values, weight.indices, weight.n, weight.m,
                                 kernel=self.kernel)


def copies_for(nbytes: int, cold_bytes: int) -> int:
    return max(2, math.ceil(cold_bytes / nbytes))


def paths() -> list[tuple[str | None, str]]:
    """(instruction set or None for the automatic one, kernel) of every path this CPU runs."""
    found: list[tuple[str | None, str]] = [(None, "auto")]
    if cpu.isa_reason("avx2") is None:
        found.append(("avx2", "auto"))
    wide = next((isa for isa in ("avx512bf16", "avx512") if cpu.isa_reason(isa) is None), None)
    if wide:
        found += [(wide, kernel) for kernel in KERNEL_PATHS]
    if wide == "avx512bf16" and cpu.amx_reason() is None:
        found.append((wide, "amx"))
    return found


def applies(isa: str | None, kernel: str, dtype: str, n: int, m: int) -> bool:
    if isa is None:  # the op as users call it: unpack + F.linear where no kernel takes N:M
        return True
    if cpu.pattern_reason(n, m) or not cpu.kernel_takes("avx2" if isa == "avx2" else kernel,
                                                        n, m):
        return False
    return kernel not in cpu.BF16_KERNELS or (dtype == "bf16" and isa == "avx512bf16")


def dense_methods(base: torch.Tensor, cold_bytes: int) -> list[Method]:
    methods = []
    for dtype_name, dtype in DTYPES.items():
        dense = base.to(dtype)
        nbytes = dense.numel() * dense.element_size()
        copies = Copies(dense.clone() for _ in range(copies_for(nbytes, cold_bytes)))
        methods.append(Method(f"dense {dtype_name}", dtype_name, "dense", copies, nbytes,
                              nbytes))
    return methods


def pattern_methods(base: torch.Tensor, pattern: str, cold_bytes: int) -> list[Method]:
    n, m = map(int, pattern.split(":"))
    pruned = base * nm_mask(base, n, m)
    methods = []
    for dtype_name, dtype in DTYPES.items():
        packed = pack(pruned.to(dtype), n, m)
        # each copy an NMLinear (what auto calls; the forced kernels read its buffers)
        copies = Copies(NMLinear(type(packed)(packed.values.clone(), packed.indices.clone(), n,
                                              m, packed.shape))
                        for _ in range(copies_for(packed.nbytes, cold_bytes)))
        for isa, kernel in paths():
            if not applies(isa, kernel, dtype_name, n, m):
                continue
            if isa is None:
                name = f"{pattern} {dtype_name} auto"
            else:
                name = f"{pattern} {dtype_name} {isa}" + ("" if kernel == "auto" else f"/{kernel}")
            methods.append(Method(name, dtype_name, pattern, copies, packed.nbytes,
                                  packed.dense_nbytes, isa, kernel))
        if prepacked.prepack_reason(packed.values, n, m) is None:
            layouts = Copies(PreparedNMLinear.from_nm_linear(layer) for layer in copies)
            amx = ("prepared/amx",) if cpu.amx_reason() is None else ()
            for kernel in ("prepared", "prepared/dense", *amx):
                methods.append(Method(f"{pattern} {dtype_name} {kernel}", dtype_name, pattern,
                                      layouts, layouts[0].layout.numel(), packed.dense_nbytes,
                                      kernel=kernel))
    return methods


def auto_choice(rows: int, dtype: str, pattern: str) -> str:
    """What the automatic dispatch runs for this call, for the table."""
    n, m = map(int, pattern.split(":"))
    if cpu.pattern_reason(n, m):
        return "unpack + F.linear"
    name = cpu.isa()
    if name == "avx2":
        return name
    kernel = cpu.kernel_for(name, DTYPES[dtype], rows, n, m)
    return kernel if kernel == "avx2" else f"{name}/{kernel}"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_TEXT = {"wall": "wall (time.perf_counter)",
              "cpu": "cpu (time.process_time: CPU time of the one thread)"}
clock = time.perf_counter


def time_linear(out_f: int, in_f: int, rows_list: list[int], patterns: list[str],
                repeats: int, cold_bytes: int, log) -> list[list[str]]:
    generator = torch.Generator().manual_seed(out_f * 7 + in_f)
    base = torch.randn(out_f, in_f, generator=generator)
    dense = dense_methods(base, cold_bytes)
    inputs = {}
    for rows in rows_list:
        x32 = torch.randn(rows, in_f, generator=generator)
        inputs[rows] = {"fp32": x32, "bf16": x32.bfloat16()}
    blocks: dict[tuple[int, int], list[list[str]]] = {}
    for index, pattern in enumerate(patterns):  # one pattern's copies at a time: memory
        methods = dense + pattern_methods(base, pattern, cold_bytes)
        for rows in rows_list:
            for method in methods:
                method.times = []
                for _ in method.copies:  # warm-up: touch every copy once
                    method(inputs[rows][method.dtype])
            for _ in range(repeats):
                for method in methods:
                    x = inputs[rows][method.dtype]
                    start = clock()
                    method(x)
                    method.times.append(clock() - start)
            median = {method.name: statistics.median(method.times) for method in methods}
            block = []
            for method in methods:
                if method.pattern == "dense" and index:  # dense rows: from the first pattern
                    continue
                t = median[method.name]
                same = median[f"dense {method.dtype}"]
                limit = method.dense_nbytes / method.nbytes
                speed_same = same / t
                name = method.name
                if method.kernel == "auto" and method.isa is None and method.pattern != "dense":
                    name += f" ({auto_choice(rows, method.dtype, method.pattern)})"
                block.append([f"{out_f}x{in_f}", rows, name, f"{t * 1e3:.3f}",
                              f"{method.nbytes / t / 1e9:.1f}",
                              f"{median['dense fp32'] / t:.2f}x", f"{speed_same:.2f}x",
                              f"{limit:.2f}x",
                              "" if method.pattern == "dense" else f"{speed_same / limit:.0%}"])
            blocks[(rows, index)] = block
            log(format_table(HEAD, block, right_aligned=range(1, 9)))
        del methods
    return [row for key in sorted(blocks) for row in blocks[key]]


HEAD = ["weight", "rows", "method", "ms", "GB/s", "vs dense fp32", "vs dense same dtype",
        "bandwidth limit", "of limit"]


def l3_bytes() -> int:
    """The L3 cache size Linux reports (0 if unknown)."""
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()  # e.g. "32768K"
                factor = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * factor
    except (OSError, ValueError):
        pass
    return 0


def features_line() -> str:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = {f for f in line.split(":", 1)[1].split()
                         if f.startswith(("avx512", "amx", "avx2", "fma"))}
                break
    except OSError:
        pass
    return (f"CPU flags: {' '.join(sorted(flags)) or 'unknown'}; L3 {l3_bytes() >> 20} MiB; "
            f"kernels: instruction sets {', '.join(sorted(cpu.features())) or 'none'}, "
            f"automatic choice {cpu.isa()}; AMX kernel: "
            f"{'runs' if cpu.amx_reason() is None else 'not used, ' + str(cpu.amx_reason())}")


def machine_line(threads: int) -> str:
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{threads} threads, Python {platform.python_version()}")


def load_text() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


NOTES = """\
## The kernels (src/nmsparse/kernels/cpu)

One shared library per instruction set, each compiled from its own files with its own flags on
first use, picked at run time from what the CPU reports (`NMSPARSE_CPU_ISA=avx2|avx512|\
avx512bf16` forces one; the tests run every path the CPU supports against `F.linear`):

* `avx2` (AVX2 + FMA): one row gathers / permutes x at the kept positions; more rows broadcast
  each kept value over x transposed. N dividing 8 and M <= 16 only. The AVX-512 dispatch
  takes it for one bf16 row, and for bf16 M = 16 (1:16, 2:16, 4:16) up to 64 rows (4:16:
  `dot` at 2-6 rows).
* `avx512` / `avx512bf16`, by rows (the measured table `cpu.DISPATCH`; one row runs the AVX2
  kernel, or `dot` for bf16 2:4 and 4:8):
  * `dot` (up to 8 rows a pass; the dispatch takes it for 2-4 bf16 rows, 2-8 fp32 rows):
    each 64-input chunk of a weight row is expanded in registers from the packed values by a
    mask built from the positions (`vpexpandw` / `vexpandps`; masks built 64 index bytes at a
    time with `vpermi2b`), then meets up to 8 rows of x: `vdpbf16ps` for bf16, FMA for fp32.
    The weight is read once per 8 rows; nothing is expanded to memory. It and the dense path
    also take N not dividing 8 (3:4, 3:8, 5:8, ...: masks built a period of index bytes at a
    time, one table lookup per byte, by vector code for 3:4, 3:8, 6:8, 4:16 and 8:16:
    `vpermb` picks each byte of 21-32 periods, `vpermi2b` looks it up), and M = 32 and 64.
  * `table` (any M up to 256, N dividing 8): rows in the vector lanes, only the kept
    products, fp32; the dispatch takes it for 9-255 fp32 rows, for bf16 1:16 and 2:16 beyond
    64 rows, and for M > 16 at most 1/8 dense (`cpu.WIDE_M_TABLE_DENSITY`).
  * `pairs` (bf16, M in {2, 4, 8}, N = 1 or even): up to 64 rows in the lanes; each pair of
    kept weights is broadcast as one 32-bit word into `vdpbf16ps` against a table entry holding
    the matching pairs of x, so 2:4 takes half the instructions of the dense product. The
    entry's place comes from the position bits; slices of the table are reused from L1 by
    every output of a panel, whose weights are prefetched (the loop nest: the comment above
    `pair_range` in `nm_avx512.h`). The dispatch takes it for 9-48 bf16 rows when
    M <= 4.
  * `lanes` (bf16, M in {2, 4, 8}, N even, or N = 1 with M <= 4): 16 outputs in the vector
    lanes, 8 rows at a time; each pair of kept weights lies in one 8-input window of x, one
    `vpshufb` per pair and row moves each lane's two inputs into place and one `vdpbf16ps`
    multiplies them, where the dense product needs two `vdpbf16ps`. The weights and shuffle
    controls of 32 outputs are first laid out lane by lane in L2 (registers transpose them);
    one load of x serves four windows, one per quarter of the lanes (the comment at the top
    of `nm_lanes_avx512.h`). The dispatch takes it for 5-8 bf16 rows and from 49 rows up
    (with M = 8 from 5 rows up).
  * `dense`: tiles of the weight (8 MiB, at least 256 output rows) expanded just in time into
    one buffer and multiplied by `F.linear`; the dispatch takes it above 8 rows for bf16 N:M
    that neither `pairs` nor `lanes` takes (M = 16: above 64 rows, and only 4:16 and denser),
    from 256 rows for fp32 denser than a quarter, above 8 rows for N not dividing 8, and for
    M > 16 where neither `dot` nor `table` leads.
* `prepared` (bf16 on `avx512bf16`; M in {2, 4, 8} with any N, and 1:16 ... 7:16;
  `PreparedNMLinear`, after `nmsparse.kernels.prepare_cpu(model)`; `nmsparse.load_pretrained`
  does it on the CPU): the lanes kernel's layout made once instead of on every call. Per
  block of 16 outputs, the pairs of kept weights are stored lane by lane, skewed as the lanes
  kernel wants them, and their position bits as one code per lane (a nibble for M <= 4, a
  byte for M >= 8): for the lanes patterns the same bytes as the packed format, plus 3 padding
  steps per block (0.6 % at 4096 inputs). An odd count of kept values in a window of 8 inputs
  (1:8, 3:8, 5:8, 7:8) pairs the last with a zero weight; M = 16 lays each group's two halves
  out as windows of N slots padded with zero weights (1:16 takes 1:8's bytes). The kernel
  reads them straight into `vpshufb` + `vdpbf16ps` (codes become shuffle controls in
  registers: `vpmultishiftqb` + `vpermd`); a panel that more than 8 rows read has its
  controls expanded once into L2. Without AMX every row count runs it; on a CPU with AMX,
  from `cpu.AMX_DENSE_ROWS` bf16 rows (not measured) the dense path. Checkpoints keep
  `NMLinear`'s keys and bytes.
* `prepared/dense` (forced here): a prepared layer's dense path: tiles of 8 MiB expanded from
  the layout by vector code (compares spread each window's pairs over its 8 columns, then a
  16 x 8 transpose) and multiplied by `F.linear` while in cache.
* `amx` and `prepared/amx` (bf16, M a power of two up to 64, and the prepared layout; only on a
  CPU with AMX-BF16, after its self-check passed in a child process): per block of 16 outputs
  the weight's rows are expanded into a panel in the thread's cache, and each 16 x 32 slice
  meets up to four tiles of x in `tdpbf16ps`. Written on a CPU without AMX and checked there
  only through a build whose tile operations are C++; not run or timed on AMX hardware. The
  dispatch takes it from `cpu.AMX_ROWS` bf16 rows (not measured: rerun this benchmark on an
  AMX Xeon, where oneDNN's dense bf16 also runs on tiles, and set the row counts from it).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 repeats, rows 1, 16, 64, 2:4 only, a 4-layer decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cold-mb", type=int, default=None,
                        help="default: max(1024, twice the L3 in MiB)")
    parser.add_argument("--rows", default=None, help="comma-separated, default 1,4,16,64,256")
    parser.add_argument("--patterns", default=None, help="default 2:4,2:8,1:4,4:8")
    parser.add_argument("--shapes", default=None, help="OUTxIN,... default 11008x4096,4096x11008")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--decode-layers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    try:
        rows_list = [int(r) for r in (args.rows or ("1,16,64" if args.quick else
                                                    ",".join(map(str, ROWS)))).split(",")]
        shapes = ([tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
                  if args.shapes else SHAPES)
        patterns = (args.patterns or ("2:4" if args.quick else ",".join(PATTERNS))).split(",")
        for pattern in patterns:
            n, m = map(int, pattern.split(":"))
            if cpu.pattern_reason(n, m):
                raise ValueError(pattern)
    except ValueError:
        parser.error("--rows takes integers, --shapes OUTxIN pairs, --patterns N:M pairs "
                     f"with 1 <= N < M <= {cpu.MAX_M}")
    global clock
    clock = CLOCKS[args.clock]
    error = cpu.build_error()
    if error:
        print(f"the CPU kernels cannot run here: {error}", file=sys.stderr)
        return 1
    os.environ["NMSPARSE_KERNELS"] = "cpu"  # a kernel that cannot run fails, never falls back
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    cold_mb = args.cold_mb or max(1024, 2 * (l3_bytes() >> 20))
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_text()

    def log(text: str) -> None:
        print(text, flush=True)

    log(features_line())
    linear_rows: list[list[str]] = []
    for out_f, in_f in shapes:
        linear_rows += time_linear(out_f, in_f, rows_list, patterns, repeats, cold_mb << 20,
                                   log)
    decode_rows: list[list[str]] = []
    if not args.no_decode:
        from benchmarks import decode

        os.environ["NMSPARSE_KERNELS"] = "auto"
        os.environ.pop(cpu.ENV_ISA, None)
        layers = args.decode_layers or (4 if args.quick else 16)
        described, decode_rows = decode.run(
            layers=layers, batches=(1, 8) if args.quick else (1, 8, 32),
            new_tokens=8 if args.quick else 32, prefill_len=128 if args.quick else 512,
            repeats=2 if args.quick else 3, log=log)
    command = "python benchmarks/cpu_kernels.py " + shlex.join(argv if argv is not None
                                                               else sys.argv[1:])
    page = [
        "# CPU N:M kernels: measured",
        "",
        f"* Date: {started:%Y-%m-%d %H:%M} UTC; command: `{command.strip()}`",
        f"* Machine: {machine_line(args.threads)}",
        f"* {features_line()}",
        f"* Load average (1, 5, 15 min): {load_start} at the start, {load_text()} at the end "
        "(a loaded machine: compare rows of one table, which ran interleaved, rather than "
        "absolute times; state figures only from a quiet run)",
        f"* Clock: {CLOCK_TEXT[args.clock]}. "
        f"Median of {repeats} interleaved rounds; the methods of one dtype take their turns on "
        f"copies of the weight totalling >= {cold_mb} MiB, each copy read again only after "
        "all the others (cold). What the columns mean, and how to "
        "rerun: the docstring of `benchmarks/cpu_kernels.py`; the kernels and the dispatch: "
        "`src/nmsparse/kernels/cpu/__init__.py`.",
        "",
        "",
        NOTES,
        "",
        "## Linear: x @ W.T",
        "",
        format_table(HEAD, linear_rows, right_aligned=range(1, 9), markdown=True),
        "",
    ]
    if decode_rows:
        from benchmarks import decode

        page += [
            f"## Decode and prefill: {described}",
            "",
            "Threads: " + str(args.threads) + "; `model.generate` greedy, dense bf16 "
            "(`nn.Linear`) vs `NMLinear` (automatic dispatch) and `PreparedNMLinear` (after "
            "`prepare_cpu`); see `benchmarks/decode.py`.",
            "",
            format_table(decode.HEAD, decode_rows, right_aligned=range(1, 10), markdown=True),
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
