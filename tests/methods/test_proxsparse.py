"""ProxSparse: the proximal step by hand, exact SGD steps (lambda1 off and overwhelming), the
frozen-weight term, the hard projection and the restored weights at finalize."""

from __future__ import annotations

import math

import pytest
import torch
from linear_step import LR, grad_of_forward_weight, layer, snapshot, step
from torch import nn

import nmsparse
from nmsparse.methods.proxsparse import ORIGINAL, ProxSparse, elementary, prox_nm


def test_elementary_symmetric_polynomials_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert elementary(x, 1).item() == 10
    assert elementary(x, 2).item() == 2 + 3 + 4 + 6 + 8 + 12
    assert elementary(x, 3).item() == 6 + 8 + 12 + 24
    assert elementary(x, 4).item() == 24


def test_a_third_entry_below_the_threshold_goes_to_zero_with_its_sign_kept():
    # the 3-support optimum: v3 = max(0.5 - 1 * v1 v2, 0) = 0, so the top-2 projection wins
    weight = torch.tensor([[-2.0, 0.0, 1.0, -0.5]])
    assert prox_nm(weight, 2, 4, "in", 1.0).tolist() == [[-2.0, 0.0, 1.0, 0.0]]


def test_a_weak_step_shrinks_every_entry_to_the_fixed_point():
    # all four equal: v = 1 - lam * e_2(three others at v) = 1 - 3 lam v^2
    lam = 0.01
    root = (-1 + math.sqrt(1 + 12 * lam)) / (6 * lam)
    out = prox_nm(torch.ones(1, 4), 2, 4, "in", lam, iterations=50)
    torch.testing.assert_close(out, torch.full((1, 4), root), rtol=0, atol=1e-6)


def test_zero_strength_is_the_identity_and_four_of_eight_uses_e5():
    weight = torch.randn(3, 8)
    assert torch.equal(prox_nm(weight, 2, 4, "in", 0.0), weight)
    # four large, four tiny entries: any fifth non-zero costs lam * (product of five)
    group = torch.tensor([[3.0, 0.01, -2.0, 0.02, 2.5, -0.01, 4.0, 0.03]])
    expected = [[3.0, 0.0, -2.0, 0.0, 2.5, 0.0, 4.0, 0.0]]
    assert prox_nm(group, 4, 8, "in", 10.0).tolist() == expected
    assert prox_nm(torch.tensor(expected), 4, 8, "in", 10.0).tolist() == expected  # own point


def top_two(weight: torch.Tensor) -> torch.Tensor:
    return weight * nmsparse.nm_mask(weight, 2, 4)


def test_one_sgd_step_without_the_regulariser_is_plain_sgd_on_the_dense_weight():
    model, w, x, u = layer("2:4", ProxSparse(lambda1=0.0))
    w0, _ = snapshot(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = step(model, opt, x, u)
    torch.testing.assert_close(out, x @ w0.t(), rtol=0, atol=1e-6)  # dense forward
    w1 = w0 - LR * grad_of_forward_weight(x, u)
    torch.testing.assert_close(w.dense.detach(), w1, rtol=0, atol=1e-6)
    assert torch.equal(w.mask, nmsparse.nm_mask(w1, 2, 4))  # the hard projection


def test_an_overwhelming_regulariser_projects_onto_two_of_four_in_one_step():
    model, w, x, u = layer("2:4", ProxSparse(lambda1=1e6))
    w0, _ = snapshot(w)
    step(model, torch.optim.SGD(model.parameters(), lr=LR), x, u)
    expected = top_two(w0 - LR * grad_of_forward_weight(x, u))
    torch.testing.assert_close(w.dense.detach(), expected, rtol=0, atol=1e-6)
    assert nmsparse.parse_pattern("2:4").violations(w.dense.detach() != 0).ok


def test_the_frozen_weight_term_by_hand_over_two_steps():
    method = ProxSparse(lambda1=0.0, lambda2=0.5, epsilon=0.1)
    model, w, x, u = layer("2:4", method)
    w0, _ = snapshot(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = grad_of_forward_weight(x, u)  # the same at every step: the loss is linear
    step(model, opt, x, u)  # at W = W0 the term and its gradient are zero
    w1 = w0 - LR * g
    torch.testing.assert_close(w.dense.detach(), w1, rtol=0, atol=1e-6)
    step(model, opt, x, u)
    scale = w0 + 0.1 * torch.where(w0 >= 0, 1.0, -1.0)
    term = 2 * 0.5 * w1 * (w1 - w0) * (2 * w1 - w0) / scale ** 2
    torch.testing.assert_close(w.dense.detach(), w1 - LR * (g + term), rtol=0, atol=1e-6)


@pytest.mark.parametrize("restore", [True, False])
def test_eval_and_finalize_use_the_projected_mask_on_the_chosen_weights(restore):
    model, w, x, u = layer("2:4", ProxSparse(lambda1=0.05, restore=restore))
    w0 = w.state[ORIGINAL].clone()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(3):
        step(model, opt, x, u)
    mask = nmsparse.nm_mask(w.dense.detach(), 2, 4)
    assert torch.equal(w.handle.masks()["0.weight"], mask)
    deployed = (w0 if restore else w.dense.detach()) * mask
    model.eval()
    torch.testing.assert_close(model(x).detach(), x @ deployed.t(), rtol=0, atol=1e-6)
    nmsparse.finalize(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0].weight.detach(), deployed, rtol=0, atol=0)


def test_a_given_mask_starts_it_and_the_original_weights_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    start = model[0].weight.detach().clone()
    given = ~nmsparse.nm_mask(start, 2, 4)  # the two smallest of each group
    w = nmsparse.sparsify(model, "2:4", ProxSparse(lambda1=0.0),
                          masks={"0.weight": given.clone()})["0.weight"]
    assert torch.equal(w.state[ORIGINAL], start)
    assert torch.equal(w.mask, nmsparse.nm_mask(start, 2, 4))  # the projection takes over
    nmsparse.finalize(model)
    torch.testing.assert_close(model[0].weight.detach(), start * ~given, rtol=0, atol=0)


def test_needs_an_nm_pattern_and_valid_options():
    with pytest.raises(ValueError, match="needs a pattern of kind N:M"):
        nmsparse.sparsify(nn.Sequential(nn.Linear(8, 4)), "unstructured:0.5", "proxsparse")
    for bad in ({"lambda1": -1}, {"epsilon": 0}, {"iterations": 0}, {"restore": 1}):
        with pytest.raises(ValueError):
            ProxSparse(**bad)
