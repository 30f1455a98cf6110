"""CPU kernels of the packed N:M Linear (AVX2/FMA and AVX-512, OpenMP, compiled on first use).

``nm_linear_cpu(x, values, indices, n, m, bias)`` computes ``x @ W.T + bias`` reading only the
packed weight (:mod:`nmsparse.packing` format, unchanged: the positions are decoded in
registers), with fp32 accumulation, on ``torch.get_num_threads()`` threads (one for tiny
calls). Supported: CPU
tensors, fp32 or bf16 weights and inputs, any N < M <= 256 (2:4, 4:8, 1:4, 2:8, 1:8, 1:16, 1:2,
1:3, 3:4, 5:8, 1:32, ...), any batch; M > 16 (8-bit positions) needs AVX-512 and runs the dot
kernel (M = 32, 64), the table kernel (N dividing 8) or the dense path
(:data:`WIDE_M_TABLE_DENSITY`); N not dividing 8 (3:4, 3:8, 5:8, 6:8, ...) needs AVX-512 and
runs only the dot kernel and the dense path (:func:`any_n`): bf16 on 11008x4096 they run at
1.05-1.63x of dense bf16 at one row but 0.6-1.13x at 2-8 rows and about 0.5-0.7x beyond
(their packed bytes are 0.42-0.84 of dense, and the dense path pays the expansion);
``prepare_cpu`` gives bf16 weights (M <= 8, or M = 16 with N < 8) a layout that beats dense
there, :mod:`.prepacked`. The result is in x's dtype: fp32
accumulation rounded once (bf16 output rounded to nearest even by torch).

Instruction sets (``ISAS``; the best one this CPU runs is used, ``NMSPARSE_CPU_ISA`` forces
one, e.g. for tests: a forced set the CPU lacks makes the kernels unavailable, with the reason):

* ``avx2``: AVX2 + FMA (``nm_linear.cpp``): a gather/permute loop for one row, a broadcast
  loop over x transposed for more;
* ``avx512``: AVX-512 F/BW/VL/DQ (``nm_avx512.h`` and the units it names): the "dot" kernel
  for up to :data:`DOT_MAX_ROWS` rows (each N:M tile expanded in registers by ``vexpandps``
  and FMA'd with up to 8 rows of x) and the "table" kernel for more (rows in the lanes, only
  the kept products computed, K blocked to stay in L2); bf16 weights are widened to fp32;
* ``avx512bf16``: the same with AVX512_BF16 + VBMI + VBMI2: for bf16, the dot kernel expands
  with ``vpexpandw`` and multiplies bf16 x with ``vdpbf16ps``; the "pairs" kernel (M in {2,
  4, 8}, N = 1 or even) puts up to 64 rows in the lanes and meets each pair of kept weights,
  broadcast as one 32-bit word, with a table entry holding the matching pairs of x in one
  ``vdpbf16ps``: only kept products, two per lane and instruction, so 2:4 needs half the
  instructions of the dense product (how its loops keep the table in cache: the comment above
  ``pair_range`` in ``nm_avx512.h``); the "lanes" kernel (:func:`lanes_take`) puts 16
  outputs in the lanes instead and moves each lane's two inputs of a pair into place with one
  ``vpshufb`` per row: a shuffle and a dot instruction per pair, where the pairs kernel waits
  on a table load per instruction (``nm_lanes_avx512.h``).

The prepared layout (:mod:`.prepacked`, used by ``PreparedNMLinear``): the lanes kernel's
arrangement of a bf16 weight made once, in the packed format's bytes, and a kernel that reads
it directly at any number of rows, for every N:M with M in {2, 4, 8}; it is not part of
:data:`DISPATCH` (an ``NMLinear`` holds the packed format, a ``PreparedNMLinear`` the layout).

AMX (``tdpbf16ps`` tiles, ``nm_amx_avx512.h``, :func:`amx_linear`): per block of 16 outputs
the weight's rows (packed, M a power of two up to 64, or the prepared layout) are expanded
into a panel in the thread's cache, and each 16 x 32 slice of it meets up to four tiles of x
(64 rows) per pass. It was written on CPUs without AMX and has NOT run on AMX hardware: the
tests check a build whose tile operations are C++ following Intel's pseudo-code
(``amx_emulated``) against F.linear, and before the real one is used a child process runs
its self-check (:func:`amx_reason`), so that a fault or a wrong result disables it with one
warning. Where it runs, bf16 calls from :data:`AMX_ROWS` rows take it (plain and prepared);
where the CPU has AMX but the kernel cannot run, from :data:`AMX_DENSE_ROWS` rows the dense
path, whose ``F.linear`` runs on AMX tiles in oneDNN. Both row counts are arithmetic, not
measured. ``NMSPARSE_CPU_AMX=0`` turns the AMX kernel off.

The "dense" path (AVX-512) expands tiles of the weight (8 MiB, at least 256 output rows) just
in time into one buffer and multiplies each by ``F.linear`` (oneDNN's dense GEMM) while it is
in cache: dense speed less the expansion, never a whole dense copy. Which kernel runs is the
measured table :data:`DISPATCH` (by instruction set, dtype and row count): for bf16 weights
one row runs the AVX2 library's permute kernel (the dot kernel for 2:4 and 4:8), up to 4
rows the dot kernel, 5-8 rows the lanes kernel, 9-48 the pairs kernel (M = 8: lanes), more
the lanes kernel (patterns a kernel cannot
take: lanes -> pairs -> the dot kernel up to 8 rows, then the dense path); fp32 weights of at
most a quarter density keep the table kernel from 256 rows up, where denser ones take the
dense path; bf16 M = 16 (1:16, 2:16, 4:16) runs the AVX2 library's kernel up to 64 rows
(4:16 and denser: the dot kernel at 2-6 rows), then the table (at most 1/8 dense) or the
dense path (:data:`M16_BF16_AVX2_ROWS`, :data:`M16_BF16_DOT_ROWS`); N not
dividing 8 runs the dot kernel up to 8 rows, then the dense path.

:func:`unsupported_reason` says why a call cannot run here (``None`` if it can), building the
library on the first call (:mod:`._build`). Imported lazily: by :mod:`nmsparse.kernels._op`,
and by :mod:`nmsparse.engine.fused` on the first mask refresh of a CPU weight, for the per-step
mask pass of sparse training that is built the same way (``nm_mask.cpp``, :mod:`.mask_pass`);
``import nmsparse`` does not import it.
"""

