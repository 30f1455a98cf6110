"""Transposable N:M: the valid blocks, the exact 2:4 optimum against brute force, the greedy
approximation's guarantees, both-axis violations in ``check``, and every method on it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.patterns import Transposable
from nmsparse.patterns.transposable import valid_blocks


def test_valid_block_counts():
    assert valid_blocks(2, 4).shape == (90, 16)
    assert valid_blocks(1, 4).shape == (24, 16) and valid_blocks(3, 4).shape == (24, 16)
    blocks = valid_blocks(2, 4).reshape(-1, 4, 4)
    assert (blocks.sum(1) == 2).all() and (blocks.sum(2) == 2).all()
    assert len({tuple(b.flatten().tolist()) for b in blocks}) == 90


def test_two_of_four_is_the_optimum_of_every_block():
    scores = torch.rand(8, 12, generator=torch.Generator().manual_seed(0))
    mask = Transposable(2, 4).mask(scores)
    for r in range(0, 8, 4):
        for c in range(0, 12, 4):
            block = scores[r:r + 4, c:c + 4].double().flatten()
            best = max(float(block @ candidate) for candidate in valid_blocks(2, 4))
            chosen = float(block @ mask[r:r + 4, c:c + 4].double().flatten())
            assert chosen == pytest.approx(best, abs=1e-12)


def brute_force_one_of_eight(block: torch.Tensor) -> float:
    """The best total of a 1:8 transposable block: a permutation of the 8 columns."""
    perms = torch.tensor(list(itertools.permutations(range(8))))
    return float(block.double()[torch.arange(8), perms].sum(1).max())


def test_greedy_one_of_eight_keeps_at_least_half_the_optimum():
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    mask = Transposable(1, 8).mask(scores)
    for c in (0, 8):
        block, kept = scores[:, c:c + 8], mask[:, c:c + 8]
        assert (kept.sum(0) == 1).all() and (kept.sum(1) == 1).all()
        chosen = float((block * kept).sum())
        assert brute_force_one_of_eight(block) / 2 <= chosen <= brute_force_one_of_eight(block)


@pytest.mark.parametrize("spec", ["transposable:2:8", "transposable:4:8", "transposable:3:16"])
def test_stuck_greedy_blocks_are_completed(spec):
    pattern = nmsparse.parse_pattern(spec)
    scores = torch.rand(64, 64, generator=torch.Generator().manual_seed(2))
    mask = pattern.mask(scores)
    m = pattern.m
    blocks = mask.reshape(64 // m, m, 64 // m, m).permute(0, 2, 1, 3)
    assert (blocks.sum(-1) == pattern.n).all() and (blocks.sum(-2) == pattern.n).all()


def test_conv_weights_are_blocked_per_kernel_position():
    scores = torch.rand(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    mask = Transposable(2, 4).mask(scores)
    for i, j in itertools.product(range(3), range(3)):
        assert torch.equal(mask[:, :, i, j], Transposable(2, 4).mask(scores[:, :, i, j]))


def test_violations_and_check_see_both_axes():
    pattern = Transposable(2, 4)
    rows_only = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)  # each column: 4 or 0 kept
    found = pattern.violations(rows_only)
    assert (found.groups, found.violating, found.max_kept) == (8, 2, 4)
    assert nmsparse.parse_pattern("2:4").complies(rows_only)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(rows_only.float())
    assert not nmsparse.check(model, "transposable:2:4").ok
    assert nmsparse.check(model, "2:4").ok
    with torch.no_grad():
        model[0].weight.copy_(pattern.mask(torch.rand(4, 4)).float())
    assert nmsparse.check(model, "transposable:2:4").ok


def test_specs_and_errors():
    assert str(nmsparse.parse_pattern("transposable: 2 : 4")) == "transposable:2:4"
    for bad in ("transposable:4:2", "transposable:2", "transposable:0:4"):
        with pytest.raises(ValueError, match="accepted: 'transposable:N:M'|invalid"):
            nmsparse.parse_pattern(bad)
    assert "output dimension (dim 0) 6" in Transposable(2, 4).why_not((6, 8))


OPTIONS = {"gap": {"phase_steps": 1}}  # its grow phases end within the 3 steps


@pytest.mark.parametrize("name", sorted(nmsparse.METHODS.names()))
def test_every_method_trains_on_transposable_masks(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    cls = nmsparse.METHODS.get(name)  # its facts: patterns, optimizers, masks_beyond_pattern
    if cls.patterns is not None and not isinstance(Transposable(2, 4), cls.patterns):
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=f"method '{name}' needs a pattern of kind"):
            nmsparse.sparsify(model, "transposable:2:4", name)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        return
    handle = nmsparse.sparsify(model, "transposable:2:4", name, **OPTIONS.get(name, {}))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if cls.optimizers is None
           else cls.optimizers[0](model.parameters(), lr=1e-3))
    x, y = torch.randn(6, 16), torch.randint(0, 4, (6,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for w in handle:
            assert Transposable(2, 4).complies(w.mask) or cls.masks_beyond_pattern, w.name
    nmsparse.finalize(model)
    assert nmsparse.check(model, "transposable:2:4").ok
