"""Prune-and-grow (SET, RigL, MEST): exchanges derived by hand, budgets kept, optimizer state
reset, schedules and resumes."""

from __future__ import annotations

import io
import math

import pytest
import torch
from tiny_nets import TinyMLP, train_steps
from torch import nn

import nmsparse
from nmsparse.methods import MEST, SET, RigL
from nmsparse.patterns import global_masks, global_violations

W = torch.tensor([[0.9, -0.1, 0.5, 0.05],
                  [-0.7, 0.2, 0.0, 0.3]])
G = torch.tensor([[0.0, 0.4, 0.0, -0.8],
                  [0.0, 0.1, 0.6, 0.0]])


def one_layer(pattern, method, lr=0.0, momentum=0.0):
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    handle = nmsparse.sparsify(layer, pattern, method)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum)
    return layer, handle, opt


def step_with(layer, opt, grad):
    layer.weight.grad = None
    handle_weight = nmsparse.handles_of(layer)[0]["weight"]
    handle_weight.dense.grad = grad.clone()
    opt.step()


def test_rigl_exchange_unstructured_by_hand():
    layer, handle, opt = one_layer("unstructured:0.5", RigL(every=1, fraction=0.5,
                                                            schedule="constant",
                                                            init="magnitude"))
    w = handle["weight"]
    assert w.mask.tolist() == [[True, False, True, False], [True, False, False, True]]
    step_with(layer, opt, G)
    # drop the two smallest kept |w| (0.3 at (1,3), 0.5 at (0,2)); grow the two largest |g|
    # among the weights pruned before: 0.8 at (0,3), 0.6 at (1,2)
    assert w.mask.tolist() == [[True, False, False, True], [True, False, True, False]]
    assert torch.equal(w.dense.detach(), torch.tensor([[0.9, 0, 0, 0], [-0.7, 0, 0, 0]]))


@pytest.mark.parametrize(("fraction", "expected"), [
    # 1 swap: the weakest kept weight of all groups (0.3, row 1) is replaced inside its group
    (0.25, [[True, False, True, False], [True, False, True, False]]),
    # 2 swaps: one per group (each group has 2 pruned slots); row 0 grows |g|=0.8 at 3
    (0.5, [[True, False, False, True], [True, False, True, False]]),
])
def test_rigl_exchange_nm_stays_in_the_group(fraction, expected):
    layer, handle, opt = one_layer("2:4", RigL(every=1, fraction=fraction, schedule="constant",
                                               init="magnitude"))
    w = handle["weight"]
    assert w.mask.tolist() == [[True, False, True, False], [True, False, False, True]]
    step_with(layer, opt, G)
    assert w.mask.tolist() == expected
    assert nmsparse.parse_pattern("2:4").violations(w.mask).ok


def test_mest_drop_score_adds_the_gradient():
    # |w| + 1.0 * |g|: kept (0,2) scores 0.5, (1,3) 0.3, (0,0) 0.9, (1,0) 0.7; with a gradient
    # of 0.5 on (1,3) it scores 0.8 and (0,2) becomes the weakest
    grad = G.clone()
    grad[1, 3] = 0.5
    layer, handle, opt = one_layer("unstructured:0.5", MEST(every=1, fraction=0.25,
                                                            schedule="constant",
                                                            init="magnitude",
                                                            gradient_weight=1.0))
    w = handle["weight"]
    step_with(layer, opt, grad)
    assert not w.mask[0, 2] and w.mask[1, 3] and int(w.mask.sum()) == 4


def test_mest_default_drops_by_magnitude_alone_as_its_scripts():
    # The authors' run scripts leave λ at 0: the same gradient as above no longer saves
    # (1,3), the smallest kept |w| (0.3)
    grad = G.clone()
    grad[1, 3] = 0.5
    assert MEST().gradient_weight == 0 and MEST().regrow
    layer, handle, opt = one_layer("unstructured:0.5", MEST(every=1, fraction=0.25,
                                                            schedule="constant",
                                                            init="magnitude", regrow=False))
    w = handle["weight"]
    step_with(layer, opt, grad)
    assert w.mask[0, 2] and not w.mask[1, 3] and int(w.mask.sum()) == 4


