"""Nested multi-level N:M: hand-derived ranks, level-by-level training with frozen levels,
joint training, switching levels at inference, and the nesting check."""

from __future__ import annotations

import pytest
import torch
from tiny_nets import TinyMLP, train_steps
from torch import nn

import nmsparse
from nmsparse.levels import check_nesting, level_masks, nesting_problems, set_level
from nmsparse.methods import Nested
from nmsparse.patterns import NM

W = torch.tensor([[0.9, -0.1, 0.5, 0.05, 0.0, 0.3, -0.2, 0.8],
                  [-0.7, 0.2, 0.0, 0.3, 0.1, 0.1, 0.1, 0.1]])


def layer_with(method, pattern="2:4"):
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer, nmsparse.sparsify(layer, pattern, method)


def test_ranks_by_hand():
    _, handle = layer_with(Nested(levels="1:4,2:4"))
    w = handle["weight"]
    # groups of 4 along the input: [0.9,-0.1,0.5,0.05] -> ranks 0,2,1,2;
    # [0,0.3,-0.2,0.8] -> 2,1,2,0; [-0.7,0.2,0,0.3] -> 0,2,2,1; [0.1]*4 -> ties, lower first
    assert w.method.ranks(w).tolist() == [[0, 2, 1, 2, 2, 1, 2, 0], [0, 2, 2, 1, 0, 1, 2, 2]]
    level0, level1 = level_masks(w)
    assert torch.equal(w.mask, level0) and w.pattern == NM(1, 4)
    assert torch.equal(level1, nmsparse.parse_pattern("2:4").mask(W.abs()))


def test_auto_levels_halve_n_and_bad_levels_are_named():
    _, handle = layer_with(Nested(), "4:8")
    w = handle["weight"]
    assert w.method.levels_of(w) == (NM(2, 8), NM(4, 8))
    with pytest.raises(ValueError, match="densest level 2:4"):
        layer_with(Nested(levels="1:4,2:4"), "1:4")
    for bad in ("2:4,1:4", "1:4,2:8", "x", "unstructured:0.5,2:4"):
        with pytest.raises(ValueError, match="levels"):
            Nested(levels=bad)


def test_progressive_freezes_the_sparser_level():
    torch.manual_seed(0)
    model = TinyMLP()
    handle = nmsparse.sparsify(model, "4:8", Nested(levels="1:8,2:8,4:8", level_steps=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    train_steps(model, opt, 3)
    w = handle["a.weight"]
    assert w.state["level"] == 1 and w.pattern == NM(2, 8)
    frozen = w.state["frozen"] == 0  # the 1:8 level, frozen when level 2:8 started
    assert NM(1, 8).violations(frozen).ok and int(frozen.sum()) == w.dense.numel() // 8
    assert not (w.state["frozen"] > 0).logical_and(w.state["frozen"] != 255).any()
    values = w.dense.detach()[frozen].clone()
    train_steps(model, opt, 3, seed=1)
    assert w.state["level"] == 2 and torch.equal(level_masks(w)[0], frozen)
    # kept through weight decay and momentum while 2:8 trained; 2:8 now frozen as well
    assert torch.equal(w.dense.detach()[frozen], values)
    second = level_masks(w)[1]
    assert torch.equal(w.state["frozen"] <= 1, second) and bool((second & ~frozen).any())
    train_steps(model, opt, 2, seed=2)
    assert torch.equal(w.dense.detach()[frozen], values)
    assert check_nesting(handle).ok


def test_joint_training_cycles_levels():
    torch.manual_seed(0)
    model = TinyMLP()
    handle = nmsparse.sparsify(model, "2:4", Nested(levels="1:4,2:4", training="joint"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    for step in range(4):
        train_steps(model, opt, 1, seed=step)
        seen.append(str(handle["a.weight"].pattern))
    assert seen == ["2:4", "1:4", "2:4", "1:4"]
    assert "frozen" not in handle["a.weight"].state
    assert check_nesting(model).ok


def test_switching_levels_is_exact_and_matches_masked_weights():
    torch.manual_seed(0)
    model = TinyMLP()
    handle = nmsparse.sparsify(model, "2:4", Nested(levels="1:4,2:4", training="joint"))
    train_steps(model, torch.optim.Adam(model.parameters(), lr=1e-2), 3)
    x = torch.randn(5, 16)
    outputs = {}
    for level in ("1:4", "2:4", 0):
        set_level(model, level)
        with torch.no_grad():
            outputs[level] = model(x)
    assert torch.equal(outputs["1:4"], outputs[0])
    for level, index in (("1:4", 0), ("2:4", 1)):
        a, b = (level_masks(handle[k])[index] for k in ("a.weight", "b.weight"))
        with torch.no_grad():
            hidden = nn.functional.linear(x, handle["a.weight"].dense * a, model.a.bias).relu()
            expected = nn.functional.linear(hidden, handle["b.weight"].dense * b, model.b.bias)
        torch.testing.assert_close(outputs[level], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no level"):
        set_level(model, "3:4")


def test_nesting_problems_are_found():
    levels = (NM(1, 4), NM(2, 4))
    inner = torch.tensor([[True, False, False, False]])
    outer = torch.tensor([[False, True, True, False]])
    problems = nesting_problems([inner, outer], levels)
    assert problems == ["level 1:4 is not inside level 2:4"]
    assert nesting_problems([inner, inner], levels) == [
        "level 2:4: 1 of 1 groups do not keep exactly 2"]


def test_resume_in_the_middle_of_progressive_training_is_exact():
    import io

    def fresh(seed):
        torch.manual_seed(seed)
        model = TinyMLP()
        handle = nmsparse.sparsify(model, "2:4", Nested(levels="1:4,2:4", level_steps=2))
        return model, handle, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, handle, opt = fresh(0)
    train_steps(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sparsity": handle.state_dict()}, buffer)
    train_steps(model, opt, 3, seed=1)
    other, other_handle, other_opt = fresh(5)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    other_handle.load_state_dict(saved["sparsity"])
    train_steps(other, other_opt, 3, seed=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
