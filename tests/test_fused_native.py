"""The native C++ mask pass (nmsparse.kernels.cpu.mask_pass) through nmsparse.engine.fused:
bit-identical to the eager path for every group size, layout, dtype and edge case, on each
instruction set this CPU runs (NMSPARSE_CPU_ISA forces one), and used by default for CPU
weights without compiling anything. (Training on it: tests/test_fused.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from nmsparse.engine import fused as fused_path
from nmsparse.kernels.cpu import ENV_ISA, mask_pass
from nmsparse.patterns import NM

CAPABILITY = torch.backends.cpu.get_cpu_capability()
ISAS = [isa for isa, ok in (("avx2", CAPABILITY.startswith(("AVX2", "AVX512"))),
                             ("avx512", CAPABILITY.startswith("AVX512"))) if ok]
needs_native = pytest.mark.skipif(not ISAS or mask_pass.reason() is not None,
                                  reason=f"no native mask pass here: {mask_pass.reason()}")
# Linear, an odd row count, conv "in" (stride 9 and 49), conv1d "flat", a size that is not a
# multiple of 16 (a tail), and one long enough for several threads' parts.
SHAPES = [(48, 64), (33, 112), (40, 32, 3, 3), (6, 48, 7, 7), (16, 48, 3), (7, 48),
          (128, 512)]
PATTERNS = [NM(2, 4), NM(1, 4), NM(3, 8), NM(4, 16), NM(2, 6), NM(1, 2)]


def weight_of(shape, kind: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values, signed zeros: many equal |w| inside a group
        return torch.randint(-2, 3, shape, generator=generator).to(dtype)
    weight = torch.randn(shape, generator=generator).to(dtype)
    if kind == "nonfinite":
        flat = weight.view(-1)
        flat[0], flat[7], flat[-1] = float("nan"), float("inf"), float("-inf")
        flat[flat.numel() // 2] = -0.0
    return weight


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.element_size() == 4 else torch.int16)


def run(weight, pattern, native: bool, recompute=True, mask=None):
    fused_path.set_compile(False)
    fused_path.set_native(native)
    try:
        weight = weight.clone()
        mask = torch.zeros(weight.shape, dtype=torch.bool) if mask is None else mask.clone()
        masked = torch.empty_like(weight)
        finite = fused_path.refresh_(weight, mask, masked, pattern, recompute)
        return weight, mask, masked, bool(finite)
    finally:
        fused_path.set_compile(None)
        fused_path.set_native(None)


def decayed(grad, weight, mask, native: bool) -> torch.Tensor:
    fused_path.set_compile(False)
    fused_path.set_native(native)
    try:
        grad = grad.clone()
        fused_path.add_decay_(grad, weight, mask, 1e-2)
        return grad
    finally:
        fused_path.set_compile(None)
        fused_path.set_native(None)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a), bits(b))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_native_pass_is_bit_identical_to_eager(dtype, pattern, monkeypatch):
    for layout in ("in", "flat"):
        grouped = NM(pattern.n, pattern.m, layout)
        for shape in SHAPES:
            size = shape[1] if layout == "in" else torch.Size(shape[1:]).numel()
            if size % pattern.m:
                continue
            for kind in ("normal", "ties", "nonfinite"):
                weight = weight_of(shape, kind, dtype)
                other = weight_of(shape, kind, dtype, seed=1)
                grad = weight_of(shape, "normal", dtype, seed=2)
                eager = run(weight, grouped, False)
                kept = eager[1]
                assert eager[3] == (kind != "nonfinite")
                fixed_eager = run(other, grouped, False, recompute=False, mask=kept)
                decay_eager = decayed(grad, weight, kept, False)
                for isa in ISAS:
                    monkeypatch.setenv(ENV_ISA, isa)
                    where = (isa, layout, shape, kind)
                    native = run(weight, grouped, True)
                    assert torch.equal(native[1], eager[1]), where  # the mask
                    assert same(native[2], eager[2]), where  # the masked weight, NaN bits too
                    assert native[3] == eager[3], where
                    fixed = run(other, grouped, True, recompute=False, mask=kept)
                    assert same(fixed[0], fixed_eager[0]), where
                    assert same(fixed[2], fixed_eager[2]) and fixed[3] == fixed_eager[3], where
                    assert same(decayed(grad, weight, kept, True), decay_eager), where


@needs_native
def test_the_native_pass_runs_by_default_and_compiles_nothing(monkeypatch):
    def no_compiling(*args):
        raise AssertionError("the compiled path was asked")

    monkeypatch.delenv(fused_path.ENV_VAR, raising=False)
    monkeypatch.delenv(fused_path.NATIVE_ENV_VAR, raising=False)
    monkeypatch.setattr(fused_path, "_kernel", no_compiling)
    calls = []
    real = mask_pass.refresh
    monkeypatch.setattr(mask_pass, "refresh", lambda *a: calls.append(1) or real(*a))
    weight = weight_of((512, fused_path.COMPILE_MIN_NUMEL // 512), "normal", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, mask, masked, finite = run(weight, NM(2, 4), None)
    assert calls == [1] and finite and fused_path.status()["native"] is None
    assert torch.equal(mask, NM(2, 4).mask(weight.abs()))
    monkeypatch.setenv(fused_path.NATIVE_ENV_VAR, "0")
    assert "turned off" in fused_path.status()["native"]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", [3, 16, 100])  # the scalar tail and the vector loop
def test_the_srste_term_is_one_fused_multiply_add_like_eager(isa, size, monkeypatch):
    # w * decay = 1 + 2^-11 + 2^-24 is a tie in float32: rounded first, then added to -1 it
    # gives 2^-11; rounded once after the addition (eager's fused multiply-add) 2^-11 + 2^-24.
    monkeypatch.setenv(ENV_ISA, isa)
    factor = 1 + 2 ** -12
    weight, grad = torch.full((size,), factor), torch.full((size,), -1.0)
    mask = torch.zeros(size, dtype=torch.bool)
    for native in (True, False):
        fused_path.set_native(native)
        try:
            result = grad.clone()
            fused_path.add_decay_(result, weight, mask, factor)
        finally:
            fused_path.set_native(None)
        assert torch.equal(result, torch.full((size,), 2 ** -11 + 2 ** -24)), native


@needs_native
def test_native_writes_bump_version_counters_like_torch_in_place_ops():
    """Autograd must see the writes: a masked weight saved for backward and then rebuilt
    makes backward raise, as with the eager path."""
    weight = weight_of((16, 64), "normal", torch.float32)
    mask, masked = torch.zeros(weight.shape, dtype=torch.bool), torch.empty_like(weight)
    grad = torch.zeros_like(weight)
    before = [t._version for t in (weight, mask, masked, grad)]
    fused_path.refresh_(weight, mask, masked, NM(2, 4), True)
    fused_path.refresh_(weight, mask, masked, NM(2, 4), False)
    fused_path.add_decay_(grad, weight, mask, 1e-2)
    after = [t._version for t in (weight, mask, masked, grad)]
    assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)
    x = torch.randn(3, 16, requires_grad=True)
    y = (x @ masked).sum()  # saves masked for x's gradient
    fused_path.refresh_(weight, mask, masked, NM(2, 4), True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
