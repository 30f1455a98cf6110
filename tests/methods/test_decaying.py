"""Decaying pruning mask: the schedule, one exact SGD step in both modes, evaluation, resume."""

from __future__ import annotations

import math

import pytest
import torch
from linear_step import LR, grad_of_forward_weight, layer, snapshot, step

import nmsparse
from nmsparse.methods import Decaying


def test_step_and_cosine_schedules():
    stepwise = Decaying(steps=8, drops=4)
    assert [stepwise.factor(k) for k in range(10)] == [1, 1, .75, .75, .5, .5, .25, .25, 0, 0]
    cosine = Decaying(steps=4, schedule="cosine")
    expected = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] + [0.0, 0.0]
    assert [cosine.factor(k) for k in range(6)] == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("where", ["weights", "gradients"])
def test_one_sgd_step_at_half_decay_is_exact(where):
    # steps=2, drops=2: beta is 1 during step 0 and 0.5 during step 1
    model, w, x, u = layer("2:4", Decaying(steps=2, drops=2, where=where))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = grad_of_forward_weight(x, u)
    w0, m0 = snapshot(w)
    y0 = step(model, opt, x, u)
    # beta = 1: forward dense ("weights") or N:M ("gradients"), gradient straight through
    torch.testing.assert_close(y0, x @ (w0 if where == "weights" else w0 * m0).t(),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(w.dense.detach(), w0 - LR * g, rtol=0, atol=1e-6)

    w1, m1 = snapshot(w)
    scale = m1.float() + 0.5 * (~m1).float()  # kept 1, pruned beta = 0.5
    y1 = step(model, opt, x, u)
    forward = w1 * scale if where == "weights" else w1 * m1
    torch.testing.assert_close(y1, x @ forward.t(), rtol=0, atol=1e-6)
    # both modes: the pruned entries get beta times the upstream gradient
    torch.testing.assert_close(w.dense.detach(), w1 - LR * g * scale, rtol=0, atol=1e-6)

    w2, m2 = snapshot(w)  # beta = 0 from now on: N:M forward, pruned entries frozen
    y2 = step(model, opt, x, u)
    torch.testing.assert_close(y2, x @ (w2 * m2).t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.dense.detach(), w2 - LR * g * m2, rtol=0, atol=1e-6)


def test_evaluation_uses_the_nm_weight_and_resume_continues_the_decay():
    model, w, x, u = layer("2:4", Decaying(steps=4, drops=4))
    model.eval()
    torch.testing.assert_close(model(x), x @ w.masked.t(), rtol=0, atol=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step(model, opt, x, u)
    step(model, opt, x, u)
    state = w.handle.state_dict()

    again, w_again, _, _ = layer("2:4", Decaying(steps=4, drops=4), seed=3)
    again.load_state_dict(model.state_dict())
    w_again.handle.load_state_dict(state)
    w2, m2 = snapshot(w_again)  # resumed at step 2: beta = 0.5
    expected = x @ (w2 * (m2.float() + 0.5 * (~m2).float())).t()
    torch.testing.assert_close(again(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"where": "both"}, "where must be one of 'weights', 'gradients'"),
    ({"schedule": "linear"}, "schedule must be one of 'step', 'cosine'"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"drops": 1.5}, "drops must be an integer >= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        nmsparse.make_method("decaying", **options)
