"""GaP: which partition is dense in which phase, prune-back by magnitude, the final fixed
phase, random order, and resume."""

from __future__ import annotations

import pytest
import torch
from tiny_nets import TinyMLP, train_steps

import nmsparse
from nmsparse.methods import GaP


def dense_layers(handle):
    return [w.name for w in handle if w.mask.all()]


@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.25"])
def test_cyclic_phases_then_fixed_masks(pattern):
    torch.manual_seed(0)
    model = TinyMLP(8, 16, 16, 4)
    handle = nmsparse.sparsify(model, pattern, GaP(parts=3, phase_steps=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spec = nmsparse.parse_pattern(pattern)
    assert dense_layers(handle) == []
    for expected in (["a.weight"], ["b.weight"], ["c.weight"]):
        before = {w.name: w.mask.clone() for w in handle}
        train_steps(model, opt, 1)
        assert dense_layers(handle) == expected
        grown = handle[expected[0]]
        # grown weights start at 0 with fresh momentum; after one update they moved by lr*grad
        buffer = opt.state[grown.dense]["momentum_buffer"]
        new = ~before[grown.name]
        torch.testing.assert_close(grown.dense.detach()[new], -0.1 * buffer[new])
        train_steps(model, opt, 1)
    train_steps(model, opt, 1)  # the last partition is pruned back by magnitude: all sparse now
    assert dense_layers(handle) == []
    masks = {w.name: w.mask.clone() for w in handle}
    for w in handle:
        assert spec.violations(w.mask).ok and not w.dense[~w.mask].any()
    train_steps(model, opt, 4)
    assert all(torch.equal(w.mask, masks[w.name]) for w in handle)
    assert handle.method_states[repr(handle.method)]["phase"] == 3


def test_pruning_back_keeps_the_largest_weights():
    torch.manual_seed(0)
    model = TinyMLP(8, 16, 16, 4)
    handle = nmsparse.sparsify(model, "2:4", GaP(parts=3, phase_steps=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, 1)
    a = handle["a.weight"]
    trained = a.dense.detach().clone()
    train_steps(model, opt, 1)
    assert torch.equal(a.mask, nmsparse.parse_pattern("2:4").mask(trained.abs()))


def test_random_order_visits_every_partition_once_per_cycle():
    method = GaP(parts=4, cycles=3, order="random", seed=3)
    for cycle in range(3):
        assert sorted(method.dense_part(cycle * 4 + i) for i in range(4)) == [0, 1, 2, 3]
    assert method.dense_part(12) is None
    assert [method.dense_part(i) for i in range(12)] != [i % 4 for i in range(12)]


def test_partitions_are_contiguous_in_model_order():
    torch.manual_seed(0)
    handle = nmsparse.sparsify(TinyMLP(8, 16, 16, 4), "2:4", GaP(parts=2))
    assert GaP.partition(list(handle)[::-1], 2) == {"a.weight": 0, "b.weight": 0,
                                                   "c.weight": 1}


@pytest.mark.parametrize("bad", [{"parts": 0}, {"phase_steps": 1.5}, {"order": "zigzag"}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GaP(**bad)


def test_more_parts_than_layers_uses_one_part_per_layer():
    torch.manual_seed(0)
    model = TinyMLP(8, 16, 16, 4)
    handle = nmsparse.sparsify(model, "2:4", GaP(parts=5, phase_steps=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for _ in range(4):
        train_steps(model, opt, 1)
        seen.append(dense_layers(handle))
    assert seen == [["a.weight"], ["b.weight"], ["c.weight"], []]
