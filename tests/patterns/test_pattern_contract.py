"""The contract every registered pattern kind keeps, tested for each one automatically.

Each kind needs example specs below; with them it gets: its spec round-trips through
``parse_pattern``, ``mask`` returns a bool mask of the scores' shape that the pattern itself
accepts, keeps the highest scores, is deterministic and breaks ties towards the lower index,
``violations`` flags a dense tensor, and ``why_not`` explains an unusable shape.
"""

from __future__ import annotations

import pytest
import torch

import nmsparse
from nmsparse.patterns import NM, PATTERN_KINDS, Pattern, Unstructured

# Example specs per registered kind ("nm" stands for the bare "N:M" shorthand).
EXAMPLES = {
    "nm": ["2:4", "1:8", "3:8", "1:16"],
    "flat": ["flat:2:4", "flat:1:8"],
    "unstructured": ["unstructured:0.5", "unstructured:0.3"],
    "block": ["block:2x2:0.5", "block:1x4:0.25"],
    "global": ["global:0.5", "global:0.3"],
    "transposable": ["transposable:2:4", "transposable:1:4", "transposable:1:8",
                     "transposable:2:8"],
    "gs": ["gs:4:2:0.25", "gs:8:4:0.125", "gs:2:1:0.5"],
}
SHAPES = [(8, 16), (4, 16, 3, 3), (6, 32, 2)]


def all_examples():
    return [spec for specs in EXAMPLES.values() for spec in specs]


def test_every_registered_kind_has_examples():
    missing = sorted(set(PATTERN_KINDS) - set(EXAMPLES))
    assert not missing, f"add example specs for pattern kinds {missing} to EXAMPLES"


@pytest.mark.parametrize("spec", all_examples())
def test_spec_round_trips(spec):
    pattern = nmsparse.parse_pattern(spec)
    assert isinstance(pattern, Pattern)
    assert nmsparse.parse_pattern(str(pattern)) == pattern
    assert hash(nmsparse.parse_pattern(str(pattern))) == hash(pattern)
    assert 0 < pattern.density < 1 and pattern.sparsity == pytest.approx(1 - pattern.density)


def fitting_cases():
    """Every (example, shape) pair where the shape can take the pattern."""
    return [(spec, shape) for spec in all_examples() for shape in SHAPES
            if nmsparse.parse_pattern(spec).why_not(shape) is None]


def test_every_example_fits_some_shape():
    fitted = {spec for spec, _ in fitting_cases()}
    assert fitted == set(all_examples()), set(all_examples()) - fitted


@pytest.mark.parametrize("spec, shape", fitting_cases(), ids=str)
def test_mask_is_valid_keeps_the_highest_scores_and_is_deterministic(spec, shape):
    pattern = nmsparse.parse_pattern(spec)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0)).abs()
    mask = pattern.mask(scores)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert pattern.violations(mask).ok and pattern.complies(mask)
    assert mask.sum().item() == pytest.approx(pattern.density * scores.numel(), abs=1)
    assert torch.equal(pattern.mask(scores.clone()), mask)
    # raising a kept score or lowering a pruned one never changes the mask
    assert torch.equal(pattern.mask(torch.where(mask, scores + 1, scores * 0.5)), mask)
    assert not pattern.violations(torch.ones(shape)).ok


@pytest.mark.parametrize("spec", all_examples())
def test_ties_go_to_the_lower_index(spec):
    pattern = nmsparse.parse_pattern(spec)
    shape = (16, 32)  # 16 rows: room for transposable M x M blocks
    tied = pattern.mask(torch.zeros(shape))
    # scores falling with the index break every tie the same way
    falling = pattern.mask(-torch.arange(tied.numel(), dtype=torch.float32).reshape(shape))
    assert torch.equal(tied, falling)


@pytest.mark.parametrize("spec", all_examples())
def test_unusable_shape_is_explained(spec):
    pattern = nmsparse.parse_pattern(spec)
    if not isinstance(pattern, Unstructured):  # unstructured takes any 2-D or larger shape
        assert pattern.why_not((8, 17, 3)) or pattern.why_not((8, 9))
    with pytest.raises(ValueError, match="not divisible|cannot|needs"):
        pattern.require((8,))


def test_nm_carries_its_grouping_axis():
    assert nmsparse.parse_pattern("2:4", layout="flat") == NM(2, 4, "flat")
    assert str(NM(2, 4, "flat")) == "flat:2:4" and str(NM(2, 4)) == "2:4"
    assert NM(2, 4) != NM(2, 4, "flat")
    with pytest.raises(ValueError, match="accepted: 'flat:N:M'"):
        nmsparse.parse_pattern("flat:4:2x")
    with pytest.raises(ValueError, match="accepted"):
        nmsparse.parse_pattern("blocky:2")
