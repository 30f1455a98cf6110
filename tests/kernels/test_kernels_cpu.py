"""The CPU N:M kernels (nmsparse.kernels.cpu) against F.linear on the unpacked weight.

Tolerances. The kernels and F.linear both sum the same K = in * N / M products in fp32 in
different orders; each result is within gamma_K * S of the exact sum, S = |x| @ |W|.T + |b|
and gamma_K = K * 2**-24 (the standard bound of recursive/blocked summation), so the two
differ by at most 2 * gamma_K * S. A wrong position or a dropped value changes a result by
about one product, |w x| ~ S / K, hundreds of times more than that bound for these sizes.
bf16 output adds one rounding to bf16 (relative error at most u = 2**-8) on each side, and
F.linear may round once more when it adds the bias in bf16: 3 u S covers the three (every
intermediate is at most S in size, up to the tiny accumulation error).
Against a float64 reference the kernel itself must be within gamma_K * S (fp32) and one bf16
rounding more (bf16): it rounds exactly once, after adding the bias in fp32.

Every instruction set this CPU runs (``NMSPARSE_CPU_ISA``: avx2, avx512, avx512bf16) and every
kernel of the AVX-512 library (dot, table) is checked on its own, whatever the automatic
dispatch would pick. On a machine where the kernels cannot be built (no AVX2 or no compiler)
only the fallback and build tests run and the others are skipped with the reason.
"""

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.engine.masks import nm_mask
from nmsparse.kernels import NMLinear, _op, cpu, nm_linear, swap_linear_layers
from nmsparse.packing import pack, pack_positions, unpack_positions, unpack_rows

PATTERNS = [(2, 4), (4, 8), (1, 4), (2, 8), (1, 8), (1, 16)]
# N not dividing 8: the dot kernel and the dense path (AVX-512) take them
ANY_N = [(3, 4), (3, 8), (5, 8), (6, 8), (7, 8), (3, 16), (5, 16), (12, 16), (15, 16), (3, 6)]
# M > 16 (8-bit positions): the dot kernel (M = 32, 64), the table kernel and the dense path
WIDE_M = [(1, 32), (2, 32), (3, 32), (4, 64), (8, 128), (1, 256), (2, 24)]
DTYPES = [torch.float32, torch.bfloat16]
_BF16, _FP32 = torch.bfloat16, torch.float32
BUILD_ERROR = cpu.build_error()
needs_kernels = pytest.mark.skipif(BUILD_ERROR is not None,
                                   reason=f"CPU kernels unavailable: {BUILD_ERROR}")
# (instruction set, kernel) pairs this machine runs: every path the CPU supports, separately.
PATHS = [(isa, kernel) for isa in cpu.ISAS if BUILD_ERROR is None and cpu.isa_reason(isa) is None
         for kernel in {"avx2": ("auto",), "avx512": ("auto", "dot", "table", "dense"),
                        "avx512bf16": ("auto", "dot", "table", "pairs", "lanes", "dense")}[isa]]


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NMSPARSE_KERNELS", "cpu")


