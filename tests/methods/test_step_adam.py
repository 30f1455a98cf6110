"""STEP: the dense Adam phase, the switch, the frozen second moment (one exact step each),
AutoSwitch, resume across the switch, and the optimizers it refuses."""

from __future__ import annotations

import io

import pytest
import torch
from linear_step import LR, grad_of_forward_weight, layer, snapshot, step

import nmsparse
from nmsparse.methods import STEP
from nmsparse.methods.step_adam import FROZEN

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def adam(model, **options):
    return torch.optim.Adam(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS, **options)


def test_dense_step_then_sparse_step_with_frozen_variance_is_exact():
    decay = 0.05
    model, w, x, u = layer("2:4", STEP(decay=decay, switch_step=1))
    opt = adam(model)
    g = grad_of_forward_weight(x, u).double()

    w0, _ = snapshot(w)
    y0 = step(model, opt, x, u)  # precondition phase: dense forward, plain Adam
    torch.testing.assert_close(y0, x @ w0.t(), rtol=0, atol=1e-6)
    # Adam's first step: m_hat = g, v_hat = g^2
    w1_expected = w0.double() - LR * g / (g.abs() + EPS)
    torch.testing.assert_close(w.dense.detach().double(), w1_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.state[FROZEN].double(), g * g, rtol=1e-5, atol=0)

    w1, m1 = snapshot(w)
    y1 = step(model, opt, x, u)  # mask learning: N:M forward, SR-STE term, frozen v_hat
    torch.testing.assert_close(y1, x @ (w1 * m1).t(), rtol=0, atol=1e-6)
    g1 = g + decay * (~m1).double() * w1.double()
    m_hat = (BETA1 * (1 - BETA1) * g + (1 - BETA1) * g1) / (1 - BETA1 ** 2)
    w2_expected = w1.double() - LR * m_hat / (g.abs() + EPS)
    torch.testing.assert_close(w.dense.detach().double(), w2_expected, rtol=0, atol=1e-5)
    assert w.handle.state_dict()["methods"][repr(w.method)]["switched_at"] == 1


@pytest.mark.parametrize("make", [
    lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
    lambda model: torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1),
    lambda model: torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False, maximize=True),
], ids=["adamw", "adam-l2", "adam-maximize"])
def test_the_second_moment_stays_frozen(make):
    model, w, x, u = layer("2:4", STEP(switch_step=2))
    opt = make(model)
    for _ in range(2):
        step(model, opt, x, u)
    frozen = w.state[FROZEN].clone()
    for k in range(4):
        step(model, opt, x * (k + 2), u)  # other gradients: a live estimate would move
        state = opt.state[w.dense]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        torch.testing.assert_close(v_hat, frozen, rtol=1e-5, atol=1e-12)


def test_autoswitch_waits_for_min_steps_and_a_full_window_and_stops_at_max_steps():
    model, w, x, u = layer("2:4", STEP(min_steps=3, window=2, tolerance=1e9))
    opt = adam(model)
    for _ in range(4):
        step(model, opt, x, u)
    assert w.handle.state_dict()["methods"][repr(w.method)]["switched_at"] == 3
    model, w, x, u = layer("2:4", STEP(min_steps=1, tolerance=0.0, max_steps=5))
    opt = adam(model)
    for k in range(6):
        step(model, opt, x * (1 + k % 2), u)
    assert w.handle.state_dict()["methods"][repr(w.method)]["switched_at"] == 5


def test_resume_across_the_switch_is_bit_identical():
    def start(seed):
        model, w, x, u = layer("2:4", STEP(min_steps=2, window=2, tolerance=1e9), seed=seed)
        return model, w, adam(model), x, u

    model, w, opt, x, u = start(0)
    step(model, opt, x, u)  # saved before the switch (step 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sparsity": w.handle.state_dict()}, buffer)
    for k in range(4):
        step(model, opt, x * (k + 1), u)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again, w_again, opt_again, _, _ = start(7)
    again.load_state_dict(saved["model"])
    opt_again.load_state_dict(saved["opt"])
    w_again.handle.load_state_dict(saved["sparsity"])
    for k in range(4):
        step(again, opt_again, x * (k + 1), u)
    assert torch.equal(w_again.dense, w.dense) and torch.equal(w_again.mask, w.mask)
    assert torch.equal(w_again.state[FROZEN], w.state[FROZEN])