from __future__ import annotations

import threading

import torch

from . import _library
from ._build import BuildError
from ._calls import SERIAL_BELOW, STATUS, call_into_fp32, contiguous_as, threads_for
from ._library import ENV_ISA, ISAS, LIBRARY_OF, build_error, features, isa, isa_reason, library
from ._patterns import (
    BF16_KERNELS,
    MAX_M,
    NARROW_M,
    any_n,
    kernel_takes,
    lanes_take,
    masks_take,
    pairs_take,
    pattern_reason,
    wide_m,
)
from .amx import (
    AMX_DENSE_ROWS,
    AMX_ROWS,
    AMX_SELFTEST,
    ENV_AMX,
    amx_dense,
    amx_library,
    amx_linear,
    amx_reason,
    amx_rows,
)

# the package's names, whichever of its modules defines them
__all__ = ["AMX_DENSE_ROWS", "AMX_ROWS", "AMX_SELFTEST", "BF16_KERNELS", "DISPATCH",
           "DOT_MAX_ROWS", "DTYPES", "ENV_AMX", "ENV_ISA", "ISAS", "KERNELS", "MAX_M",
           "OPTION_BF16", "SERIAL_BELOW", "TABLE_MAX_DENSITY", "WIDE_M_TABLE_DENSITY",
           "BuildError", "amx_dense", "amx_library", "amx_linear", "amx_reason", "amx_rows",
           "any_n", "build_error", "features", "isa", "isa_reason", "kernel_for",
           "kernel_takes", "lanes_take", "library", "masks_take", "nm_linear_cpu", "pairs_take",
           "pattern_reason", "run_checked", "threads_for", "tiled_linear", "unsupported_reason",
           "wide_m"]

