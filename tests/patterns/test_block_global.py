"""Block and global-budget patterns: golden masks, grammar, budgets across layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.patterns import Block, GlobalUnstructured, global_masks, global_violations


def test_block_golden_mask_keeps_the_heaviest_tiles():
    scores = torch.tensor([[1.0, 1.0, 0.0, 5.0],
                           [1.0, 1.0, 0.0, 0.0],
                           [0.0, 0.0, 2.0, 2.0],
                           [0.0, 0.1, 2.0, 2.0]])
    # 2x2 tile sums: [[4, 5], [0.1, 8]]; keep half: the 8 and the 5
    mask = Block(2, 2, 0.5).mask(scores)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(mask, expected)
    assert Block(2, 2, 0.5).violations(expected).ok
    assert not Block(2, 2, 0.25).violations(expected).ok


def test_block_of_a_conv_weight_uses_the_flattened_rows():
    pattern = nmsparse.parse_pattern("block:1x9:0.5")  # one tile = one 3x3 kernel
    scores = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).reshape(4, 2, 3, 3)
    mask = pattern.mask(scores)
    per_kernel = mask.reshape(4, 2, 9)
    assert torch.equal(per_kernel.all(-1) | ~per_kernel.any(-1), torch.ones(4, 2, dtype=torch.bool))
    assert int(per_kernel.all(-1).sum()) == 4


@pytest.mark.parametrize("spec", ["block:2x2", "block:0x2:0.5", "block:1x1:0.5", "block:2x2:1",
                                  "block:2by2:0.5", "block:2x2:abc"])
def test_block_grammar_errors_name_the_grammar(spec):
    with pytest.raises(ValueError, match="block:RxC:D"):
        nmsparse.parse_pattern(spec)


def test_block_spec_round_trips_and_shapes_are_checked():
    assert str(nmsparse.parse_pattern(" block: 4 x 8 : 0.25 ")) == "block:4x8:0.25"
    assert "not divisible into 4x4 tiles" in Block(4, 4, 0.5).why_not((6, 16))


def test_global_pattern_allows_uneven_layers_and_checks_the_total():
    pattern = nmsparse.parse_pattern("global:0.25")
    assert isinstance(pattern, GlobalUnstructured) and str(pattern) == "global:0.25"
    assert pattern.violations(torch.tensor([[1.0, 1.0, 1.0, 0.0]])).ok  # 75 % in one layer
    assert not pattern.violations(torch.ones(2, 2)).ok  # a layer that keeps all
    tensors = {"a": torch.tensor([[1.0, 1.0, 1.0, 0.0]]), "b": torch.zeros(1, 8)}
    assert global_violations(tensors, 0.25).ok  # 3 of 12
    assert not global_violations(tensors, 0.2).ok  # budget 2


def test_global_masks_start_a_sparsify_with_one_threshold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(10)  # the second layer is much larger: it keeps more
    scores = {f"{i}.weight": model[i].weight.abs() for i in (0, 2)}
    masks = global_masks(scores, 0.25)
    handle = nmsparse.sparsify(model, "global:0.25", "fixed", masks=masks)
    kept = {w.name: int(w.mask.sum()) for w in handle}
    assert sum(kept.values()) == round(0.25 * (128 + 64))
    assert kept["2.weight"] > 0.25 * 64
    with pytest.raises(ValueError, match="global:D"):
        nmsparse.parse_pattern("global:2")
