"""The unstructured pattern: keep a fraction of each weight, highest scores first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.patterns import Unstructured, parse_pattern


def test_parses_and_prints_back():
    pattern = parse_pattern("unstructured:0.5")
    assert pattern == Unstructured(0.5)
    assert pattern.density == 0.5 and pattern.sparsity == 0.5
    assert parse_pattern(str(pattern)) == pattern
    assert parse_pattern(" unstructured: 0.25 ") == Unstructured(0.25)


@pytest.mark.parametrize("spec", ["unstructured:0", "unstructured:1", "unstructured:1.5",
                                  "unstructured:-0.5", "unstructured:abc", "unstructured:nan",
                                  "unstructured:"])
def test_rejects_bad_densities(spec):
    with pytest.raises(ValueError, match="unstructured:D"):
        parse_pattern(spec)


def test_golden_mask_keeps_the_highest_scores_of_the_whole_tensor():
    scores = torch.tensor([[3.0, 1.0, 2.0],
                           [2.0, 5.0, 0.0]])
    # keep round(0.5 * 6) = 3: the 5, the 3 and the first 2 (flat index 2 before 3)
    expected = torch.tensor([[True, False, True],
                             [False, True, False]])
    assert torch.equal(Unstructured(0.5).mask(scores), expected)


def test_ties_go_to_the_lower_flat_index():
    mask = Unstructured(0.25).mask(torch.ones(2, 4))
    assert mask.reshape(-1).tolist() == [True, True] + [False] * 6


def test_mask_keeps_exactly_the_rounded_count():
    for keep, numel in [(0.5, 10), (0.3, 10), (0.7, 64), (0.1, 7)]:
        mask = Unstructured(keep).mask(torch.randn(1, numel))
        assert int(mask.sum()) == round(keep * numel)


def test_violations_count_non_zeros_against_the_allowance():
    pattern = Unstructured(0.5)
    assert pattern.violations(torch.tensor([[1.0, 0.0], [2.0, 0.0]])).ok
    found = pattern.violations(torch.tensor([[1.0, 3.0], [2.0, 0.0]]))
    assert (found.groups, found.violating, found.max_kept) == (1, 1, 3)


def test_why_not_refuses_vectors():
    assert Unstructured(0.5).why_not((8,)) is not None
    assert Unstructured(0.5).why_not((3, 5)) is None  # no divisibility needed


def test_sparsify_with_unstructured_keeps_half_of_each_layer():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    handle = nmsparse.sparsify(model, "unstructured:0.5", method="fixed")
    for w in handle.weights.values():
        assert int(w.mask.sum()) == round(0.5 * w.mask.numel())
        kept_min = w.dense.abs()[w.mask].min()
        assert kept_min >= w.dense.abs()[~w.mask].max()