DTYPES = (torch.float32, torch.bfloat16)
# The dot kernel takes up to this many rows per pass over the weight.
DOT_MAX_ROWS = 8
_BF16, _FP32 = torch.bfloat16, torch.float32
# The measured dispatch of the AVX-512 instruction sets: (instruction set, weight dtype) -> ((up to
# this many rows, kernel), ...), the last entry for any number of rows. "avx2" is the AVX2 library's
# kernel. Measured on an AMD EPYC (Zen 4: AVX-512 BF16 and VBMI, no AMX), one thread (CPU time), 2:4
# / 2:8 / 1:4 on 11008x4096 and 4096x11008, cold weights, a loaded machine (an early
# docs/cpu_kernels.md, in its git history), e.g. 2:4 bf16: 1 row avx2 5.3 ms, dot 5.4; 8 rows dot
# 12.8, dense 15.2; 16 rows dense 18.8, dot 25.4, pairs 29.4, table 26.8; fp32 64 rows table 81.7,
# dense 84.0; 256 rows dense 300, table 318. "avx512" (no BF16/VBMI: the masks are built by scalar
# code, bf16 widened to fp32) was measured on the same CPU with the set forced: bf16 at 1 row its
# dot 17.5 ms, dense 25.0, avx2 5.3. bf16 on avx512bf16 after the pairs kernel's rework
# (docs/cpu_kernels.md of that day, in its git history; 2 threads, cold, both shapes, 2:4, against
# dense bf16): 4 rows dot 1.31-1.48x, pairs 1.15-1.19x; 8 rows pairs 1.22-1.35x, dot 0.94-1.09x;
# 16-128 rows pairs 0.94-1.55x, the tiled dense path 0.72-0.83x; 256 rows pairs 0.81-0.99x, the
# dense path 0.85x (the two within the runs' noise). With the lanes kernel (2 threads, cold, 2:4,
# both shapes, in one process, 16:00-16:10 UTC 2026-12-07): 2-4 rows dot 1.15-1.59x, lanes
# 1.00-1.19x; 5 rows lanes 1.44-1.70x, dot 1.15-1.20x, pairs 1.14-1.16x; 8 rows lanes 1.13-1.43x,
# pairs 1.20-1.25x; 16-48 rows pairs 1.32-1.60x, lanes 1.29-1.44x; 64 rows and more lanes
# (1.14-1.42x at 64, 1.26-1.35x at 256, 1.31-1.39x at 512), pairs (1.10-1.37x at 64, 0.98-1.11x at
# 256-512). Remeasure on an AMX Xeon (oneDNN's dense bf16 GEMM is faster there).
DISPATCH: dict[tuple[str, torch.dtype], tuple[tuple[int | None, str], ...]] = {
    ("avx512bf16", _BF16): ((1, "avx2"), (4, "dot"), (8, "lanes"), (48, "pairs"),
                            (None, "lanes")),
    ("avx512bf16", _FP32): ((1, "avx2"), (DOT_MAX_ROWS, "dot"), (255, "table"), (None, "dense")),
    ("avx512", _BF16): ((16, "avx2"), (None, "dense")),
    ("avx512", _FP32): ((DOT_MAX_ROWS, "avx2"), (255, "table"), (None, "dense")),
}
# Where the pairs kernel's table has M = 8 inputs per group it loses to the lanes kernel at
# every row count, so those patterns take lanes where the table says pairs: measured bf16
# (11008x4096 and 4096x11008, 2 threads, cold) 4:8 from 5 to 128 rows pairs 0.63-1.10x of
# dense bf16, lanes 0.94-1.34x; 2:8 from 4 to 128 rows pairs 1.20-1.85x, lanes 1.64-2.24x.
PAIRS_MAX_M = 4
# DOT_ROWS_M8: at 2-4 bf16 rows (the dot kernel's in DISPATCH), 2:8 takes the lanes kernel,
# and 4:8 does at 4 rows. 2 threads, cold, both shapes (benchmarks/results/cpu_kernels_2137.md and
# benchmarks/results/cpu_kernels_1756.md at 4 rows; one run at 2-3 rows, 21:51 UTC, not
# committed), against dense bf16: 2:8 lanes 1.52-2.78x, dot 1.21-2.51x (lanes ahead in 7 of
# 8 cells, the eighth 1.56 / 1.57x); 4:8 at 4 rows lanes 1.01-1.48x, dot 0.98-1.53x (the
# lanes kernel's lowest cell above 1.0, the dot kernel's below); 4:8 at 2-3 rows dot
# 1.32-1.95x, lanes 1.09-1.28x (dot kept).
# fp32 weights of at most this density (N / M) take the table kernel where the table says
# dense: it computes only the kept products, and at a quarter of them it stays ahead of
# oneDNN's dense GEMM at every row count measured. Two runs (benchmarks/results/: 17:56 UTC
# cpu_kernels_1756.md and 18:45 UTC cpu_kernels_rerun.md; 2 threads, cold, both shapes), 256
# and 512 rows: 2:8 and 1:4 table 1.43-1.94x of dense fp32, the dense path 0.90-1.26x; 2:4
# and 4:8 table 0.83-1.20x, the dense path 0.96-1.22x (those keep the dense path).
TABLE_MAX_DENSITY = 0.25
# ONE_ROW_DOT: one bf16 row of a pattern at least half dense (2:4, 4:8) runs the dot kernel
# rather than the AVX2 library's (which DISPATCH gives one row, and which stays ahead for
# sparser patterns): 2 threads, cold, 2:4 in four runs over six shapes (benchmarks/results/
# cpu_kernels_1756.md, cpu_kernels_rerun.md and cpu_llama_shapes.md, and one of 256x2048 and
# 2048x2048 at 20:10 UTC 2026-12-07, not committed), dot 1.68-2.35x of dense bf16 against
# avx2 1.04-2.31x, ahead in 9 of 10 cells; 4:8 1.99 / 2.06x against 1.80 / 2.08x; 1:4, 2:8,
# 1:16: avx2 ahead in 8 of 9.
# bf16 M = 16 (1:16, 2:16, 4:16: neither the pairs nor the lanes kernel takes them) on
# avx512bf16, measured on 11008x4096 (2 threads, cold, three runs 20:31-20:45 UTC
# 2026-12-07, against dense bf16): up to 64 rows the AVX2 library's kernel leads (1:16
# 7.3-8.1x at 1 row, 3.0-3.6x at 2-8, 4.3-4.7x at 16, 2.8x at 64; 2:16 3.6x, 1.6-2.6x,
# 2.5x, 1.6x; 4:16 2.1x, 0.8-1.0x, 1.5x, 0.9x), where the dot kernel gave 0.5-2.1x and the
# table 0.6-4.0x; at 256 rows the table for 1:16 and 2:16 (2.1x; 0.8-1.2x, as the AVX2
# kernel) and the dense path for 4:16 (0.84x; table 0.5x).
M16_BF16_AVX2_ROWS = 64
M16_BF16_TABLE_DENSITY = 0.125
# M16_BF16_DOT_ROWS: since the masks are built a period at a time (by vector code for 4:16
# and 8:16 since cpu_period_masks.md, below), patterns of M = 16 denser
# than M16_BF16_TABLE_DENSITY (4:16) run the dot kernel at 2-6 bf16 rows: two runs
# (benchmarks/results/cpu_any_n_period_masks.md and cpu_m16_few_rows.md, 2 threads, cold,
# 11008x4096 and 4096x11008, against dense bf16),
# 4:16 dot 1.31-1.91x at 2 rows, 1.19-1.36x at 3, 1.03-1.13x at 4, 0.92-1.01x at 6, where
# the AVX2 library's kernel gave 0.74-0.95x; at 8 rows dot 0.76-1.02x, avx2 0.93-1.00x, and
# at one row avx2 2.41x, dot 2.12x. 1:16 and 2:16 keep the AVX2 kernel (ahead at 4-8 rows:
# 2:16 1.65-2.26x against dot 0.89-1.70x; within 15 % of dot at 2-3 rows). Half dense and
# more (8:16) the dot kernel takes up to DOT_MAX_ROWS: with the masks built by vector code,
# 8:16 at 4 / 8 rows ran 0.87x / 0.76x of dense bf16 on dot against 0.48x / 0.52x on the AVX2
# kernel (benchmarks/results/cpu_period_masks.md, 11008x4096; no kernel beats dense there).
M16_BF16_DOT_ROWS = 6
# M > 16 (8-bit positions: the dot kernel for M = 32 and 64, the table kernel for N dividing
# 8, the dense path for any M), measured on 11008x4096, 2 threads, one weight (the packed
# weights of 1:32 ... 4:32 fit in L3, so theirs are warm figures; dense's are not), 23:10 UTC
# 2026-12-07: at most 1/8 dense the table kernel leads at every row count (bf16 1:32 and
# 2:32 0.9-2.2 ms from 1 to 16 rows, dense bf16 5.3-7.5; 1:64 0.6-12 ms at 1-256 rows, dense
# 7-56), but for one row of 4:32 the dot kernel (bf16 3.2 ms, table 4.2; fp32 4.4, 5.5).
# 8:32: bf16 dot 4.6 / 5.9 ms at 1 / 4 rows (dense bf16 5.8 / 4.9, table 8.1 / 7.8), table
# 9.0 ms at 16 (dense path 13.3), the dense path from 64 (23.9 / 62.6 ms at 64 / 256, table
# 28.9 / 97.7); fp32 the table from 4 rows (8.2-106 ms at 4-256 rows, dense path 20-175).
# 16:32 (N = 16 does not divide 8, no table): dot 7.8 ms at 4 bf16 rows (dense path 10.2),
# the dense path from 16. The torch fallback these patterns ran before took 82-272 ms.
# Cold, in one process (benchmarks/results/cpu_wide_m.md, 23:00 UTC): the automatic choice
# was the fastest kernel, or within the noise of it, in all 40 cells of 1:32, 4:32, 8:32 and
# 1:64 at 1-256 rows; bf16 against dense bf16 1:32 2.8-5.6x, 1:64 3.9-7.7x, 4:32 1.59x at
# one row, 0.96-1.53x from 4; 8:32 1.13x at one row, 0.80-0.95x from 4 (no kernel is faster).
WIDE_M_TABLE_DENSITY = 0.125
WIDE_M_DOT_ROWS = 4
# Weight bytes per tile of the dense path, and at least this many output rows per tile: few
# large F.linear calls on tiles that stay in L3 (measured 2:4, 11008x4096 and 4096x11008, 2
# threads: 1 MiB / 16 rows gave 0.35-0.61x of dense bf16 at 64 rows, 8 MiB / 256 rows
# 0.80x; fp32 at 256 rows 0.52-1.12x and 1.09-1.34x).
DENSE_TILE_BYTES = 8 << 20
DENSE_TILE_ROWS = 256
def unsupported_reason(x: torch.Tensor, values: torch.Tensor, n: int, m: int) -> str | None:
    """Why :func:`nm_linear_cpu` cannot take this call, or ``None`` if it can."""
    if not x.is_cpu:
        return f"device {x.device}"
    if values.dtype not in DTYPES:
        return f"dtype {values.dtype} (the CPU kernels take float32 and bfloat16)"
    name = isa()
    key = ("unsupported", name, n, m)  # asked for every layer call: kept with the build state
    if key not in _library._STATE:
        _library._STATE[key] = _unsupported_reason(name, n, m)
    return _library._STATE[key]  # type: ignore[return-value]