@pytest.mark.parametrize(("rounding", "dropped"), [("floor", 1), ("half-up", 2)])
def test_rigl_drop_count_floors_as_the_reference(rounding, dropped):
    # 4 kept weights, α = 0.375: 1.5 weights; the reference truncates to 1, half-up gives 2
    assert RigL().rounding == "floor"
    layer, handle, opt = one_layer("unstructured:0.5", RigL(every=1, fraction=0.375,
                                                            schedule="constant",
                                                            init="magnitude",
                                                            rounding=rounding))
    w = handle["weight"]
    before = w.mask.clone()
    step_with(layer, opt, G)
    assert int((before & ~w.mask).sum()) == dropped


@pytest.mark.parametrize("regrow", [True, False])
def test_rigl_regrows_a_just_dropped_weight_keeping_its_value(regrow):
    # One drop (α = 0.25 of 4): the weakest kept weight (1,3), |w| 0.3. Its gradient (2.0)
    # is the largest of all, so the reference grows it straight back, unchanged; without
    # regrow it grows the largest |g| among the weights pruned before: (0,3), 0.8.
    grad = G.clone()
    grad[1, 3] = 2.0
    layer, handle, opt = one_layer("unstructured:0.5", RigL(every=1, fraction=0.25,
                                                            schedule="constant",
                                                            init="magnitude", regrow=regrow))
    w = handle["weight"]
    before = w.mask.clone()
    step_with(layer, opt, grad)
    if regrow:
        assert torch.equal(w.mask, before) and w.dense[1, 3].item() == pytest.approx(0.3)
    else:
        assert not w.mask[1, 3] and w.mask[0, 3] and w.dense[0, 3].item() == 0


@pytest.mark.parametrize("signed", [True, False])
def test_set_drops_each_sign_on_its_own(signed):
    # Kept (magnitude init): +0.9, +0.5, +0.3 and -0.7. α = 0.5 of each sign (the paper):
    # round(1.5) = 2 positives nearest zero (0.3, 0.5) and round(0.5) = 1 negative (-0.7),
    # so only 0.9 survives; ranking all four by |w| drops round(2.0) = 2: 0.3 and 0.5.
    layer, handle, opt = one_layer("unstructured:0.5", SET(every=1, fraction=0.5,
                                                           init="magnitude", signed=signed))
    w = handle["weight"]
    assert SET().signed
    step_with(layer, opt, G)
    assert w.mask[0, 0] and not w.mask[0, 2] and not w.mask[1, 3]
    assert bool(w.mask[1, 0]) is not signed  # -0.7 goes only under the signed rule
    assert int(w.mask.sum()) == 4


