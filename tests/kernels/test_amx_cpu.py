"""The AMX kernel (nm_amx_avx512.h) and where the dispatch sends bf16 calls on a CPU with AMX.

The kernel has not run on AMX hardware where it was written. Its tiling (the panel of
expanded weight rows, x laid out in pair-interleaved tiles, up to four accumulators per pass,
the transposed store, every padding) is checked here in the ``amx_emulated`` build, whose six
tile operations are C++ following Intel's pseudo-code; the real build differs only in those.
Where the CPU has AMX, the same checks run on the real kernel too.

Tolerance as in test_prepared_cpu: within K * 2**-24 * S of the float64 product of the
bf16-rounded inputs (S = |x| @ |W|.T + |b|), one bf16 rounding more for bf16 output, while a
wrong position, a dropped value or a misplaced tile moves a result by about S / K or more.
"""

import subprocess
import sys
import warnings

import pytest
import torch

from nmsparse.engine.masks import nm_mask
from nmsparse.kernels import PreparedNMLinear, cpu
from nmsparse.kernels.cpu import prepacked
from nmsparse.packing import pack, unpack_rows

REASON = cpu.build_error() or cpu.isa_reason("avx512bf16")
needs_bf16_kernels = pytest.mark.skipif(REASON is not None, reason=f"needs AVX512_BF16: {REASON}")
# every M the kernel takes (a power of two up to 64), with N dividing 8 or not
PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (5, 8), (1, 16), (4, 16), (7, 16),
            (1, 32), (8, 32), (4, 64)]
# emulated everywhere the bf16 kernels run; the real kernel where the CPU has AMX and it runs
BUILDS = ["emulated"] + (["real"] if REASON is None and cpu.amx_reason() is None else [])


def nm_weight(out, inp, n, m, generator):
    weight = torch.randn(out, inp, generator=generator)
    return (weight * nm_mask(weight, n, m)).bfloat16()


