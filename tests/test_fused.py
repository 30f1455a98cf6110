"""Tests for nmsparse.engine.fused: the compiled kernels reproduce the eager path bit for bit.

Compiling is slow (about 10 s for inductor's first use in a process, then 5-20 s per mask
kernel and ~1 s for each small one), so the shape and edge-case tests use 2:4 on float32;
``test_every_group_size_and_dtype`` compiles the mask, fixed-mask and decay kernels for
every M in {4, 8, 16} and float32/bfloat16 (about two minutes on 2 cores).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.engine import fused as fused_path
from nmsparse.kernels.cpu import mask_pass as native_pass
from nmsparse.patterns import NM

P24 = NM(2, 4)
# 2-D (Linear, groups contiguous), 4-D conv (layout "in": stride 9), 3-D conv1d, and a row
# count that is not a multiple of the kernel's row length.
SHAPES = [(48, 64), (33, 112), (40, 32, 3, 3), (16, 48, 3)]


@pytest.fixture
def compiled():
    fused_path.set_compile(True)
    yield
    fused_path.set_compile(None)
    fused_path.set_native(None)


def eager_only():
    """The eager reference: neither the compiled nor the native path."""
    fused_path.set_compile(False)
    fused_path.set_native(False)


def weights(shape, kind: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: many equal |w| inside a group
        return torch.randint(-2, 3, shape, generator=generator).float()
    return torch.randn(shape, generator=generator)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)  # bit for bit: -0.0 differs from 0.0


def compute_mask(weight: torch.Tensor, pattern: NM, layout: str) -> torch.Tensor:
    """The eager reference: the pattern applied to |w|."""
    return NM(pattern.n, pattern.m, layout).mask(weight.abs())


def refresh(weight: torch.Tensor, layout: str, recompute: bool = True,
            mask: torch.Tensor | None = None, pattern: NM = P24):
    weight = weight.clone()
    mask = torch.zeros(weight.shape, dtype=torch.bool) if mask is None else mask.clone()
    masked = torch.empty_like(weight)
    nm = NM(pattern.n, pattern.m, layout)
    finite = fused_path.refresh_(weight, mask, masked, nm, recompute)
    return weight, mask, masked, bool(finite)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("layout", ["in", "flat"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_refresh_is_bit_identical(compiled, shape, layout, kind):
    weight = weights(shape, kind)
    _, mask, masked, finite = refresh(weight, layout)
    assert torch.equal(mask, compute_mask(weight, P24, layout))
    assert torch.equal(bits(masked), bits(torch.where(mask, weight, torch.zeros(()))))
    assert finite


def _eager(fn):
    eager_only()
    try:
        return fn()
    finally:
        fused_path.set_compile(True)
        fused_path.set_native(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(3, 8), NM(1, 8), NM(4, 16),
                                     NM(1, 16)], ids=str)
def test_every_group_size_and_dtype(compiled, pattern, dtype):
    """Mask, masked weight, fixed-mask refresh and SR-STE term: compiled == eager, bit for
    bit (the decay term within one rounding step), conv and linear, with ties and a NaN."""
    for shape, layout in (((64, 96), "in"), ((24, 32, 3, 3), "in"), ((16, 48, 3), "flat")):
        weight = weights(shape, "ties").to(dtype)
        fused = refresh(weight, layout, pattern=pattern)
        eager = _eager(lambda w=weight, lay=layout: refresh(w, lay, pattern=pattern))
        assert torch.equal(fused[1], eager[1]), (shape, layout)
        assert torch.equal(fused[1], compute_mask(weight, pattern, layout))
        assert torch.equal(fused[2].view(torch.int16 if dtype != torch.float32 else torch.int32),
                           eager[2].view(torch.int16 if dtype != torch.float32 else torch.int32))
        kept = fused[1]
        fixed = refresh(weights(shape, "normal").to(dtype), layout, recompute=False, mask=kept,
                        pattern=pattern)
        fixed_eager = _eager(lambda s=shape, lay=layout, k=kept: refresh(
            weights(s, "normal").to(dtype), lay, recompute=False, mask=k, pattern=pattern))
        assert torch.equal(fixed[0], fixed_eager[0]) and torch.equal(fixed[2], fixed_eager[2])
        grad = weights(shape, "normal", seed=2).to(dtype)
        decayed, decayed_eager = grad.clone(), grad.clone()
        fused_path.add_decay_(decayed, weight, kept.contiguous(), 1e-2)
        _eager(lambda d=decayed_eager, w=weight, k=kept: fused_path.add_decay_(d, w, k.contiguous(),
                                                                             1e-2))
        torch.testing.assert_close(decayed, decayed_eager, rtol=torch.finfo(dtype).eps, atol=0)
        assert torch.equal(decayed[kept], grad[kept])
    nan_weight = weights((64, 96), "normal").to(dtype)
    nan_weight[5, 7] = float("nan")
    fused = refresh(nan_weight, "in", pattern=pattern)
    eager = _eager(lambda: refresh(nan_weight, "in", pattern=pattern))
    assert not fused[3] and not eager[3] and torch.equal(fused[1], eager[1])


@pytest.mark.parametrize("position", [0, 7, -1], ids=["first", "inner", "last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_compiled_finite_flag_and_nonfinite_masks(compiled, value, position):
    weight = weights((40, 32, 3, 3), "normal")
    weight.view(-1)[position] = value
    _, mask, masked, finite = refresh(weight, "in")
    assert not finite
    assert torch.equal(mask, compute_mask(weight, P24, "in"))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_fixed_mask_refresh_matches_eager(compiled, shape):
    weight = weights(shape, "ties")
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    fused = refresh(weight, "in", recompute=False, mask=mask)
    eager_only()
    eager = refresh(weight, "in", recompute=False, mask=mask)
    assert torch.equal(bits(fused[0]), bits(eager[0]))  # pruned weights zeroed
    assert torch.equal(bits(fused[2]), bits(eager[2]))
    assert fused[3] == eager[3]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_add_decay_matches_eager(compiled, shape):
    weight = weights(shape, "normal")
    mask = compute_mask(weight, P24, "in").contiguous()
    grad = weights(shape, "normal", seed=2)
    fused, eager = grad.clone(), grad.clone()
    fused_path.add_decay_(fused, weight, mask, 2e-4)
    eager_only()
    fused_path.add_decay_(eager, weight, mask, 2e-4)
    # Eager CPU uses a fused multiply-add; the kernel computes exactly in float64 and rounds
    # once, so they agree unless double rounding hits a tie: allow one rounding step.
    torch.testing.assert_close(fused, eager, rtol=torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(fused[mask], grad[mask])  # kept weights get no decay


def test_new_layer_shapes_do_not_recompile(compiled):
    for shape in SHAPES[:1]:  # warm: the kernels exist after this
        _, mask, _, _ = refresh(weights(shape, "normal"), "in")
        fused_path.add_decay_(torch.zeros(shape), weights(shape, "normal"), mask, 1e-3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for shape in [(64, 96), (128, 32), (96, 64), (24, 64, 5, 5)]:
        _, mask, _, _ = refresh(weights(shape, "normal"), "in")
        fused_path.add_decay_(torch.zeros(shape), weights(shape, "normal"), mask.contiguous(),
                          1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# (set_compile, set_native) of each path
PATHS = {"compiled": (True, None), "native": (None, True), "eager": (False, False)}


def train_srste(path: str) -> dict:
    """The state after 4 SR-STE steps of a small Linear + conv model on one mask path."""
    fused_path.set_compile(PATHS[path][0])
    fused_path.set_native(PATHS[path][1])
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Unflatten(1, (4, 32)),
                              nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30, 64))
        nmsparse.sparsify(model, "2:4", method="srste", decay=1e-2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
        for _ in range(4):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()
        return model.state_dict()
    finally:
        fused_path.set_compile(None)
        fused_path.set_native(None)


@pytest.mark.parametrize("path", ["compiled", "native"])
def test_training_on_a_fused_path_matches_eager(path):
    if path == "native" and native_pass.reason() is not None:
        pytest.skip(f"no native mask pass here: {native_pass.reason()}")
    fused, eager = train_srste(path), train_srste("eager")
    for name, value in eager.items():
        if value.dtype == torch.bool or path == "native":  # native: bit for bit
            assert torch.equal(fused[name].view(torch.uint8), value.view(torch.uint8)), name
        else:  # the compiled SR-STE term may differ by one rounding step
            torch.testing.assert_close(fused[name], value, rtol=1e-6, atol=1e-7)


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused_path, "_kernel", broken)
    monkeypatch.setattr(fused_path, "_broken", False)
    fused_path.set_compile(True)
    try:
        weight = weights((48, 64), "ties")
        with pytest.warns(RuntimeWarning, match="eager path"):
            _, mask, masked, finite = refresh(weight, "in")
        assert torch.equal(mask, compute_mask(weight, P24, "in"))
        assert finite
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            refresh(weight, "in")
            fused_path.add_decay_(torch.zeros(48, 64), weight, mask, 1e-3)
    finally:
        fused_path.set_compile(None)


@pytest.mark.parametrize(("variable", "setter", "mode", "unset"), [
    (fused_path.ENV_VAR, fused_path.set_compile, fused_path.compile_mode, None),
    (fused_path.NATIVE_ENV_VAR, fused_path.set_native, fused_path.native_mode, True)],
    ids=["compile", "native"])
def test_path_switches_from_environment_and_setter(variable, setter, mode, unset, monkeypatch):
    monkeypatch.setenv(variable, "0")
    assert mode() is False
    monkeypatch.setenv(variable, "1")
    assert mode() is True
    monkeypatch.delenv(variable)
    assert mode() is unset
    setter(False)
    try:
        assert mode() is False
    finally:
        setter(None)
    with pytest.raises(ValueError, match="takes True, False or None"):
        setter("yes")


def test_automatic_mode_compiles_only_large_cpu_weights(monkeypatch):
    calls = []

    def recording(kind, *args):
        calls.append(kind)
        raise RuntimeError("stop here")

    monkeypatch.delenv(fused_path.ENV_VAR, raising=False)
    monkeypatch.setenv(fused_path.NATIVE_ENV_VAR, "0")  # else the native path takes CPU weights
    monkeypatch.setattr(fused_path, "_kernel", recording)
    monkeypatch.setattr(fused_path, "_broken", False)
    refresh(weights((64, 64), "normal"), "in")  # small: eager, no compile attempt
    assert calls == []
    with pytest.warns(RuntimeWarning):
        refresh(weights((512, fused_path.COMPILE_MIN_NUMEL // 512), "normal"), "in")
    assert calls == ["refresh"]