@pytest.mark.parametrize("rounding", ["sorted", "half-up"])
def test_set_sorted_rounding_gives_the_reference_counts(rounding):
    # 32 entries, the 16 with |w| >= 1.1 kept (magnitude init), then the kept 1.1 set to 0:
    # 6 positives (1.2 .. 1.7), 9 negatives (-1.1 .. -1.9), one active 0, 16 pruned 0s.
    # SET's reference sorts all 32 values: 9 negatives, 17 zeros, 6 positives, then keeps
    #   w < values[int((1 - 0.3) * 9)] = values[6] = -1.3 -> drops -1.3, -1.2, -1.1 (3);
    #   w > values[int(min(31, 26 + 0.3 * 6))] = values[27] = 1.3 -> drops 1.2 and 1.3 (2);
    #   the active 0 is neither, so it goes too: 6 dropped.
    # Half up (the default): round(0.3 * 7) = 2 "positives" (0 counts as one: 0 and 1.2) and
    # round(0.3 * 9) = 3 negatives: 5 dropped, 1.3 stays.
    weight = torch.tensor([[1.1, 0.01, -1.1, 0.02, 1.2, 0.03, -1.2, 0.04],
                           [1.3, 0.05, -1.3, 0.06, 1.4, 0.07, -1.4, 0.08],
                           [1.5, 0.09, -1.5, 0.10, 1.6, 0.11, -1.6, 0.12],
                           [1.7, 0.13, -1.7, 0.14, -1.8, 0.15, -1.9, 0.16]])
    layer = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    handle = nmsparse.sparsify(layer, "unstructured:0.5", SET(every=1, fraction=0.3,
                                                              init="magnitude",
                                                              rounding=rounding))
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    w = handle["weight"]
    assert w.mask[:, 0::2].all() and not w.mask[:, 1::2].any()
    with torch.no_grad():
        w.dense[0, 0] = 0.0
    step_with(layer, opt, torch.zeros(4, 8))
    dropped = {(0, 0), (0, 4), (0, 2), (0, 6), (1, 2)} | ({(1, 0)} if rounding == "sorted"
                                                          else set())
    kept = {(i, j) for i in range(4) for j in range(0, 8, 2)} - dropped
    assert {(i, j) for i, j in w.mask.nonzero().tolist() if j % 2 == 0} == kept
    assert int(w.mask.sum()) == 16  # as many grown among the weights pruned before


def test_set_sorted_counts_by_hand():
    # first positive at n - p; the positive threshold's index is int(min(n - 1, n - p + α p))
    rule = SET(rounding="sorted")
    assert rule.signed_counts(0.3, 6, 9, 32) == (2, 3)  # int(1.8) + 1, 9 - int(6.3)
    assert rule.signed_counts(0.3, 10, 10, 40) == (4, 3)  # int(3.0) + 1, 10 - int(7.0)
    assert rule.signed_counts(0.3, 0, 4, 8) == (0, 2)  # no positives; 4 - int(2.8)
    assert rule.signed_counts(0.9, 3, 0, 8) == (3, 0)  # int(min(7, 7.7)) - 5 + 1: all 3
    assert SET().signed_counts(0.3, 10, 10, 40) == (3, 3)  # half up
    with pytest.raises(ValueError, match="needs signed=true"):
        SET(rounding="sorted", signed=False)


def test_grown_weights_start_at_zero_with_fresh_optimizer_state():
    layer, handle, opt = one_layer("unstructured:0.5", RigL(every=2, fraction=0.5,
                                                            schedule="constant",
                                                            init="magnitude"),
                                   lr=0.1, momentum=0.9)
    w = handle["weight"]
    step_with(layer, opt, torch.ones(2, 4))
    before = w.mask.clone()
    buffer = opt.state[w.dense]["momentum_buffer"]
    assert torch.equal(buffer != 0, before)  # pruned gradients were zeroed before the update
    step_with(layer, opt, G + 1)
    changed = before ^ w.mask
    assert changed.sum() == 4
    assert not buffer[changed].any() and not w.dense[changed & w.mask].any()
    assert not w.dense[~w.mask].any()


def test_cosine_schedule_and_stop():
    method = RigL(every=10, fraction=0.4, stop=100)
    assert method.fraction_at(0) == pytest.approx(0.4)
    assert method.fraction_at(50) == pytest.approx(0.2)
    assert method.fraction_at(25) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert method.fraction_at(101) == 0
    assert method.mutates_after(9) and not method.mutates_after(10)
    assert not method.mutates_after(109)
    assert SET(fraction=0.3, stop=100).fraction_at(99) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [{"every": 0}, {"fraction": 1.5}, {"grow": "best"},
                                 {"schedule": "linear"}, {"settle": 100}, {"init": "erk"}])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RigL(**bad)


def run(method, pattern, steps, seed=0, model=None, opt=None, handle=None, data_seed=1):
    if model is None:
        torch.manual_seed(seed)
        model = TinyMLP()
        handle = nmsparse.sparsify(model, pattern, method)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, steps, seed=data_seed)
    return model, handle, opt