def nm_weight(out: int, inp: int, n: int, m: int, dtype: torch.dtype,
              generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(out, inp, generator=generator)
    return (weight * nm_mask(weight, n, m)).to(dtype)


def bounds(x, weight, bias, n, m):
    """(2 gamma_K S, S) of the module docstring, in float64."""
    x64, w64 = x.double(), weight.double()
    scale = F.linear(x64.abs(), w64.abs(), None if bias is None else bias.double().abs())
    k = weight.shape[1] * n // m + 1
    return 2 * k * 2.0**-24 * scale, scale


def assert_close_to_linear(y, x, values, indices, n, m, bias):
    weight = unpack_rows(values, indices, n, m)
    ref = F.linear(x, weight, bias)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    accumulation, scale = bounds(x, weight, bias, n, m)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    diff_ref = (y.double() - ref.double()).abs()
    diff_exact = (y.double() - exact).abs()
    if y.dtype == torch.float32:
        assert bool((diff_ref <= accumulation).all()), float((diff_ref - accumulation).max())
        assert bool((diff_exact <= accumulation / 2).all())
    else:
        assert bool((diff_ref <= accumulation + 3 * 2.0**-8 * scale).all())
        assert bool((diff_exact <= accumulation / 2 + 2.0**-8 * (exact.abs() + accumulation)).all())


def run_path(path, x, packed_or_values, indices, n, m, bias, monkeypatch):
    isa, kernel = path
    monkeypatch.setenv(cpu.ENV_ISA, isa)
    if kernel == "auto":  # through the op, as a model calls it
        return nm_linear(x, packed_or_values, indices, n, m, bias)
    return cpu.nm_linear_cpu(x, packed_or_values, indices, n, m, bias, kernel=kernel)


@needs_kernels
@pytest.mark.parametrize("path", PATHS, ids=["-".join(p) for p in PATHS])
@pytest.mark.parametrize(("n", "m"), PATTERNS + [(1, 2), (2, 16), (4, 16), (8, 16), (1, 3), (2, 6)]
                         + ANY_N + WIDE_M)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_kernels_match_linear_over_shapes_and_batches(n, m, dtype, path, monkeypatch):
    generator = torch.Generator().manual_seed(1000 * n + m)
    kernel = "avx2" if path[0] == "avx2" else path[1]
    if kernel != "auto" and not cpu.kernel_takes(kernel, n, m):
        # a pattern a kernel does not take is refused, with the reason, never run wrong
        packed = pack(nm_weight(4, 4 * m, n, m, dtype, generator), n, m)
        with pytest.raises(ValueError, match=f"{n}:{m}|reject pattern"):
            run_path(path, torch.randn(2, 4 * m).to(dtype), packed.values, packed.indices, n,
                     m, None, monkeypatch)
        return
    takes = cpu.BF16_KERNELS.get(path[1])
    if takes and not (dtype == torch.bfloat16 and takes(n, m)):
        pytest.skip(f"the {path[1]} kernel does not take {dtype} {n}:{m}")
    # odd output counts; group counts that leave tails after the 8-, 16- and 64-input steps
    # and rows long enough for the vector mask builder (>= 64 index bytes)
    # batches: 1 and 3 (dot, AVX2), 9 (dot in two passes, dense, lanes 8 + 1), 65 (table and
    # pairs in two tiles of 64 rows)
    for out, groups in [(1, 1), (7, 3), (37, 13), (9, 300)]:
        inp = groups * m
        weight = nm_weight(out, inp, n, m, dtype, generator)
        packed = pack(weight, n, m)
        for batch in [1, 3, 9, 65]:
            x = torch.randn(batch, inp, generator=generator).to(dtype)
            bias = torch.randn(out, generator=generator).to(dtype) if batch % 2 else None
            y = run_path(path, x, packed.values, packed.indices, n, m, bias, monkeypatch)
            assert_close_to_linear(y, x, packed.values, packed.indices, n, m, bias)


@needs_kernels
def test_the_best_instruction_set_is_used_and_a_forced_one_is_checked(monkeypatch):
    monkeypatch.delenv(cpu.ENV_ISA, raising=False)
    runs = [isa for isa in cpu.ISAS if cpu.isa_reason(isa) is None]
    assert cpu.isa() == runs[-1]
    packed = pack(nm_weight(8, 64, 2, 4, torch.float32, torch.Generator()), 2, 4)
    x = torch.randn(2, 64)
    monkeypatch.setenv(cpu.ENV_ISA, "sse9")
    with pytest.raises(ValueError, match="NMSPARSE_CPU_ISA='sse9' is not one of avx2, avx512"):
        nm_linear(x, packed.values, packed.indices, 2, 4)
    # a CPU without AVX-512: forcing it names what is missing; automatic picks AVX2
    monkeypatch.setattr(cpu._library, "_STATE", {"features": {"avx2"}})
    monkeypatch.setenv(cpu.ENV_ISA, "avx512bf16")
    with pytest.raises(ValueError, match="this CPU has no AVX512BF16"):
        nm_linear(x, packed.values, packed.indices, 2, 4)
    monkeypatch.setenv("NMSPARSE_KERNELS", "auto")  # auto: exact fallback, one warning
    monkeypatch.setattr(_op, "_CPU_WARNED", [])
    with pytest.warns(UserWarning, match="unavailable \\(this CPU has no AVX512BF16"):
        y = nm_linear(x, packed.values, packed.indices, 2, 4)
    assert torch.equal(y, F.linear(x, unpack_rows(packed.values, packed.indices, 2, 4)))
    monkeypatch.delenv(cpu.ENV_ISA)
    assert cpu.isa() == "avx2"
    assert_close_to_linear(nm_linear(x, packed.values, packed.indices, 2, 4), x, packed.values,
                           packed.indices, 2, 4, None)


@needs_kernels
def test_dot_kernel_refuses_a_group_size_that_is_not_a_power_of_two(monkeypatch):
    if cpu.isa_reason("avx512"):
        pytest.skip(f"no AVX-512 here: {cpu.isa_reason('avx512')}")
    monkeypatch.setenv(cpu.ENV_ISA, "avx512")
    packed = pack(nm_weight(4, 12, 1, 3, torch.float32, torch.Generator()), 1, 3)
    with pytest.raises(ValueError, match="reject pattern 1:3 for this kernel"):
        cpu.nm_linear_cpu(torch.randn(2, 12), packed.values, packed.indices, 1, 3, kernel="dot")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_non_contiguous_and_batched_inputs(dtype):
    generator = torch.Generator().manual_seed(7)
    n, m = 2, 4
    weight = nm_weight(24, 64, n, m, dtype, generator)
    packed = pack(weight, n, m)
    bias = torch.randn(24, generator=generator).to(dtype)
    wide = torch.randn(3, 5, 128, generator=generator).to(dtype)
    for x in [wide[..., ::2], torch.randn(64, 6, generator=generator).to(dtype).T,
              wide[:, 1:4, :64], torch.randn(2, 3, 4, 64, generator=generator).to(dtype)]:
        assert not x.is_contiguous() or x.dim() == 4
        y = nm_linear(x, packed.values, packed.indices, n, m, bias)
        flat = x.reshape(-1, 64)
        assert_close_to_linear(y.reshape(-1, 24), flat, packed.values, packed.indices, n, m, bias)
    # a transposed (non-contiguous) packed weight gives the same result
    values = packed.values.T.contiguous().T
    x = torch.randn(4, 64, generator=generator).to(dtype)
    assert torch.equal(nm_linear(x, values, packed.indices, n, m),
                       nm_linear(x, packed.values, packed.indices, n, m))
    assert nm_linear(x[:0], packed.values, packed.indices, n, m).shape == (0, 24)


@needs_kernels
def test_dense_path_over_several_tiles_with_its_kept_buffer(monkeypatch):
    """Tiles of 16 output rows (the last one partial) give F.linear's product; each thread
    keeps one buffer per dtype between calls and layers, growing it when a layer needs more."""
    monkeypatch.setattr(cpu, "DENSE_TILE_BYTES", 1)
    monkeypatch.setattr(cpu, "DENSE_TILE_ROWS", 16)
    generator = torch.Generator().manual_seed(11)
    n, m = 2, 4
    kept = {}
    for dtype in DTYPES:
        for out, inp, bias in [(40, 64, True), (16, 32, False), (50, 128, True), (7, 16, True)]:
            packed = pack(nm_weight(out, inp, n, m, dtype, generator), n, m)
            b = torch.randn(out, generator=generator).to(dtype) if bias else None
            x = torch.randn(3, inp, generator=generator).to(dtype)
            y = cpu.nm_linear_cpu(x, packed.values, packed.indices, n, m, b, kernel="dense")
            assert_close_to_linear(y, x, packed.values, packed.indices, n, m, b)
            buffer = cpu._KEPT.buffers[dtype]
            assert buffer.numel() >= min(out, 16) * inp
            kept.setdefault(dtype, []).append(buffer.data_ptr())
        # kept after the first layer, grown once (for 50x128), then kept again
        assert kept[dtype][0] == kept[dtype][1] and kept[dtype][2] == kept[dtype][3]
    other = []
    thread = threading.Thread(target=lambda: other.append(cpu.nm_linear_cpu(
        x, packed.values, packed.indices, n, m, b, kernel="dense")) or other.append(
        cpu._KEPT.buffers[x.dtype].data_ptr()))
    thread.start()
    thread.join()
    assert torch.equal(other[0], cpu.nm_linear_cpu(x, packed.values, packed.indices, n, m, b,
                                                   kernel="dense"))
    assert other[1] != cpu._KEPT.buffers[x.dtype].data_ptr()  # its own buffer


@needs_kernels
@pytest.mark.parametrize("path", PATHS, ids=["-".join(p) for p in PATHS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_kernels_detect_a_wrong_position(path, dtype, monkeypatch):
    """The tolerance is tight enough to see one moved weight (so the tests above can fail)."""
    if path[1] in cpu.BF16_KERNELS and dtype != torch.bfloat16:
        pytest.skip(f"the {path[1]} kernel takes bf16")
    generator = torch.Generator().manual_seed(3)
    packed = pack(nm_weight(16, 256, 2, 4, dtype, generator), 2, 4)
    broken = packed.indices.clone()
    broken[5, 9] ^= 0b01  # one stored position points elsewhere
    for rows in (1, 3, 20):
        x = torch.randn(rows, 256, generator=generator).to(dtype)
        y = run_path(path, x, packed.values, broken, 2, 4, None, monkeypatch)
        with pytest.raises(AssertionError):
            assert_close_to_linear(y, x, packed.values, packed.indices, 2, 4, None)


PAIR_PATTERNS = [(2, 4), (4, 8), (1, 4), (2, 8), (1, 8), (1, 2)]


@needs_kernels
@pytest.mark.parametrize(("n", "m"), PAIR_PATTERNS)
def test_pairs_kernel_over_panels_row_blocks_and_positions_in_any_order(n, m, monkeypatch):
    """The pairs kernel's loop nest (panels of 512 outputs per thread, superblocks, slices,
    two outputs at a time, row blocks of 64) on a layer with more outputs than one panel per
    thread; and positions stored in any order within a pair (the format asks for ascending
    ones, a hand-made weight may not have them), which must still give x[a] w0 + x[b] w1."""
    if "pairs" not in [kernel for isa, kernel in PATHS if isa == "avx512bf16"]:
        pytest.skip("the pairs kernel needs AVX512_BF16 and the kernels built")
    monkeypatch.setenv(cpu.ENV_ISA, "avx512bf16")
    generator = torch.Generator().manual_seed(11 * n + m)
    out, inp = 1100, 40 * m + (2 * m if n == 1 else 0)  # an odd number of groups for N = 1
    packed = pack(nm_weight(out, inp, n, m, torch.bfloat16, generator), n, m)
    for rows in (5, 16, 80):  # fewer rows than lanes, 16, and a block of 64 plus 16
        x = torch.randn(rows, inp, generator=generator).bfloat16()
        bias = torch.randn(out, generator=generator).bfloat16()
        y = cpu.nm_linear_cpu(x, packed.values, packed.indices, n, m, bias, kernel="pairs")
        assert_close_to_linear(y, x, packed.values, packed.indices, n, m, bias)
    # swap the two positions of every pair (and the values with them): the same weight
    slots = packed.values.shape[1]
    pairs = slots // 2 * 2
    order = torch.arange(slots)
    order[:pairs] = order[:pairs].view(-1, 2).flip(-1).flatten()
    positions = unpack_positions(packed.indices, m, slots)[:, order]
    values, indices = packed.values[:, order].contiguous(), pack_positions(positions, m)
    if n > 1:  # within a group the swapped pair now reads (b, a): descending
        assert bool((positions[:, 0] > positions[:, 1]).all())
    x = torch.randn(24, inp, generator=generator).bfloat16()
    y = cpu.nm_linear_cpu(x, values, indices, n, m, None, kernel="pairs")
    if n > 1:
        assert torch.equal(unpack_rows(values, indices, n, m),
                           unpack_rows(packed.values, packed.indices, n, m))
    assert_close_to_linear(y, x, values, indices, n, m, None)


@needs_kernels
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (2, 8), (1, 2)])
def test_lanes_kernel_over_panels_row_blocks_window_tails_and_positions_in_any_order(
        n, m, monkeypatch):
    """The lanes kernel's layout and loops: more outputs than one panel per thread and a
    partial block of 16; inputs that end inside an 8-input window and, for N = 1, a last pair
    with one value; row counts around its blocks of 8; rows long enough for full 64-byte
    loads of the position bits and short enough that no step is wholly inside the row; and
    positions stored in any order within a pair, which must still give x[a] w0 + x[b] w1.
    Then a moved position must be seen (so these assertions can fail)."""
    if "lanes" not in [kernel for isa, kernel in PATHS if isa == "avx512bf16"]:
        pytest.skip("the lanes kernel needs AVX512_BF16 and the kernels built")
    monkeypatch.setenv(cpu.ENV_ISA, "avx512bf16")
    generator = torch.Generator().manual_seed(13 * n + m)
    # groups: 16 windows and a half (when M <= 4: an odd group count, so N = 1 ends alone)
    for out, inp in [(83, 132 if m <= 4 else 136), (21, m), (40, 24 if m != 8 else 16),
                     (1100, 1032 if m <= 4 else 1024)]:
        packed = pack(nm_weight(out, inp, n, m, torch.bfloat16, generator), n, m)
        for rows in (1, 7, 8, 21):
            x = torch.randn(rows, inp, generator=generator).bfloat16()
            bias = torch.randn(out, generator=generator).bfloat16() if rows % 2 else None
            y = cpu.nm_linear_cpu(x, packed.values, packed.indices, n, m, bias, kernel="lanes")
            assert_close_to_linear(y, x, packed.values, packed.indices, n, m, bias)
    slots = packed.values.shape[1]
    order = torch.arange(slots)
    order[:slots // 2 * 2] = order[:slots // 2 * 2].view(-1, 2).flip(-1).flatten()
    positions = unpack_positions(packed.indices, m, slots)[:, order]
    values, indices = packed.values[:, order].contiguous(), pack_positions(positions, m)
    x = torch.randn(9, inp, generator=generator).bfloat16()
    y = cpu.nm_linear_cpu(x, values, indices, n, m, None, kernel="lanes")
    if n > 1:  # the same weight, each pair now stored (b, a)
        assert torch.equal(unpack_rows(values, indices, n, m),
                           unpack_rows(packed.values, packed.indices, n, m))
    assert_close_to_linear(y, x, values, indices, n, m, None)
    largest = int(values[700].float().abs().argmax())  # one product moves by |w x|
    positions[700, largest] = (positions[700, largest] + 1) % m
    y = cpu.nm_linear_cpu(x, values, pack_positions(positions, m), n, m, None, kernel="lanes")
    with pytest.raises(AssertionError):
        assert_close_to_linear(y, x, values, indices, n, m, None)


def test_dispatch_only_picks_a_kernel_that_takes_the_pattern(monkeypatch):
    """Every (instruction set, dtype) row of the measured table, every pattern the CPU kernels
    take and every batch size: the pick exists and takes the pattern (pairs and lanes: bf16 and
    their predicates; dot: M a power of two; table and dense: any). The table of a CPU without
    AMX, whatever this one has (test_amx_cpu checks the AMX rows)."""
    monkeypatch.setitem(cpu._library._STATE, "features", cpu.features() - {"amx"})
    for (isa, dtype), entries in cpu.DISPATCH.items():
        assert entries[-1][0] is None
        for n, m in PATTERNS + [(1, 2), (2, 16), (4, 16), (8, 16), (1, 3), (2, 6)] + ANY_N + WIDE_M:
            for rows in range(1, 300):
                kernel = cpu.kernel_for(isa, dtype, rows, n, m)
                assert kernel in cpu.KERNELS[1:], (isa, dtype, n, m, rows, kernel)
                assert cpu.kernel_takes(kernel, n, m), (isa, dtype, n, m, rows, kernel)
                if cpu.any_n(n):
                    assert kernel in ("dot", "dense"), (n, m, kernel)
                if kernel in cpu.BF16_KERNELS:
                    assert dtype == torch.bfloat16 and cpu.BF16_KERNELS[kernel](n, m)
                if kernel == "dot":
                    assert m & (m - 1) == 0
                if rows > cpu.DOT_MAX_ROWS:  # the dot kernel would pass over the weight again
                    assert kernel != "dot"
                if kernel == "dense" and dtype == torch.float32 and not cpu.any_n(n):
                    # sparse enough: the table (which reads 8 positions as whole groups)
                    assert n > cpu.TABLE_MAX_DENSITY * m
    assert cpu.kernel_for("avx512bf16", torch.float32, 512, 2, 8) == "table"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 64, 1, 16) == "avx2"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 1, 2, 4) == "dot"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 1, 2, 8) == "avx2"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 2, 2, 8) == "lanes"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 3, 4, 8) == "dot"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 4, 4, 8) == "lanes"
    assert cpu.kernel_for("avx512bf16", torch.float32, 4, 2, 8) == "dot"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 65, 2, 16) == "table"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 65, 4, 16) == "dense"
    assert [cpu.kernel_for("avx512bf16", torch.bfloat16, rows, 4, 16) for rows in (1, 2, 6, 7)] \
        == ["avx2", "dot", "dot", "avx2"]
    assert [cpu.kernel_for("avx512bf16", torch.bfloat16, rows, 8, 16) for rows in (1, 2, 8, 9)] \
        == ["avx2", "dot", "dot", "avx2"]
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, 2, 2, 16) == "avx2"
    # M > 16, see WIDE_M_TABLE_DENSITY
    wide = {(1, 1, 32, _BF16): "table", (1, 4, 32, _BF16): "dot", (2, 4, 32, _BF16): "table",
            (4, 8, 32, _BF16): "dot", (16, 8, 32, _BF16): "table", (64, 8, 32, _BF16): "dense",
            (64, 8, 32, _FP32): "table", (8, 16, 32, _FP32): "dense", (1, 1, 128, _BF16): "table",
            (2, 3, 32, _BF16): "dot", (8, 3, 32, _BF16): "dense", (1, 3, 48, _BF16): "dense"}
    assert {key: cpu.kernel_for("avx512bf16", key[3], *key[:3]) for key in wide} == wide
    assert cpu.kernel_for("avx512bf16", torch.float32, 512, 2, 4) == "dense"


