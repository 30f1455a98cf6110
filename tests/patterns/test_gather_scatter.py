"""Gather-scatter patterns: the constraint by loops, the solver's optimality, the packed
format, and training with the engine."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.patterns import GatherScatter
from nmsparse.patterns.gather_scatter import pack_gs, unpack_gs


def loop_blocks(tensor, pattern):
    """{(row group, kernel position, bucket): [(flat index, value)]} by plain loops."""
    out, columns = tensor.shape[:2]
    kernel = list(itertools.product(*(range(k) for k in tensor.shape[2:])))
    blocks = {}
    for o in range(out):
        for c in range(columns):
            for position in kernel:
                index = (o, c, *position)
                key = (o // pattern.rows, position, c % pattern.buckets)
                blocks.setdefault(key, []).append((index, tensor[index].item()))
    return blocks


@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3), (6, 12)])
def test_mask_keeps_the_k_best_of_every_block(shape):
    pattern = GatherScatter(4, 2, 0.5)
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape)))
    mask = pattern.mask(scores)
    k = pattern.kept_per_block(shape)
    blocks = loop_blocks(scores, pattern)
    assert len(blocks) == pattern.violations(mask).groups
    for entries in blocks.values():
        assert len(entries) == pattern.block_size(shape)
        best = sorted(entries, key=lambda e: -e[1])[:k]
        assert {index for index, _ in best} == {index for index, _ in entries if mask[index]}
    assert mask.sum().item() == k * len(blocks)


def test_violations_count_overfull_blocks():
    pattern = GatherScatter(2, 2, 0.25)  # (4, 8): blocks of 2 rows x 4 columns keep 2
    tensor = pattern.mask(torch.rand(4, 8)).float()
    assert pattern.violations(tensor).ok
    tensor[0, 0] = tensor[1, 0] = tensor[0, 2] = 1.0  # bucket 0 of rows 0-1
    found = pattern.violations(tensor)
    assert not found.ok and found.violating == 1 and found.groups == 4
    assert found.max_kept == (tensor[:2, 0::2] != 0).sum().item()


def test_parse_and_bad_specs():
    assert nmsparse.parse_pattern("gs:4:2:0.25") == GatherScatter(4, 2, 0.25)
    for spec in ("gs:4:2", "gs:1:2:0.5", "gs:4:0:0.5", "gs:4:2:1.5", "gs:a:2:0.5"):
        with pytest.raises(ValueError, match="accepted: 'gs:B:R:D'"):
            nmsparse.parse_pattern(spec)
    assert "cannot keep" in GatherScatter(4, 1, 0.01).why_not((4, 8))
    assert "rows per group" in GatherScatter(4, 3, 0.5).why_not((4, 8))


@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3)])
def test_packed_round_trip_and_size(shape):
    pattern = GatherScatter(4, 2, 0.25)
    weight = torch.randn(shape)
    sparse = weight * pattern.mask(weight.abs())
    packed = pack_gs(sparse, pattern)
    assert packed.positions.dtype == torch.int16
    torch.testing.assert_close(unpack_gs(packed), sparse, rtol=0, atol=0)
    assert packed.nbytes < sparse.numel() * sparse.element_size() / 2
    sparse.view(-1)[0] = 1.0 if sparse.view(-1)[0] == 0 else sparse.view(-1)[0]
    fuller = sparse.clone()
    fuller[pattern.mask(-weight.abs())] = 1.0  # the pruned entries too
    with pytest.raises(ValueError, match="prune it to the pattern first"):
        pack_gs(fuller, pattern)


def test_trains_under_the_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    handle = nmsparse.sparsify(model, "gs:4:2:0.25", "srste")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 16)).square().mean().backward()
        opt.step()
    for w in handle:
        assert w.pattern.violations(w.mask).ok and w.mask.float().mean() == 0.25


def test_violations_boundary_is_exactly_the_limit():
    pattern = GatherScatter(2, 2, 0.25)  # (4, 8): blocks of 2 rows x 4 columns keep 2
    tensor = torch.zeros(4, 8)
    tensor[0, 0] = tensor[1, 2] = 1.0  # bucket 0 of rows 0-1: exactly the limit
    assert pattern.violations(tensor).ok
    tensor[0, 4] = 1.0  # limit + 1
    found = pattern.violations(tensor)
    assert (found.violating, found.max_kept) == (1, 3)


def test_packed_positions_fill_int16_exactly():
    limit = torch.iinfo(torch.int16).max  # positions 0 .. block size - 1 must fit
    pattern = GatherScatter(2, 1, 0.5)
    # one block per bucket of limit + 1 weights, each keeping its last half (position limit)
    weight = pattern.mask(torch.arange(2.0 * (limit + 1))[None]).float()
    packed = pack_gs(weight, pattern)
    assert int(packed.positions.max()) == limit
    torch.testing.assert_close(unpack_gs(packed), weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit int16 positions"):
        pack_gs(torch.zeros(1, 2 * (limit + 2)), pattern)
