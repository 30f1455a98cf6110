"""RIA (relative importance and activations): scores and masks computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmsparse.oneshot import PRUNERS, RIA, prune
from nmsparse.oneshot.ria import relative_importance

WEIGHT = torch.tensor([[1.0, -2.0, 3.0, 4.0],
                       [2.0, 1.0, -1.0, 0.5]])
# One calibration row: the input norm of feature j is |x_j| = 4, 1, 1, 16.
INPUT = torch.tensor([[4.0, 1.0, -1.0, 16.0]])


def _layer():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(WEIGHT)
    return nn.Sequential(layer)


def test_relative_importance_by_hand():
    # row sums 10 and 4.5; column sums 3, 3, 4, 4.5
    expected = torch.tensor([[1 / 10 + 1 / 3, 2 / 10 + 2 / 3, 3 / 10 + 3 / 4, 4 / 10 + 4 / 4.5],
                             [2 / 4.5 + 2 / 3, 1 / 4.5 + 1 / 3, 1 / 4.5 + 1 / 4,
                              0.5 / 4.5 + 0.5 / 4.5]])
    assert torch.allclose(relative_importance(WEIGHT), expected)


# score = RI * norm ** power, by hand:
#   power 0.5 (norms ** 0.5 = 2, 1, 1, 4): row 0: .867 .867 1.05 5.16, row 1: 2.22 .556 .472 .889
#   power 0:   row 0: .433 .867 1.05 1.29, row 1: 1.11 .556 .472 .222   (magnitude-like)
#   power 1:   row 0: 1.73 .867 1.05 20.6, row 1: 4.44 .556 .472 3.56
@pytest.mark.parametrize(("power", "kept"), [
    (0.5, [[2, 3], [0, 3]]),
    (0.0, [[2, 3], [0, 1]]),
    (1.0, [[0, 3], [0, 3]]),
])
def test_ria_2to4_mask_by_hand(power, kept):
    model = _layer()
    result = prune(model, "2:4", "ria", calibration=[INPUT], then=None, power=power)
    expected = torch.zeros(2, 4, dtype=torch.bool)
    for row, columns in enumerate(kept):
        expected[row, columns] = True
    assert torch.equal(result.masks["0.weight"], expected)
    assert torch.equal(model[0].weight.detach(), WEIGHT * expected)  # kept weights unchanged


def test_default_power_is_one_half_and_registered_beside_wanda_and_sparsegpt():
    assert RIA().power == 0.5
    assert {"wanda", "sparsegpt", "ria"} <= set(PRUNERS.names())
    assert PRUNERS.get("ria") is RIA


def test_unstructured_half_compares_within_each_row():
    model = _layer()
    result = prune(model, "unstructured:0.5", "ria", calibration=[INPUT], then=None)
    expected = torch.tensor([[False, False, True, True], [True, False, False, True]])
    assert torch.equal(result.masks["0.weight"], expected)


def test_an_all_zero_input_channel_scores_zero_not_nan():
    weight = WEIGHT.clone()
    weight[:, 1] = 0
    scores = relative_importance(weight)
    assert torch.isfinite(scores).all() and torch.all(scores[:, 1] == 0)


@pytest.mark.parametrize("power", [-1, float("nan"), True, "1"])
def test_a_bad_power_is_refused(power):
    with pytest.raises(ValueError, match="ria power"):
        prune(_layer(), "2:4", "ria", calibration=[INPUT], power=power)
