"""Gradual N:M: the kept-count schedule, one exact SGD step in a stage, the final mask, errors."""

from __future__ import annotations

import pytest
import torch
from linear_step import LR, grad_of_forward_weight, layer, snapshot, step
from torch import nn

import nmsparse
from nmsparse.methods import Gradual


def top_k_per_row(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: keep the k largest |w| of each row (one group of 8 per row here)."""
    order = weight.abs().argsort(dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, True)


def test_schedule_of_kept_counts():
    default = Gradual(steps=6)
    assert default.stages(2, 8) == (8, 4) and default.stages(1, 16) == (16, 8, 4, 2)
    assert [default.kept(k, 2, 8) for k in range(8)] == [8, 8, 8, 4, 4, 4, 2, 2]
    explicit = Gradual(steps=4, counts=[8, 6, 2])  # counts at or below N are dropped
    assert [explicit.kept(k, 2, 8) for k in range(5)] == [8, 8, 6, 6, 2]


def test_one_sgd_step_in_each_stage_is_exact():
    decay = 0.05
    method = Gradual(steps=4, counts=[8, 4], inner="srste", inner_options={"decay": decay})
    model, w, x, u = layer("2:8", method)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = grad_of_forward_weight(x, u)
    for kept in (8, 8, 4, 4, 2):
        before, mask = snapshot(w)
        y = step(model, opt, x, u)
        forward = before * top_k_per_row(before, kept)
        torch.testing.assert_close(y, x @ forward.t(), rtol=0, atol=1e-6)
        # SR-STE inside: straight-through gradient plus the term on the layer's 2:8-pruned
        assert torch.equal(mask, top_k_per_row(before, 2))
        expected = before - LR * (g + decay * (~mask).float() * before)
        torch.testing.assert_close(w.dense.detach(), expected, rtol=0, atol=1e-6)
        assert nmsparse.parse_pattern("2:8").complies(w.mask)


def test_evaluation_uses_the_layers_pattern_and_decaying_inside_works():
    method = Gradual(steps=10, inner="decaying", inner_options={"steps": 10})
    model, w, x, u = layer("1:4", method)
    model.eval()
    torch.testing.assert_close(model(x), x @ w.masked.t(), rtol=0, atol=0)
    model.train()
    w0, _ = snapshot(w)
    torch.testing.assert_close(model(x), x @ w0.t(), rtol=0, atol=1e-6)  # 4 of 4 kept


def test_transposable_layers_follow_the_schedule():
    model, w, x, u = layer("transposable:1:4", Gradual(steps=2, counts=[2]), out=8)
    w0, _ = snapshot(w)
    expected = w0 * nmsparse.parse_pattern("transposable:2:4").mask(w0.abs())
    torch.testing.assert_close(model(x), x @ expected.t(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"inner": "fixed"}, "inner must be one of 'srste', 'ste', 'decaying'"),
    ({"counts": [4, 8]}, "counts must not increase"),
    ({"counts": "8,4"}, "counts must be a list"),
    ({"inner_options": {"rate": 1}}, "method 'srste' takes no rate"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        nmsparse.make_method("gradual", **options)


def test_a_pattern_without_n_and_m_is_refused():
    with pytest.raises(ValueError, match="'gradual' needs a pattern with N and M"):
        nmsparse.sparsify(nn.Sequential(nn.Linear(8, 4)), "unstructured:0.5", "gradual")
