"""Tests for nmsparse._fused: the compiled kernels reproduce the eager path bit for bit.

Compiling is slow (about 10 s for inductor's first use in a process, then ~5 s for the mask
kernel and ~1 s for each small one), so every test here uses one configuration only: 2:4 on
float32 weights (its refresh, fixed-mask and decay kernels). The full matrix of patterns and
dtypes is ``python benchmarks/overhead.py --check``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import _fused
from nmsparse.masks import compute_mask
from nmsparse.patterns import NM

P24 = NM(2, 4)
# 2-D (Linear, groups contiguous), 4-D conv (layout "in": stride 9), 3-D conv1d, and a row
# count that is not a multiple of the kernel's row length.
SHAPES = [(48, 64), (33, 112), (40, 32, 3, 3), (16, 48, 3)]


@pytest.fixture
def compiled():
    _fused.set_compile(True)
    yield
    _fused.set_compile(None)


def weights(shape, kind: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: many equal |w| inside a group
        return torch.randint(-2, 3, shape, generator=generator).float()
    return torch.randn(shape, generator=generator)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)  # bit for bit: -0.0 differs from 0.0


def refresh(weight: torch.Tensor, layout: str, recompute: bool = True,
            mask: torch.Tensor | None = None):
    weight = weight.clone()
    mask = torch.zeros(weight.shape, dtype=torch.bool) if mask is None else mask.clone()
    masked = torch.empty_like(weight)
    finite = _fused.refresh_(weight, mask, masked, P24, layout, recompute)
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
    _fused.set_compile(False)
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
    _fused.add_decay_(fused, weight, mask, 2e-4)
    _fused.set_compile(False)
    _fused.add_decay_(eager, weight, mask, 2e-4)
    # Eager CPU uses a fused multiply-add; the kernel computes exactly in float64 and rounds
    # once, so they agree unless double rounding hits a tie: allow one rounding step.
    torch.testing.assert_close(fused, eager, rtol=torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(fused[mask], grad[mask])  # kept weights get no decay


def test_new_layer_shapes_do_not_recompile(compiled):
    for shape in SHAPES[:1]:  # warm: the kernels exist after this
        _, mask, _, _ = refresh(weights(shape, "normal"), "in")
        _fused.add_decay_(torch.zeros(shape), weights(shape, "normal"), mask, 1e-3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for shape in [(64, 96), (128, 32), (96, 64), (24, 64, 5, 5)]:
        _, mask, _, _ = refresh(weights(shape, "normal"), "in")
        _fused.add_decay_(torch.zeros(shape), weights(shape, "normal"), mask.contiguous(),
                          1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_training_with_compiled_kernels_matches_eager():
    def train(compile_on: bool):
        _fused.set_compile(compile_on)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        nmsparse.sparsify(model, "2:4", method="srste", decay=1e-2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
        for _ in range(4):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()
        return model.state_dict()

    try:
        fused, eager = train(True), train(False)
    finally:
        _fused.set_compile(None)
    for name, value in eager.items():
        if value.dtype == torch.bool:
            assert torch.equal(fused[name], value), name
        else:
            torch.testing.assert_close(fused[name], value, rtol=1e-6, atol=1e-7)


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_fused, "_kernel", broken)
    monkeypatch.setattr(_fused, "_broken", False)
    _fused.set_compile(True)
    try:
        weight = weights((48, 64), "ties")
        with pytest.warns(RuntimeWarning, match="eager path"):
            _, mask, masked, finite = refresh(weight, "in")
        assert torch.equal(mask, compute_mask(weight, P24, "in"))
        assert finite
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            refresh(weight, "in")
            _fused.add_decay_(torch.zeros(48, 64), weight, mask, 1e-3)
    finally:
        _fused.set_compile(None)


def test_compile_mode_from_environment_and_setter(monkeypatch):
    monkeypatch.setenv(_fused.ENV_VAR, "0")
    assert _fused.compile_mode() is False
    monkeypatch.setenv(_fused.ENV_VAR, "1")
    assert _fused.compile_mode() is True
    monkeypatch.delenv(_fused.ENV_VAR)
    assert _fused.compile_mode() is None
    _fused.set_compile(False)
    try:
        assert _fused.compile_mode() is False
    finally:
        _fused.set_compile(None)
    with pytest.raises(ValueError):
        _fused.set_compile("yes")


def test_automatic_mode_compiles_only_large_cpu_weights(monkeypatch):
    calls = []

    def recording(kind, *args):
        calls.append(kind)
        raise RuntimeError("stop here")

    monkeypatch.delenv(_fused.ENV_VAR, raising=False)
    monkeypatch.setattr(_fused, "_kernel", recording)
    monkeypatch.setattr(_fused, "_broken", False)
    refresh(weights((64, 64), "normal"), "in")  # small: eager, no compile attempt
    assert calls == []
    with pytest.warns(RuntimeWarning):
        refresh(weights((512, _fused.COMPILE_MIN_NUMEL // 512), "normal"), "in")
    assert calls == ["refresh"]