def _unsupported_reason(name: str, n: int, m: int) -> str | None:
    reason = pattern_reason(n, m) or isa_reason(name)
    if reason is None and any_n(n) and name == "avx2":
        return (f"pattern {n}:{m} on AVX2 (its kernels need N dividing 8; with AVX-512 any N "
                "runs)")
    if reason is None and wide_m(m) and name == "avx2":
        return (f"pattern {n}:{m} on AVX2 (its kernels need M <= {NARROW_M}; with AVX-512 any "
                f"M up to {MAX_M} runs)")
    return reason


KERNELS = ("auto", "avx2", "dot", "table", "pairs", "lanes", "dense", "amx")
_KERNEL_CODE = {"avx2": 0, "dot": 1, "table": 2, "pairs": 3, "lanes": 4}
# The options bit "the CPU has AVX512_BF16 and VBMI" (OPTION_BF16 in nm_common.h).
OPTION_BF16 = 8


def kernel_for(name: str, dtype: torch.dtype, rows: int, n: int, m: int) -> str:
    """The kernel :data:`DISPATCH` picks for ``rows`` rows of an N:M weight of ``dtype`` on
    instruction set ``name`` (``"avx2"``: the AVX2 library; the dot kernel needs M a power of
    two, else the AVX2 library runs those rows)."""
    if name == "avx2":
        return "avx2"
    if dtype == _BF16 and amx_rows(rows) and name == "avx512bf16" and kernel_takes("amx", n, m):
        return "amx"
    if dtype == _BF16 and amx_dense(rows):
        return "dense"
    if wide_m(m):
        return _wide_kernel(dtype, rows, n, m)
    if any_n(n):  # N = 3, 5, 6, 7, ...: only these two take it
        return "dot" if rows <= DOT_MAX_ROWS and kernel_takes("dot", n, m) else "dense"
    if name == "avx512bf16" and dtype == _BF16 and rows == 1 and m in (4, 8) and 2 * n >= m:
        return "dot"  # see ONE_ROW_DOT
    if name == "avx512bf16" and dtype == _BF16 and m == 16:
        dot_rows = DOT_MAX_ROWS if 2 * n >= m else M16_BF16_DOT_ROWS
        if 2 <= rows <= dot_rows and n > M16_BF16_TABLE_DENSITY * m:
            return "dot"  # see M16_BF16_DOT_ROWS
        if rows <= M16_BF16_AVX2_ROWS:
            return "avx2"
        return "table" if n <= M16_BF16_TABLE_DENSITY * m else "dense"
    for limit, kernel in DISPATCH[(name, dtype)]:
        if limit is None or rows <= limit:
            if kernel == "lanes" and not lanes_take(n, m):
                kernel = "pairs"
            if kernel == "pairs" and m > PAIRS_MAX_M and lanes_take(n, m):
                kernel = "lanes"
            if (kernel == "dot" and dtype == _BF16 and m == 8 and lanes_take(n, m)
                    and (4 * n <= m or rows == 4)):
                kernel = "lanes"  # see DOT_ROWS_M8
            if kernel == "pairs" and not pairs_take(n, m):
                kernel = "dot" if rows <= DOT_MAX_ROWS else "dense"
            if kernel == "dense" and dtype == _FP32 and n <= TABLE_MAX_DENSITY * m:
                kernel = "table"
            if kernel == "dot" and m & (m - 1):
                return "avx2"
            return kernel
    raise AssertionError("DISPATCH entries end with None")