@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.2", "block:2x4:0.25"])
@pytest.mark.parametrize("method", [SET(every=2), RigL(every=2), MEST(every=2),
                                    RigL(every=2, grow="momentum")], ids=repr)
def test_masks_explore_and_keep_the_pattern(method, pattern):
    model, handle, _ = run(method, pattern, 1)
    start = {w.name: w.mask.clone() for w in handle}
    spec = nmsparse.parse_pattern(pattern)
    model, handle, opt = run(method, pattern, 6, model=model, handle=handle,
                             opt=torch.optim.Adam(model.parameters(), lr=1e-2))
    for w in handle:
        assert spec.violations(w.mask).ok
        assert int(w.mask.sum()) == int(start[w.name].sum())
        # with regrow (the reference rule) a layer with few tiles may grow back what it
        # dropped, so there the model as a whole must explore
        assert method.regrow or not torch.equal(w.mask, start[w.name]), w.name
        assert not w.dense[~w.mask].any()
    assert any(not torch.equal(w.mask, start[w.name]) for w in handle)
    assert handle.method_states[repr(method)]["exchanges"] == 3


def test_global_budget_moves_weights_between_layers():
    method = RigL(every=1, fraction=0.3, schedule="constant")
    model, handle, _ = run(method, "global:0.25", 5)
    kept = {w.name: int(w.mask.sum()) for w in handle}
    total = sum(w.dense.numel() for w in handle)
    assert sum(kept.values()) == round(0.25 * 512) + round(0.25 * 128)
    assert global_violations({w.name: w.mask for w in handle}, 0.25).ok
    assert kept != {"a.weight": 128, "b.weight": 32}, "no weight moved between layers"
    assert total == 640


def test_global_masks_use_one_threshold():
    masks = global_masks({"a": torch.tensor([[4.0, 1.0]]),
                                   "b": torch.tensor([[3.0, 2.0, 0.5, 5.0]])}, 0.5)
    assert masks["a"].tolist() == [[True, False]]
    assert masks["b"].tolist() == [[True, False, False, True]]


def test_soft_memory_bound_grows_first_and_prunes_later():
    method = MEST(every=4, settle=2, fraction=0.5, schedule="constant", soft=True)
    model, handle, opt = run(method, "2:4", 4)  # the exchange after step 4 grows only
    spec = nmsparse.parse_pattern("2:4")
    grown = {w.name: int(w.mask.sum()) for w in handle}
    assert all(grown[w.name] > w.dense.numel() // 2 for w in handle)
    assert not all(spec.violations(w.mask).ok for w in handle)
    run(method, "2:4", 2, model=model, handle=handle, opt=opt, data_seed=2)
    for w in handle:
        assert spec.violations(w.mask).ok and int(w.mask.sum()) == w.dense.numel() // 2


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("method", [SET(every=2), RigL(every=3, grow="momentum"),
                                    MEST(every=3, settle=1, soft=True)], ids=repr)
def test_resume_mid_schedule_is_bit_identical(method):
    model, handle, opt = run(method, "2:4", 4)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(),
                       "sparsity": handle.state_dict()})
    run(method, "2:4", 5, model=model, handle=handle, opt=opt, data_seed=2)
    torch.manual_seed(7)
    other = TinyMLP()
    other_handle = nmsparse.sparsify(other, "2:4", method)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    other.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    other_handle.load_state_dict(saved["sparsity"])
    run(method, "2:4", 5, model=other, handle=other_handle, opt=other_opt, data_seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_a_weight_stored_transposed_swaps_inside_its_groups():
    layer = nn.Linear(4, 8, bias=False)  # weight (8, 4), grouped along dim 0 (its transpose)
    pattern = nmsparse.patterns.OnTranspose(nmsparse.NM(2, 4))
    handle = nmsparse.sparsify(layer, pattern, RigL(every=1, fraction=0.5,
                                                    schedule="constant"))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    w = handle["weight"]
    before = w.mask.clone()
    step_with(layer, opt, torch.randn(8, 4))
    assert pattern.violations(w.mask).ok and not torch.equal(w.mask, before)