def assert_exact(y, x, weight, bias, n, m):
    x64, w64 = x.bfloat16().double(), weight.double()
    b64 = None if bias is None else bias.double()
    exact = torch.nn.functional.linear(x64, w64, b64)
    scale = torch.nn.functional.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    allowed = (weight.shape[1] * n // m + 1) * 2.0**-24 * scale
    if y.dtype == torch.bfloat16:
        allowed = allowed + 2.0**-8 * (exact.abs() + allowed)
    assert y.shape == exact.shape and y.dtype == x.dtype
    assert bool(((y.double() - exact).abs() <= allowed).all()), float(
        ((y.double() - exact).abs() - allowed).max())


def skip_where_linux_refuses_the_tiles(reason):
    """On a CPU with AMX, Linux may refuse a process the tile state (a signal stack too small
    for it, a kernel without the request): the kernel then cannot run there, which is the
    environment's limit, not the kernel's fault; a wrong result or a fault in the self-check
    is the kernel's and fails."""
    if reason is not None and "did not grant" in reason:
        pytest.skip(f"this CPU has AMX, but {reason}")


@needs_bf16_kernels
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_amx_kernel_over_tiles_passes_and_padding(n, m, build):
    """Outputs 1, 16 and 37 (partial and whole blocks of 16); inputs that leave a partial
    chunk of 32 (and one below 32); rows 1, 16, 17, 64 and 130 (passes of 1-4 tiles of x, a
    partial last tile); bias or none; bf16 and fp32 x (rounded to bf16 by the kernel)."""
    generator = torch.Generator().manual_seed(100 * n + m)
    for out, groups in [(1, 1), (16, 3), (37, 200 // m + 1)]:
        inp = groups * m
        weight = nm_weight(out, inp, n, m, generator)
        packed = pack(weight, n, m)
        for batch in [1, 16, 17, 64, 130]:
            x = torch.randn(batch, inp, generator=generator)
            x = x.bfloat16() if batch % 2 == 0 else x
            bias = torch.randn(out, generator=generator) if batch != 16 else None
            y = cpu.amx_linear(x, packed.values, packed.indices, n, m, bias,
                               emulated=build == "emulated")
            assert_exact(y, x, weight, bias, n, m)


@needs_bf16_kernels
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (1, 16), (7, 16)])
def test_amx_kernel_from_the_prepared_layout(n, m, build):
    generator = torch.Generator().manual_seed(7 * n + m)
    for out, inp in [(16, 16 * 3), (37, 16 * 13)]:
        weight = nm_weight(out, inp, n, m, generator)
        packed = pack(weight, n, m)
        layout = prepacked.prepack(packed.values, packed.indices, n, m, inp)
        for batch in [1, 17, 80]:
            x = torch.randn(batch, inp, generator=generator).bfloat16()
            bias = torch.randn(out, generator=generator).bfloat16()
            y = prepacked.amx_prepacked(x, layout, n, m, inp, out, bias,
                                        emulated=build == "emulated")
            assert_exact(y, x, weight, bias, n, m)


@needs_bf16_kernels
@pytest.mark.parametrize("build", BUILDS)
def test_amx_kernel_on_two_threads(build):
    """A call large enough for two threads (threads_for): each takes its blocks of 16 outputs,
    and they lay x out together before either multiplies."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(21)
        out, inp, batch = 72, 1024, 20
        assert cpu.threads_for(batch, out * inp // 2) == 2
        weight = nm_weight(out, inp, 2, 4, generator)
        packed = pack(weight, 2, 4)
        layout = prepacked.prepack(packed.values, packed.indices, 2, 4, inp)
        x = torch.randn(batch, inp, generator=generator).bfloat16()
        bias = torch.randn(out, generator=generator)
        emulated = build == "emulated"
        y = cpu.amx_linear(x, packed.values, packed.indices, 2, 4, bias, emulated=emulated)
        assert_exact(y, x, weight, bias, 2, 4)
        assert torch.equal(prepacked.amx_prepacked(x, layout, 2, 4, inp, out, bias,
                                                   emulated=emulated), y)
    finally:
        torch.set_num_threads(previous)


@needs_bf16_kernels
def test_the_self_check_passes_in_the_emulated_build_and_is_run_in_a_child():
    """The check the dispatcher runs in a child process before using the real kernel: in the
    emulated build it passes on one and two threads (exact small integers: equality)."""
    emulated = cpu.library("amx_emulated")
    assert emulated.nmsparse_amx_emulated() == 1
    assert cpu.library("avx512").nmsparse_amx_emulated() == 0
    assert emulated.nmsparse_amx_selftest(1) == 0 and emulated.nmsparse_amx_selftest(2) == 0
    done = subprocess.run([sys.executable, "-c", cpu.AMX_SELFTEST, emulated._name, "2"],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr


@needs_bf16_kernels
def test_the_real_kernel_runs_only_where_the_cpu_has_amx(monkeypatch):
    """Without AMX the real kernel refuses with the reason and nothing faults; with AMX its
    self-check must have passed (a failure there is a bug in the kernel, shown here)."""
    monkeypatch.delenv(cpu.ENV_AMX, raising=False)
    monkeypatch.delitem(cpu._library._STATE, "amx_reason", raising=False)
    packed = pack(nm_weight(16, 64, 2, 4, torch.Generator().manual_seed(1)), 2, 4)
    x = torch.randn(16, 64).bfloat16()
    if "amx" in cpu.features():
        skip_where_linux_refuses_the_tiles(cpu.amx_reason())
        assert cpu.amx_reason() is None
        assert_exact(cpu.amx_linear(x, packed.values, packed.indices, 2, 4), x,
                     unpack_rows(packed.values, packed.indices, 2, 4), None, 2, 4)
    else:
        assert cpu.amx_reason() == "this CPU has no AMX-BF16"
        with pytest.raises(ValueError, match="no AMX-BF16"):
            cpu.amx_linear(x, packed.values, packed.indices, 2, 4)
    monkeypatch.setenv(cpu.ENV_AMX, "0")
    monkeypatch.delitem(cpu._library._STATE, "amx_reason")
    assert cpu.amx_reason() == f"{cpu.ENV_AMX}=0"
    with pytest.raises(ValueError, match="takes bf16 weights with M a power of two"):
        cpu.amx_linear(x.float(), packed.values.float(), packed.indices, 2, 4)


@needs_bf16_kernels
def test_a_cpu_reporting_amx_whose_kernel_cannot_run_warns_once_and_falls_back(monkeypatch):
    """A CPU that reports AMX where the tile state is refused (here: one without AMX, made to
    report it) runs the self-check in a child, warns once with the reason, and keeps the
    exact AVX-512 kernels and dense path. On a real AMX CPU the check passes, silently."""
    monkeypatch.delenv(cpu.ENV_AMX, raising=False)
    has_amx = "amx" in cpu.features()
    monkeypatch.setitem(cpu._library._STATE, "features", cpu.features() | {"amx"})
    monkeypatch.delitem(cpu._library._STATE, "amx_reason", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = cpu.amx_reason()
        assert cpu.amx_reason() == reason  # kept: no second check, no second warning
    if has_amx:
        skip_where_linux_refuses_the_tiles(reason)
        assert reason is None and not caught
        return
    assert reason == "Linux did not grant the AMX tile state to a child process"
    assert len(caught) == 1
    assert "the AMX kernel is not used: Linux did not" in str(caught[0].message)
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, cpu.AMX_ROWS, 2, 4) != "amx"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, cpu.AMX_DENSE_ROWS, 2, 4) == "dense"
    assert prepacked.kernel_for(cpu.AMX_ROWS) == "lanes"
    generator = torch.Generator().manual_seed(3)
    weight = nm_weight(40, 64, 2, 4, generator)
    layer = PreparedNMLinear(pack(weight, 2, 4))
    x = torch.randn(cpu.AMX_DENSE_ROWS, 64, generator=generator).bfloat16()
    with torch.no_grad():
        assert_exact(layer(x), x, weight, None, 2, 4)


def test_where_the_amx_kernel_runs_bf16_calls_from_amx_rows_take_it(monkeypatch):
    """The dispatch alone (nothing is run): with AMX and a kernel that runs, bf16 weights of
    any pattern it takes go to it from AMX_ROWS rows, plain and prepared; fp32 weights, fewer
    rows and other patterns keep the measured table."""
    monkeypatch.setitem(cpu._library._STATE, "features",
                        frozenset({"avx2", "avx512", "avx512bf16", "amx"}))
    monkeypatch.setitem(cpu._library._STATE, "amx_reason", None)
    rows = cpu.AMX_ROWS
    for n, m in PATTERNS:
        assert cpu.kernel_for("avx512bf16", torch.bfloat16, rows, n, m) == "amx"
        assert cpu.kernel_for("avx512bf16", torch.bfloat16, 512, n, m) == "amx"
        assert cpu.kernel_for("avx512bf16", torch.bfloat16, rows - 1, n, m) != "amx"
        assert cpu.kernel_for("avx512bf16", torch.float32, rows, n, m) != "amx"
        assert cpu.kernel_for("avx512", torch.bfloat16, rows, n, m) != "amx"
    for n, m in [(1, 3), (2, 6), (1, 128), (2, 24)]:  # M not a power of two up to 64
        assert not cpu.kernel_takes("amx", n, m)
        assert cpu.kernel_for("avx512bf16", torch.bfloat16, cpu.AMX_DENSE_ROWS, n, m) == "dense"
    assert [prepacked.kernel_for(r) for r in (1, rows - 1, rows, 512)] == [
        "lanes", "lanes", "amx", "amx"]


def test_the_amx_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(cpu.ENV_AMX, "0")
    monkeypatch.delitem(cpu._library._STATE, "amx_reason", raising=False)
    monkeypatch.setitem(cpu._library._STATE, "features",
                        frozenset({"avx2", "avx512", "avx512bf16", "amx"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turned off on purpose: no warning
        assert cpu.amx_reason() == f"{cpu.ENV_AMX}=0"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, cpu.AMX_ROWS, 2, 4) != "amx"