def _wide_kernel(dtype: torch.dtype, rows: int, n: int, m: int) -> str:
    """M > 16 (8-bit positions), see WIDE_M_TABLE_DENSITY."""
    density = n / m
    dot, table = kernel_takes("dot", n, m), kernel_takes("table", n, m)
    if table and density <= WIDE_M_TABLE_DENSITY:
        return "dot" if rows == 1 and dot and 2 * density > WIDE_M_TABLE_DENSITY else "table"
    if dot and rows <= WIDE_M_DOT_ROWS:
        return "dot"
    if table and (density <= TABLE_MAX_DENSITY if dtype == _FP32 else rows <= 16):
        return "table"
    return "dense"


def tiled_linear(rows: torch.Tensor, out_features: int, weight_dtype: torch.dtype, expand,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The dense path's loop: ``rows @ W.T + bias`` with W expanded tile by tile (at least
    :data:`DENSE_TILE_ROWS` output rows, about :data:`DENSE_TILE_BYTES`) into one buffer by
    ``expand(first, last, buffer)`` (which returns the tile) and multiplied by ``F.linear``
    (oneDNN) while in cache, in ``rows``' dtype: never a whole dense copy."""
    import torch.nn.functional as F

    in_features = rows.shape[1]
    tile = max(DENSE_TILE_ROWS,
               DENSE_TILE_BYTES // (in_features * weight_dtype.itemsize) // 16 * 16)
    buffer = _kept_buffer(min(tile, out_features), in_features, weight_dtype)
    if tile >= out_features:  # one tile: F.linear's result is y
        return F.linear(rows, expand(0, out_features, buffer).to(rows.dtype),
                        None if bias is None else bias.to(rows.dtype))
    y = torch.empty(rows.shape[0], out_features, dtype=rows.dtype)
    for first in range(0, out_features, tile):
        last = min(first + tile, out_features)
        weight = expand(first, last, buffer).to(rows.dtype)
        y[:, first:last] = F.linear(rows, weight,
                                    None if bias is None else bias[first:last].to(rows.dtype))
    return y


# The dense path's tile buffer, kept by each thread between calls: a fresh one of a few MiB
# comes from the system as new pages, whose faults and zeroing cost more than expanding the
# weight into it (1024x1024 fp32, 256 rows: 1.2 ms of a 5.0 ms call, against 65 us to expand).
_KEPT = threading.local()


def _kept_buffer(rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    kept = getattr(_KEPT, "buffers", None)
    if kept is None:
        kept = _KEPT.buffers = {}
    flat = kept.get(dtype)
    if flat is None or flat.numel() < rows * columns:
        flat = kept[dtype] = torch.empty(rows * columns, dtype=dtype)
    return flat[:rows * columns].view(rows, columns)


def _dense_tiles(name: str, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int,
                 m: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The "dense" path of a packed weight: its tiles expanded by the C code
    (:func:`tiled_linear`). Exactly F.linear's math."""
    out_features, slots = values.shape
    in_features = x.shape[-1]
    flat = x.reshape(-1, in_features)
    values, indices = values.contiguous(), indices.contiguous()
    unpack = library(LIBRARY_OF[name]).nmsparse_unpack
    threads = threads_for(flat.shape[0], values.numel())
    options = OPTION_BF16 if name == "avx512bf16" else 0

    def expand(first: int, last: int, buffer: torch.Tensor) -> torch.Tensor:
        status = unpack(values.data_ptr(), int(values.dtype == torch.bfloat16),
                        indices.data_ptr(), slots, indices.shape[1], n, m, in_features, first,
                        last, buffer.data_ptr(), threads, options)
        if status:
            raise MemoryError(STATUS[2]) if status == 2 else ValueError(
                STATUS[1].format(n=n, m=m))
        return buffer[:last - first]

    y = tiled_linear(flat, out_features, values.dtype, expand, bias)
    return y.reshape(*x.shape[:-1], out_features)


def nm_linear_cpu(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                  bias: torch.Tensor | None = None, *, kernel: str = "auto") -> torch.Tensor:
    """``x @ W.T + bias`` for a packed N:M weight; arguments as checked by ``nm_linear``.
    ``kernel``: ``"avx2"`` (the AVX2 library), or with AVX-512 ``"dot"``, ``"table"``,
    ``"pairs"`` (bf16 weights on ``avx512bf16``, :func:`pairs_take`), ``"lanes"`` (the same,
    :func:`lanes_take`) or ``"dense"`` forces one (tests, benchmarks); ``"auto"`` follows
    :data:`DISPATCH`."""
    reason = unsupported_reason(x, values, n, m)
    if reason:
        raise ValueError(f"the CPU N:M kernels cannot run this call: {reason}")
    return run_checked(x, values, indices, n, m, bias, kernel=kernel)


def run_checked(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                bias: torch.Tensor | None = None, *, kernel: str = "auto") -> torch.Tensor:
    """:func:`nm_linear_cpu` for a call :func:`unsupported_reason` has passed (the op checks
    first, to choose between these kernels and its fallback, and a decode step makes ~100
    calls: the check is not repeated)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {KERNELS}")
    name = isa()
    out_features, slots = values.shape
    in_features = x.shape[-1]
    flat = x if x.dim() == 2 else x.reshape(-1, in_features)
    batch = flat.shape[0]
    options = 0
    x_dtype = torch.float32
    chosen = kernel_for(name, values.dtype, batch, n, m) if kernel == "auto" else kernel
    if name == "avx2" and chosen != "avx2":
        raise ValueError(f"kernel {chosen!r} needs AVX-512 ({ENV_ISA}={name})")
    if chosen == "dense":
        return _dense_tiles(name, x, values, indices, n, m, bias)
    if chosen == "amx":
        return amx_linear(x, values, indices, n, m, bias)
    if chosen == "avx2":
        name = "avx2"
    else:
        options = _KERNEL_CODE[chosen]
        if name == "avx512bf16":
            options |= OPTION_BF16
            if chosen != "table" and values.dtype == torch.bfloat16:
                x_dtype = torch.bfloat16
    rows = contiguous_as(flat, x_dtype)
    values, indices = values.contiguous(), indices.contiguous()

    def call(bias32, y):
        return library(LIBRARY_OF[name]).nmsparse_nm_linear(
            rows.data_ptr(), int(x_dtype == torch.bfloat16), batch, in_features,
            values.data_ptr(), int(values.dtype == torch.bfloat16), indices.data_ptr(),
            out_features, slots, indices.shape[1], n, m, bias32, y,
            threads_for(batch, values.numel()), options)

    return call_into_fp32(call, x, batch, out_features, bias, lambda status: STATUS.get(
        status, "unknown status {status}").format(n=n, m=m, status=status))
