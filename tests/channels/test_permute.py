"""Channel permutations for N:M: the search finds the best partition where it is exhaustive,
the greedy swaps never lose magnitude, and the permuted model computes the same function."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.channels import channel_graph, permute_for_nm
from nmsparse.channels.permute import (
    exhaustive_order,
    greedy_swap_order,
    group_splits,
    pair_search_order,
    partition_count,
    stripe_kept,
)


def loop_kept(matrix, order, n, m):
    """Reference: kept magnitude of ``order`` by plain loops."""
    total = 0.0
    for row in matrix.tolist():
        for start in range(0, len(order), m):
            values = sorted((row[c] for c in order[start:start + m]), reverse=True)
            total += sum(values[:n])
    return total


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (2, 8)])
def test_stripe_scores_match_a_loop(n, m):
    matrix = torch.rand(5, 2 * m, generator=torch.Generator().manual_seed(n + m))
    order = torch.randperm(2 * m, generator=torch.Generator().manual_seed(1))
    got = stripe_kept(matrix, order.reshape(-1, m), n).sum().item()
    assert got == pytest.approx(loop_kept(matrix, order.tolist(), n, m), rel=1e-6)


def test_exhaustive_is_the_best_of_all_permutations():
    matrix = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    every = torch.tensor(list(itertools.permutations(range(8))))
    best = stripe_kept(matrix, every.reshape(len(every), 2, 4), 2).sum(-1).max().item()
    order = exhaustive_order(matrix, 2, 4)
    assert sorted(order.tolist()) == list(range(8))
    assert loop_kept(matrix, order.tolist(), 2, 4) == pytest.approx(best, rel=1e-6)
    assert partition_count(8, 4) == 35 and partition_count(12, 4) == 5775


def test_greedy_swaps_solve_a_case_with_a_known_optimum_and_never_lose():
    # one row: four large weights share the first stripe; 2:4 keeps only two of them
    matrix = torch.tensor([[10.0, 10, 10, 10, 1, 1, 1, 1]])
    order, swaps = greedy_swap_order(matrix, 2, 4)
    assert loop_kept(matrix, order.tolist(), 2, 4) == 40 and swaps >= 1
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        matrix = torch.rand(7, 32, generator=generator) ** 3
        order, _ = greedy_swap_order(matrix, 2, 4)
        assert sorted(order.tolist()) == list(range(32))
        assert loop_kept(matrix, order.tolist(), 2, 4) >= \
            loop_kept(matrix, list(range(32)), 2, 4) - 1e-6


def test_group_splits_are_every_partition_once():
    splits = group_splits(4, 2)
    assert splits.shape == (35, 8) == (partition_count(8, 4), 8)
    assert len({frozenset(map(frozenset, (row[:4].tolist(), row[4:].tolist())))
                for row in splits}) == 35


@pytest.mark.parametrize("channels", [8, 12])
def test_stripe_search_reaches_the_brute_force_optimum_on_small_cases(channels):
    # The brute-force optimum: every partition tried (exhaustive_order, itself checked against
    # all permutations above); the heuristic starts from the greedy swaps, as beyond the
    # exhaustive limit, and must land on it.
    generator = torch.Generator().manual_seed(channels)
    for _ in range(4):
        matrix = torch.rand(6, channels, generator=generator) ** 3
        best = loop_kept(matrix, exhaustive_order(matrix, 2, 4).tolist(), 2, 4)
        start, _ = greedy_swap_order(matrix, 2, 4)
        order, _ = pair_search_order(matrix, 2, 4, start)
        assert sorted(order.tolist()) == list(range(channels))
        assert loop_kept(matrix, order.tolist(), 2, 4) == pytest.approx(best, rel=1e-6)


def test_stripe_search_never_keeps_less_than_the_greedy_swaps():
    generator = torch.Generator().manual_seed(5)
    for n, m in ((2, 4), (1, 4), (2, 8)):
        matrix = torch.rand(8, 4 * m, generator=generator) ** 3
        start, _ = greedy_swap_order(matrix, n, m)
        order, _ = pair_search_order(matrix, n, m, start, escapes=5)
        assert sorted(order.tolist()) == list(range(4 * m))
        assert loop_kept(matrix, order.tolist(), n, m) >= \
            loop_kept(matrix, start.tolist(), n, m) - 1e-6


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 32), nn.LayerNorm(32),
                         nn.GELU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.mark.parametrize("pattern", ["2:4", "2:8", "1:4"])
def test_permuting_keeps_the_function_and_raises_kept_magnitude(pattern):
    model = mlp()
    x = torch.randn(9, 12)
    with torch.no_grad():
        before = model(x)
        report = permute_for_nm(model, channel_graph(model, x), pattern)
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-5 * before.abs().max().item()
    assert len(report.groups) == 3 and report.kept_after > report.kept_before
    assert {g.search for g in report.groups} & {"exhaustive"} or \
        all(g.search.startswith("greedy") for g in report.groups)
    # the report's numbers are what the pattern keeps of the layers' weights now
    spec = nmsparse.parse_pattern(pattern)
    kept = sum((w.abs() * spec.mask(w.abs())).sum().item()
               for w in (model[2].weight, model[5].weight, model[7].weight))
    assert kept == pytest.approx(report.kept_after, rel=1e-5)


def test_only_n_m_along_the_input_is_accepted():
    model = mlp()
    groups = channel_graph(model, torch.randn(2, 12))
    for pattern in ("flat:2:4", "unstructured:0.5"):
        with pytest.raises(ValueError, match="input channels"):
            permute_for_nm(model, groups, pattern)


def test_one_shot_prune_with_permutation_keeps_more_magnitude():
    x = torch.randn(16, 12)
    plain, permuted = mlp(1), mlp(1)
    nmsparse.prune(plain, "2:4", "magnitude", then=None)
    result = nmsparse.prune(permuted, "2:4", "magnitude", calibration=[x], then=None,
                            permute=True)
    kept = lambda model: sum(layer.weight.abs().sum().item() for layer in model  # noqa: E731
                             if isinstance(layer, nn.Linear))
    assert kept(permuted) > kept(plain)
    assert result.permutation.kept_after > result.permutation.kept_before
    for layer in permuted:
        if isinstance(layer, nn.Linear) and layer.in_features % 4 == 0:
            assert nmsparse.parse_pattern("2:4").complies(layer.weight)
    with pytest.raises(ValueError, match="permute=True needs calibration"):
        nmsparse.prune(mlp(), "2:4", "magnitude", then=None, permute=True)
