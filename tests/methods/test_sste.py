"""S-STE: the soft threshold and the frozen scale by hand, one exact SGD step, finalize."""

from __future__ import annotations

import pytest
import torch
from linear_step import LR, grad_of_forward_weight, layer, snapshot, step
from torch import nn

import nmsparse
from nmsparse.methods.sste import SCALE, fitted_scale, soft_threshold


def test_soft_threshold_and_scale_by_hand():
    weight = torch.tensor([[4.0, -3.0, 1.0, 0.5, -0.25, 2.0, -2.0, 1.0]])
    # groups [4, -3, 1, .5] and [-.25, 2, -2, 1] (2:4): both thresholds 1 (3rd largest |w|)
    soft = soft_threshold(weight, 2, 4, "in")
    assert soft.tolist() == [[3.0, -2.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0]]
    # least squares: <W, S> / <S, S> = (12 + 6 + 2 + 2) / (9 + 4 + 1 + 1)
    assert fitted_scale(weight, soft) == pytest.approx(22 / 15, rel=1e-12)


def reference(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Loop reference of scale * S(W) for a 2:4 Linear weight."""
    out = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        for start in range(0, weight.shape[1], 4):
            group = weight[r, start:start + 4]
            threshold = sorted(group.abs().tolist(), reverse=True)[2]
            for i in range(4):
                value = abs(float(group[i])) - threshold
                if value > 0:
                    out[r, start + i] = scale * value * (1 if group[i] > 0 else -1)
    return out


def test_one_sgd_step_is_exact_and_the_scale_stays_frozen():
    model, w, x, u = layer("2:4", "sste")
    w0, _ = snapshot(w)
    scale = w.state[SCALE]
    assert scale == pytest.approx(fitted_scale(w0, soft_threshold(w0, 2, 4, "in")), rel=1e-12)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    y0 = step(model, opt, x, u)
    torch.testing.assert_close(y0, x @ reference(w0, scale).t(), rtol=0, atol=1e-5)
    # the gradient reaches the dense weight straight through
    g = grad_of_forward_weight(x, u)
    torch.testing.assert_close(w.dense.detach(), w0 - LR * g, rtol=0, atol=1e-6)
    w1, _ = snapshot(w)
    assert w.state[SCALE] == scale  # frozen: not refitted to the new weights
    torch.testing.assert_close(model(x), x @ reference(w1, scale).t(), rtol=0, atol=1e-5)


def test_finalize_bakes_in_the_soft_weight():
    model, w, x, u = layer("2:4", "sste")
    step(model, torch.optim.SGD(model.parameters(), lr=LR), x, u)
    expected = model(x).detach()
    soft = reference(w.dense.detach(), w.state[SCALE])
    nmsparse.finalize(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0].weight.detach(), soft, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert nmsparse.check(model, "2:4").ok


def test_patterns_without_groups_are_refused():
    with pytest.raises(ValueError, match="method 'sste' needs a pattern of kind N:M"):
        nmsparse.sparsify(nn.Sequential(nn.Linear(8, 8)), "transposable:2:4", "sste")
