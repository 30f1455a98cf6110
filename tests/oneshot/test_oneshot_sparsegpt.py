"""SparseGPT's blocked OBS sweep against hand values, least squares and a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from nmsparse.oneshot.sparsegpt import sparsegpt
from nmsparse.patterns import NM, Unstructured

TRIDIAGONAL_3 = torch.tensor([[2.0, 1.0, 0.0],
                              [1.0, 2.0, 1.0],
                              [0.0, 1.0, 2.0]], dtype=torch.float64)


def test_pruning_the_first_column_by_hand():
    # Minimising (w - w') H (w - w')^T with w'_0 = 0 gives w'_K = w_K + H_KK^-1 H_K0 w_0.
    # H_KK = [[2, 1], [1, 2]], its inverse [[2, -1], [-1, 2]] / 3, H_K0 = [1, 0]:
    # w'_K = [1, 1] + [2/3, -1/3] = [5/3, 2/3].
    weight = torch.ones(1, 3, dtype=torch.float64)
    mask = torch.tensor([[False, True, True]])
    pruned, kept = sparsegpt(weight, TRIDIAGONAL_3, Unstructured(0.5), damp=0.0, mask=mask)
    assert torch.equal(kept, mask)
    assert torch.allclose(pruned, torch.tensor([[0.0, 5 / 3, 2 / 3]], dtype=torch.float64))


def _least_squares(weight, inputs, kept):
    """Best kept weights by a direct solve on the data: min ||X w^T - X_K w_K^T||."""
    solution = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        columns = kept[row].nonzero().squeeze(1)
        target = inputs @ weight[row]
        fit = torch.linalg.lstsq(inputs[:, columns], target.unsqueeze(1)).solution
        solution[row, columns] = fit.squeeze(1)
    return solution


def test_two_of_four_equals_least_squares_when_the_pruned_columns_come_first():
    # When every row prunes a prefix of its columns, all kept columns are still free when
    # the pruning happens, so the sequential OBS result is the least-squares optimum.
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    inputs[:, 1] += 0.8 * inputs[:, 0]  # correlated inputs: the update matters
    inputs[:, 2] -= 0.5 * inputs[:, 1]
    hessian = 2 * inputs.t() @ inputs / inputs.shape[0]
    weight = torch.tensor([[0.05, -0.04, 3.0, 2.0],
                           [0.02, 0.03, -1.5, 2.5]], dtype=torch.float64)
    pruned, kept = sparsegpt(weight, hessian, NM(2, 4), damp=0.0)
    assert kept.tolist() == [[False, False, True, True]] * 2
    expected = _least_squares(weight, inputs, kept)
    assert torch.allclose(pruned, expected, atol=1e-10)
    assert not torch.allclose(pruned, weight * kept)  # the kept weights did move


def _naive_sparsegpt(weight, hessian, pattern, damp, mask=None):
    """Column by column OBS with one matrix inverse per column, row by row, no blocks."""
    weight = weight.clone()
    hessian = hessian + damp * torch.diagonal(hessian).mean() * torch.eye(len(hessian),
                                                                         dtype=hessian.dtype)
    rows, columns = weight.shape
    chosen = torch.zeros_like(weight, dtype=torch.bool) if mask is None else mask.clone()
    for j in range(columns):
        rest_inverses = [torch.linalg.inv(hessian[k:, k:]) for k in range(j, columns)]
        if mask is None and j % pattern.m == 0:
            for row in range(rows):
                saliency = [weight[row, k] ** 2 / rest_inverses[k - j][0, 0]
                            for k in range(j, j + pattern.m)]
                best = sorted(range(pattern.m), key=lambda i: (-float(saliency[i]), i))
                for i in best[:pattern.n]:
                    chosen[row, j + i] = True
        inverse = rest_inverses[0]
        for row in range(rows):
            if not chosen[row, j]:
                weight[row, j:] -= weight[row, j] * inverse[:, 0] / inverse[0, 0]
                weight[row, j] = 0.0
    return weight, chosen


def _random_problem(rows, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3 * columns, columns, generator=generator, dtype=torch.float64)
    inputs = inputs @ torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    return weight, 2 * inputs.t() @ inputs / inputs.shape[0]


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(4, 8)])
@pytest.mark.parametrize("blocksize", [8, 16, 128])
def test_blocked_sweep_equals_the_naive_loop_for_nm(pattern, blocksize):
    weight, hessian = _random_problem(5, 16, seed=blocksize + pattern.m)
    pruned, kept = sparsegpt(weight, hessian, pattern, blocksize=blocksize, damp=0.01)
    expected, expected_mask = _naive_sparsegpt(weight, hessian, pattern, damp=0.01)
    assert torch.equal(kept, expected_mask)
    assert torch.allclose(pruned, expected, atol=1e-9)
    assert pattern.violations(pruned).ok


def test_blocked_sweep_equals_the_naive_loop_for_a_given_mask():
    weight, hessian = _random_problem(4, 12, seed=3)
    mask = torch.rand(4, 12, generator=torch.Generator().manual_seed(4)) > 0.5
    pruned, kept = sparsegpt(weight, hessian, Unstructured(0.5), blocksize=5, damp=0.1,
                             mask=mask)
    expected, _ = _naive_sparsegpt(weight, hessian, NM(1, 2), damp=0.1, mask=mask)
    assert torch.equal(kept, mask)
    assert torch.allclose(pruned, expected, atol=1e-9)


def test_unstructured_keeps_at_most_the_density_per_block():
    weight, hessian = _random_problem(6, 20, seed=5)
    pruned, kept = sparsegpt(weight.float(), hessian.float(), Unstructured(0.5), blocksize=8)
    # blocks of 8, 8 and 4 columns keep floor(0.5 * 6 * width) each: 24 + 24 + 12
    assert int(kept.sum()) == 60
    assert torch.equal(pruned != 0, kept & (pruned != 0))


def test_reconstruction_beats_masking_alone():
    weight, hessian = _random_problem(8, 32, seed=6)
    pruned, kept = sparsegpt(weight, hessian, NM(2, 4))

    def loss(candidate):
        delta = weight - candidate
        return float(torch.einsum("ri,ij,rj->", delta, hessian, delta))

    assert loss(pruned) < loss(weight * kept)


def test_dead_inputs_get_zero_weight_and_no_error():
    weight, hessian = _random_problem(3, 8, seed=7)
    hessian[2, :] = 0
    hessian[:, 2] = 0
    pruned, _ = sparsegpt(weight, hessian, NM(2, 4))
    assert torch.all(pruned[:, 2] == 0)
    assert torch.isfinite(pruned).all()


def test_a_hessian_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        sparsegpt(torch.randn(2, 8), torch.eye(4), NM(2, 4))


@pytest.mark.parametrize("blocksize", [3, 8, 128])
def test_unstructured_sweep_equals_the_naive_loop_given_its_mask(blocksize):
    # The mask is chosen per block of columns; given that mask, the weights must be the
    # column-by-column OBS result (blocks that do not divide the width included).
    weight, hessian = _random_problem(6, 20, seed=8)
    pruned, kept = sparsegpt(weight, hessian, Unstructured(0.5), blocksize=blocksize)
    expected, _ = _naive_sparsegpt(weight, hessian, NM(1, 2), damp=0.01, mask=kept)
    assert torch.allclose(pruned, expected, atol=1e-9)
    assert torch.all(pruned[~kept] == 0)


def test_statistics_are_the_same_only_bit_for_bit():
    from nmsparse.oneshot.statistics import InputHessian, InputNorms

    rows = torch.randn(10, 4, generator=torch.Generator().manual_seed(9))
    first, second, other = InputHessian(4), InputHessian(4), InputHessian(4)
    first.add(rows)
    second.add(rows.clone())
    other.add(rows * 1.0001)
    assert first.same_as(second) and not first.same_as(other)
    assert not first.same_as(InputHessian(4))  # nothing seen yet
    norms = InputNorms(4)
    norms.add(rows)
    assert not norms.same_as(first)
    zero, negative_zero = InputNorms(1), InputNorms(1)
    zero.add(torch.zeros(1, 1))
    negative_zero.add(torch.zeros(1, 1))
    negative_zero.sum_squares = -negative_zero.sum_squares  # -0.0 == 0.0 but not its bits
    assert not zero.same_as(negative_zero)
    calls = []
    assert first.derive("key", lambda: calls.append(1) or "value") == "value"
    assert first.derive("key", lambda: calls.append(1) or "other") == "value"
    assert calls == [1]


def test_the_pruner_overwrites_the_handed_over_hessian_and_gives_the_same_bits():
    from nmsparse.oneshot.sparsegpt import SparseGPT
    from nmsparse.oneshot.statistics import InputHessian

    generator = torch.Generator().manual_seed(10)
    inputs = torch.randn(64, 16, generator=generator)
    weight = torch.randn(6, 16, generator=generator)
    statistic = InputHessian(16)
    statistic.add(inputs)
    expected = sparsegpt(weight, statistic.matrix(), NM(2, 4))
    pruned, kept = SparseGPT().prune(weight, statistic, NM(2, 4))
    assert torch.equal(pruned.view(torch.int32), expected[0].view(torch.int32))
    assert torch.equal(kept, expected[1])
    assert statistic.hessian is None  # handed over: its memory went with the factor
    again, _ = SparseGPT().prune(weight, statistic, NM(2, 4))  # the derived factor serves
    assert torch.equal(again, pruned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_in_place_factor_has_the_bits_of_the_three_plain_calls(dtype, symmetric):
    from nmsparse.oneshot.sparsegpt import inverse_hessian_factor

    inputs = torch.randn(96, 24, generator=torch.Generator().manual_seed(11), dtype=dtype)
    hessian = inputs.t() @ inputs
    hessian = (hessian + hessian.t()) / 2  # bit-symmetric
    if not symmetric:  # one entry off by its last bit: the transposed layout would differ
        hessian[0, 1] = torch.nextafter(hessian[0, 1], torch.tensor(math.inf, dtype=dtype))
    damped = hessian.clone()
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                     upper=True)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for overwrite in (False, True):
        given = hessian.clone()
        upper, _ = inverse_hessian_factor(given, 0.01, overwrite=overwrite)
        assert torch.equal(upper.contiguous().view(bits), expected.view(bits))
        assert torch.equal(given, hessian) != overwrite  # overwritten only when given up


def test_a_hessian_that_is_not_positive_definite_is_one_clear_error():
    from nmsparse.oneshot.sparsegpt import inverse_hessian_factor

    with pytest.raises(ValueError, match="not positive definite with damp=0"):
        inverse_hessian_factor(-torch.eye(4), 0.0)