@needs_kernels
def test_backend_cpu_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv(cpu.ENV_ISA, "avx2")  # its kernels read positions of at most 4 bits
    packed = pack(nm_weight(8, 64, 1, 32, torch.float32, torch.Generator()), 1, 32)
    with pytest.raises(ValueError, match="CPU kernels cannot run: pattern 1:32 on AVX2"):
        nm_linear(torch.randn(2, 64), packed.values, packed.indices, 1, 32)
    monkeypatch.delenv(cpu.ENV_ISA)
    packed = pack(nm_weight(8, 32, 2, 4, torch.float16, torch.Generator()), 2, 4)
    with pytest.raises(ValueError, match="dtype torch.float16"):
        nm_linear(torch.randn(2, 32).half(), packed.values, packed.indices, 2, 4)


@needs_kernels
def test_auto_uses_the_kernels_on_cpu_and_falls_back_where_they_cannot_run(monkeypatch):
    calls = []
    real = cpu.run_checked
    monkeypatch.setattr(cpu, "run_checked", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setenv("NMSPARSE_KERNELS", "auto")
    packed = pack(nm_weight(8, 32, 2, 4, torch.float32, torch.Generator()), 2, 4)
    nm_linear(torch.randn(2, 32), packed.values, packed.indices, 2, 4)
    assert calls == [1]
    monkeypatch.setenv(cpu.ENV_ISA, "avx2")
    packed = pack(nm_weight(8, 64, 3, 32, torch.float32, torch.Generator()), 3, 32)
    x = torch.randn(2, 64)
    y = nm_linear(x, packed.values, packed.indices, 3, 32)  # unsupported pattern: exact fallback
    assert calls == [1]
    assert torch.equal(y, F.linear(x, unpack_rows(packed.values, packed.indices, 3, 32)))


def test_fallback_when_the_kernels_cannot_build_warns_once_and_is_exact(monkeypatch):
    monkeypatch.setenv("NMSPARSE_KERNELS", "auto")
    monkeypatch.setattr(cpu._library, "_STATE", {})
    monkeypatch.setattr(_op, "_CPU_WARNED", [])
    monkeypatch.setattr(cpu._build, "cpu_supports_avx2_fma", lambda: False)
    packed = pack(nm_weight(8, 32, 2, 4, torch.float32, torch.Generator()), 2, 4)
    x = torch.randn(5, 32)
    with pytest.warns(UserWarning, match=r"CPU N:M kernels are unavailable \(this CPU has no "
                                         r"AVX2/FMA\).*exact"):
        y = nm_linear(x, packed.values, packed.indices, 2, 4)
    assert torch.equal(y, F.linear(x, unpack_rows(packed.values, packed.indices, 2, 4)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        nm_linear(x, packed.values, packed.indices, 2, 4)
    monkeypatch.setenv("NMSPARSE_KERNELS", "cpu")
    with pytest.raises(ValueError, match="no AVX2/FMA"):
        nm_linear(x, packed.values, packed.indices, 2, 4)


BUILD_CODE = """
import sys
from nmsparse.kernels.cpu import _build
try:
    _build.load()
except _build.BuildError as error:
    print("error:", error)
else:
    print("built")
"""

FALLBACK_CODE = """
import warnings
import torch
import torch.nn.functional as F
from nmsparse.kernels import nm_linear
from nmsparse.packing import pack, unpack_rows
weight = torch.randn(8, 32)
weight[:, 1::2] = 0
packed = pack(weight, 2, 4)
x = torch.randn(3, 32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ys = [nm_linear(x, packed.values, packed.indices, 2, 4) for _ in range(3)]
exact = all(torch.equal(y, F.linear(x, unpack_rows(packed.values, packed.indices, 2, 4)))
            for y in ys)
print(len(caught), exact)
print(caught[0].message if caught else "")
"""


def run_python(code, env):
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def clean_env(**changes):
    env = {key: value for key, value in os.environ.items()
           if key not in ("NMSPARSE_CACHE_DIR", "XDG_CACHE_HOME", "CXX", "NMSPARSE_CPU_ISA")}
    env["NMSPARSE_KERNELS"] = "auto"
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.parametrize("where", ["file in the way", "home not writable", "no home"])
def test_a_cache_folder_that_cannot_be_made_falls_back_with_one_warning(where, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    env = {"file in the way": clean_env(NMSPARSE_CACHE_DIR=str(blocker / "cache")),
           # /proc refuses new folders even to root
           "home not writable": clean_env(HOME="/proc/no-such-home"),
           "no home": clean_env(HOME=None, XDG_CACHE_HOME="/proc/no-such-cache")}[where]
    summary, message = run_python(FALLBACK_CODE, env)
    assert summary == "1 True", message  # one warning for three calls; results exact
    assert "CPU N:M kernels are unavailable (cannot build the CPU kernels in" in message
    assert "falls back to unpack + F.linear (exact" in message


# logs an x per link: one per build of a library, however many units it compiles
COUNTING_CXX = """#!/bin/sh
case "$*" in *-shared*) echo x >> "{log}" ;; esac
exec "{cxx}" "$@"
"""


def test_a_changed_shared_header_names_a_new_build_of_every_library(tmp_path, monkeypatch):
    build = cpu._build
    for path in build.HERE.iterdir():
        if path.suffix in (".cpp", ".h"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(build, "HERE", tmp_path)
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    before = {name: build.library_path(name) for name in build.LIBRARIES}
    assert len(set(before.values())) == len(build.LIBRARIES)
    header = tmp_path / "nm_common.h"
    header.write_text(header.read_text() + "\n// changed\n")
    after = {name: build.library_path(name) for name in build.LIBRARIES}
    assert all(after[name] != before[name] for name in build.LIBRARIES)
    # and every library does read it, through some unit's includes
    assert all(any("nm_common.h" in _included(tmp_path, source) for source in sources)
               for sources, _, _ in build.LIBRARIES.values())


def _included(folder, source, seen=None):
    """The names of the headers ``source`` includes from ``folder``, directly or not."""
    seen = set() if seen is None else seen
    for line in (folder / source).read_text().splitlines():
        if line.startswith('#include "') and (name := line.split('"')[1]) not in seen:
            seen.add(name)
            _included(folder, name, seen)
    return seen


def test_build_without_a_compiler_says_why(tmp_path):
    env = clean_env(NMSPARSE_CACHE_DIR=str(tmp_path), PATH=str(tmp_path))
    expected = ("error: no C++ compiler found (set CXX, or install g++)"
                if BUILD_ERROR is None or "compiler" in BUILD_ERROR else None)
    out = run_python(BUILD_CODE, env)
    assert expected is None or out == [expected]


@needs_kernels
def test_a_build_says_so_once_and_a_folder_built_ahead_loads_without_a_compiler(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "empty").mkdir()

    def build(**changes):
        done = subprocess.run([sys.executable, "-c", BUILD_CODE], capture_output=True, text=True,
                              env=clean_env(NMSPARSE_CACHE_DIR=str(cache), **changes),
                              timeout=600)
        return done.stdout.split(), done.stderr.splitlines()

    out, err = build()
    assert out == ["built"]
    assert len(err) == 1 and err[0].startswith(
        f"nmsparse: compiling the avx2 CPU kernels into {cache}, once per version"), err
    assert build() == (["built"], [])  # cached: silent
    # as in a container image whose compiler stayed in the build stage
    assert build(PATH=str(tmp_path / "empty")) == (["built"], [])


# fails on one of the AVX-512 library's units, as a compiler that cannot take it would, and
# "compiles" the others at once into empty objects
FAILING_CXX = """#!/bin/sh
case "$*" in *nm_prepacked_avx512.cpp*) echo "nm_prepacked_avx512.cpp:1: error: no" >&2; exit 1;;
esac
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && : > "$2"; shift; done
"""


@needs_kernels
def test_a_unit_that_does_not_compile_fails_the_build_with_its_message(tmp_path, monkeypatch):
    wrapper = tmp_path / "cxx"
    wrapper.write_text(FAILING_CXX)
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv(cpu._build.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(cpu._build.BuildError) as error:
        cpu._build.load("avx512")
    assert str(error.value) == (f"compiling nm_prepacked_avx512.cpp with {wrapper} failed: "
                                "nm_prepacked_avx512.cpp:1: error: no")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["build.lock"]  # nothing left


@needs_kernels
def test_racing_processes_build_once_and_stale_builds_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    # what earlier versions left behind: another hash, the old name, dead builds' temporary
    # library and folder of objects
    old = [cache / "nm_linear_avx2-0123456789abcdef.so",
           cache / "nm_linear_cpu-0123456789abcdef.so",
           cache / "nm_linear_avx2-0123456789abcdef.abc.tmp.so",
           cache / "nm_linear_avx2-0123456789abcdef.def.tmp"]
    for path in old[:3]:
        path.write_bytes(b"old")
    old[3].mkdir()
    (old[3] / "nm_linear.o").write_bytes(b"old")
    for path in old[2:]:
        os.utime(path, (1, 1))
    # builds running right now
    fresh = cache / "nm_linear_avx2-fedcba9876543210.xyz.tmp.so"
    fresh.write_bytes(b"")
    fresh_folder = cache / "nm_linear_avx2-fedcba9876543210.uvw.tmp"
    fresh_folder.mkdir()
    other = cache / "nm_linear_avx512-0123456789abcdef.so"  # another library: not touched
    other.write_bytes(b"old")
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(COUNTING_CXX.format(log=log, cxx=cpu._build.compiler()))
    wrapper.chmod(0o755)
    env = clean_env(NMSPARSE_CACHE_DIR=str(cache), CXX=str(wrapper))
    runs = [subprocess.Popen([sys.executable, "-c", BUILD_CODE], env=env, text=True,
                             stdout=subprocess.PIPE) for _ in range(2)]
    assert [run.communicate(timeout=600)[0].strip() for run in runs] == ["built"] * 2
    assert log.read_text().count("x") == 1  # one compile: the second process waited, then loaded
    names = sorted(p.name for p in cache.iterdir())
    built = [n for n in names if n.startswith("nm_linear_avx2-") and n.endswith(".so")
             and ".tmp" not in n]
    assert len(built) == 1 and built[0] != old[0].name, names
    assert not any(path.exists() for path in old), names
    assert fresh.exists() and fresh_folder.exists() and other.exists()
    assert run_python(BUILD_CODE, env) == ["built"] and log.read_text().count("x") == 1


@needs_kernels
def test_swap_and_packed_file_run_on_the_kernels_and_compile(tmp_path):
    pytest.importorskip("safetensors")
    from nmsparse.export import load_packed, save_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(nm_mask(layer.weight, 2, 8))
    x = torch.randn(3, 64)
    dense = model(x)
    save_packed(model, tmp_path / "m.safetensors", "2:8")
    loaded = load_packed(tmp_path / "m.safetensors",
                         nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)))
    report = swap_linear_layers(loaded, "2:8")
    assert report.swapped == ["0", "2"] and isinstance(loaded[0], NMLinear)
    with torch.no_grad():
        eager = loaded(x)  # NMSPARSE_KERNELS=cpu: the CPU kernels or an error
        compiled = torch.compile(loaded, fullgraph=True)(x)
    torch.testing.assert_close(eager, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
