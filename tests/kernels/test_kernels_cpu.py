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

Every test needs the kernels; on a machine where they cannot be built (no AVX2 or no
compiler) only the fallback tests run and the others are skipped with the reason.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.kernels import NMLinear, _op, cpu, nm_linear, swap_linear_layers
from nmsparse.masks import nm_mask
from nmsparse.packing import pack, unpack_rows

PATTERNS = [(2, 4), (4, 8), (1, 4), (2, 8), (1, 8), (1, 16)]
DTYPES = [torch.float32, torch.bfloat16]
BUILD_ERROR = cpu.build_error()
needs_kernels = pytest.mark.skipif(BUILD_ERROR is not None,
                                   reason=f"CPU kernels unavailable: {BUILD_ERROR}")


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


@needs_kernels
@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_kernels_match_linear_over_shapes_and_batches(n, m, dtype):
    generator = torch.Generator().manual_seed(1000 * n + m)
    # odd output counts; group counts that leave tails after the 8- and 16-value steps
    for out, groups in [(1, 1), (7, 3), (37, 13), (64, 32), (19, 70)]:
        inp = groups * m
        weight = nm_weight(out, inp, n, m, dtype, generator)
        packed = pack(weight, n, m)
        for batch in [1, 2, 3, 8, 9, 17, 33, 64, 65]:
            x = torch.randn(batch, inp, generator=generator).to(dtype)
            bias = torch.randn(out, generator=generator).to(dtype) if batch % 2 else None
            y = nm_linear(x, packed.values, packed.indices, n, m, bias)
            assert_close_to_linear(y, x, packed.values, packed.indices, n, m, bias)


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
def test_kernels_detect_a_wrong_position():
    """The tolerance is tight enough to see one moved weight (so the tests above can fail)."""
    generator = torch.Generator().manual_seed(3)
    packed = pack(nm_weight(16, 256, 2, 4, torch.float32, generator), 2, 4)
    x = torch.randn(3, 256, generator=generator)
    broken = packed.indices.clone()
    broken[5, 9] ^= 0b01  # one stored position points elsewhere
    y = nm_linear(x, packed.values, broken, 2, 4)
    with pytest.raises(AssertionError):
        assert_close_to_linear(y, x, packed.values, packed.indices, 2, 4, None)


@needs_kernels
def test_backend_cpu_refuses_what_it_cannot_run():
    packed = pack(nm_weight(8, 32, 3, 16, torch.float32, torch.Generator()), 3, 16)
    with pytest.raises(ValueError, match="CPU kernels cannot run: pattern 3:16"):
        nm_linear(torch.randn(2, 32), packed.values, packed.indices, 3, 16)
    packed = pack(nm_weight(8, 32, 2, 4, torch.float16, torch.Generator()), 2, 4)
    with pytest.raises(ValueError, match="dtype torch.float16"):
        nm_linear(torch.randn(2, 32).half(), packed.values, packed.indices, 2, 4)


@needs_kernels
def test_auto_uses_the_kernels_on_cpu_and_falls_back_where_they_cannot_run(monkeypatch):
    calls = []
    real = cpu.nm_linear_cpu
    monkeypatch.setattr(cpu, "nm_linear_cpu", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setenv("NMSPARSE_KERNELS", "auto")
    packed = pack(nm_weight(8, 32, 2, 4, torch.float32, torch.Generator()), 2, 4)
    nm_linear(torch.randn(2, 32), packed.values, packed.indices, 2, 4)
    assert calls == [1]
    packed = pack(nm_weight(8, 32, 3, 16, torch.float32, torch.Generator()), 3, 16)
    x = torch.randn(2, 32)
    y = nm_linear(x, packed.values, packed.indices, 3, 16)  # unsupported pattern: exact fallback
    assert calls == [1]
    assert torch.equal(y, F.linear(x, unpack_rows(packed.values, packed.indices, 3, 16)))


def test_fallback_when_the_kernels_cannot_build_warns_once_and_is_exact(monkeypatch):
    monkeypatch.setenv("NMSPARSE_KERNELS", "auto")
    monkeypatch.setattr(cpu, "_STATE", {})
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


def test_build_without_a_compiler_says_why_and_builds_are_cached(tmp_path):
    env = {**os.environ, "NMSPARSE_CACHE_DIR": str(tmp_path), "PATH": str(tmp_path)}
    env.pop("CXX", None)
    done = subprocess.run([sys.executable, "-c", BUILD_CODE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if BUILD_ERROR is None:
        assert done.stdout.strip() == "error: no C++ compiler found (set CXX, or install g++)"
        # with a compiler: two processes building into one empty cache at once both load it
        env["PATH"] = os.environ["PATH"]
        runs = [subprocess.Popen([sys.executable, "-c", BUILD_CODE], env=env, text=True,
                                 stdout=subprocess.PIPE) for _ in range(2)]
        assert [run.communicate(timeout=300)[0].strip() for run in runs] == ["built"] * 2
        names = [p.name for p in tmp_path.iterdir()]
        assert len(names) == 1 and ".tmp" not in names[0], names  # no temporary file left


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