def test_other_optimizers_are_refused():
    model, w, x, u = layer("2:4", "step")
    with pytest.raises(ValueError, match="needs torch.optim.Adam or torch.optim.AdamW .* got SGD"):
        step(model, torch.optim.SGD(model.parameters(), lr=LR), x, u)
    model, w, x, u = layer("2:4", "step")
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        step(model, adam(model, amsgrad=True), x, u)
    model, w, x, u = layer("2:4", "step")
    (model(x) * u).sum().backward()
    with pytest.raises(ValueError, match="got a hand-written update loop"):
        w.handle.before_step()


def test_bad_options():
    with pytest.raises(ValueError, match="switch_step must be an integer >= 1"):
        nmsparse.make_method("step", switch_step=0)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        nmsparse.make_method("step", tolerance=-1)


@pytest.mark.parametrize("above", [True, False])
def test_absolute_autoswitch_is_the_papers_statistic_by_hand(above):
    # The paper's AutoSwitch: Z_t = mean |v_t - v_(t-1)| of the raw exp_avg_sq. Record v_1 and
    # v_2 of a plain dense Adam run (the precondition phase is exactly that), compute Z_2, and
    # set epsilon just above it (switch after step 2) or just below (no switch yet).
    model, w, x, u = layer("2:4", STEP(switch_step=10))
    opt = adam(model)
    seen = []
    for _ in range(2):
        step(model, opt, x, u)
        seen.append(opt.state[w.dense]["exp_avg_sq"].detach().double().clone())
    z2 = float((seen[1] - seen[0]).abs().mean())
    epsilon = z2 * (1.01 if above else 0.99)
    model, w, x, u = layer("2:4", STEP(statistic="absolute", epsilon=epsilon, window=1,
                                       min_steps=1))
    opt = adam(model)
    for _ in range(2):
        step(model, opt, x, u)
    switched = w.handle.state_dict()["methods"][repr(w.method)].get("switched_at")
    assert switched == (2 if above else None)
    with pytest.raises(ValueError, match="statistic must be one of"):
        STEP(statistic="median")


def test_raw_frozen_moment_is_the_reimplementations_rule_by_hand():
    # frozen="raw" (thu-ml's STEP AdamW): after the switch the update is
    # w -= lr / (1 - beta1^t) * m_t / (sqrt(v_raw) + eps^0.75), v_raw the exp_avg_sq at the
    # switch, not bias-corrected. eps 1e-3 makes eps^0.75 (5.6e-3) and eps visibly different.
    # float64: right after a switch at step 1 the frozen raw estimate is 500x smaller than one
    # step's fresh (1 - beta2) g^2, and the pre-compensated exp_avg_sq cancels float32 digits.
    eps, decay = 1e-3, 0.05
    model, w, x, u = layer("2:4", STEP(decay=decay, switch_step=1, frozen="raw"),
                           dtype=torch.float64)
    opt = adam(model)
    for group in opt.param_groups:
        group["eps"] = eps
    g = grad_of_forward_weight(x, u).double()
    w0, _ = snapshot(w)
    step(model, opt, x, u)  # dense Adam: m_hat = g, v_hat = g^2
    w1 = w0.double() - LR * g / (g.abs() + eps)
    torch.testing.assert_close(w.dense.detach().double(), w1, rtol=1e-12, atol=0)
    denom = ((1 - BETA2) * g * g).sqrt() + eps ** 0.75  # v_raw after one step: (1 - beta2) g^2

    _, mask1 = snapshot(w)
    step(model, opt, x, u)  # first sparse step
    g1 = g + decay * (~mask1).double() * w1
    m2 = BETA1 * (1 - BETA1) * g + (1 - BETA1) * g1
    w2 = w1 - LR * m2 / (1 - BETA1 ** 2) / denom
    torch.testing.assert_close(w.dense.detach().double(), w2, rtol=1e-10, atol=0)

    _, mask2 = snapshot(w)
    step(model, opt, x, u)  # second sparse step: the same frozen denominator
    g2 = g + decay * (~mask2).double() * w2
    m3 = BETA1 * m2 + (1 - BETA1) * g2
    w3 = w2 - LR * m3 / (1 - BETA1 ** 3) / denom
    torch.testing.assert_close(w.dense.detach().double(), w3, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="frozen must be one of"):
        STEP(frozen="bias")
