"""Tests for nmsparse.engine.masks: nm_mask keeps the N largest |w| of every M-group.

Golden masks below are worked out by hand; the random tests compare against a deliberately
naive loop-based reference (`reference_mask`) written here, not against nmsparse itself.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmsparse
from nmsparse.engine.masks import kept_per_group, nm_mask

T, F = True, False
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]


def b(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def w(rows: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# ----------------------------------------------------------------------------- reference


def _linear(idx: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Row-major (C order) linear index of ``idx`` in a tensor of ``shape``."""
    out = 0
    for i, size in zip(idx, shape, strict=True):
        out = out * size + i
    return out


def reference_groups(shape: tuple[int, ...], m: int, layout: str) -> list[list[int]]:
    """Every M-group as a list of row-major linear indices, in group order."""
    groups = []
    if layout == "in":
        kernel_positions = list(itertools.product(*(range(k) for k in shape[2:])))
        for o in range(shape[0]):
            for kpos in kernel_positions:
                for g in range(shape[1] // m):
                    groups.append([_linear((o, g * m + j, *kpos), shape) for j in range(m)])
    else:
        row = math.prod(shape[1:])
        for o in range(shape[0]):
            for g in range(row // m):
                groups.append([o * row + g * m + j for j in range(m)])
    return groups


def reference_mask(weight: torch.Tensor, n: int, m: int, layout: str = "in") -> torch.Tensor:
    """Loop over groups, sort (-|w|, position) and keep the first n."""
    shape = tuple(weight.shape)
    values = weight.detach().cpu().to(torch.float64).flatten().tolist()  # exact for all dtypes
    keep = [False] * len(values)
    for group in reference_groups(shape, m, layout):
        ranked = sorted((-abs(values[i]), pos) for pos, i in enumerate(group))
        for _, pos in ranked[:n]:
            keep[group[pos]] = True
    return torch.tensor(keep, dtype=torch.bool).reshape(shape)


def test_reference_itself_on_a_tiny_case() -> None:
    # sanity check of the test helper, so a bug in it cannot mask a bug in nmsparse
    weight = w([[3, 1, 3, 3, -1, -2, 0, 4]])
    assert torch.equal(reference_mask(weight, 2, 4), b([[T, F, T, F, F, T, F, T]]))
    assert reference_groups((1, 4, 1, 2), 4, "in") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert reference_groups((1, 4, 1, 2), 4, "flat") == [[0, 1, 2, 3], [4, 5, 6, 7]]


# ----------------------------------------------------------------------------- golden masks


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_golden_linear_2x8_distinct(dtype: torch.dtype) -> None:
    weight = w(
        [
            [0.125, -0.875, 0.5, 0.25, 0.75, 0.1875, -0.8125, 0.0625],
            [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0],
        ],
        dtype,
    )
    expected = b(
        [
            [F, T, T, F, T, F, T, F],
            [T, T, F, F, F, F, T, T],
        ]
    )
    mask = nm_mask(weight, 2, 4)
    assert mask.dtype == torch.bool
    assert mask.shape == weight.shape
    assert torch.equal(mask, expected)
    assert torch.equal(nmsparse.nm_mask(weight, 2, 4, layout="in"), expected)
    # a Linear weight has no kernel dims: both layouts group the same entries
    assert torch.equal(nm_mask(weight, 2, 4, layout="flat"), expected)


@pytest.mark.parametrize(
    ("row", "n", "m", "expected"),
    [
        # magnitude counts, not sign
        ([-5, 1, -3, 2], 2, 4, [T, F, T, F]),
        ([-1, -2, -3, -4], 2, 4, [F, F, T, T]),
        ([-4, -3, -2, -1], 1, 4, [T, F, F, F]),
        ([1, -10, 2, 3], 1, 4, [F, T, F, F]),
        ([1, -10, 2, 3], 3, 4, [F, T, T, T]),
        # all ties: first N kept
        ([7, 7, 7, 7], 2, 4, [T, T, F, F]),
        ([-7, 7, -7, 7], 2, 4, [T, T, F, F]),
        ([7, 7, 7, 7], 1, 4, [T, F, F, F]),
        ([7, 7, 7, 7], 3, 4, [T, T, T, F]),
        ([-2, -2, -2, -2], 3, 4, [T, T, T, F]),
        # all zero: first N kept
        ([0, 0, 0, 0], 2, 4, [T, T, F, F]),
        ([0.0, -0.0, 0.0, -0.0], 2, 4, [T, T, F, F]),
        ([-0.0, -0.0, -0.0, -0.0], 1, 4, [T, F, F, F]),
        ([0, 0, 0, 0], 3, 4, [T, T, T, F]),
        # partial ties: lower index wins
        ([3, 1, 3, 3], 2, 4, [T, F, T, F]),
        ([1, 3, 3, 3], 2, 4, [F, T, T, F]),
        ([1, 3, -3, 3], 2, 4, [F, T, T, F]),
        ([3, 3, 1, 3], 1, 4, [T, F, F, F]),
        ([1, 3, 1, 3], 1, 4, [F, T, F, F]),
        ([5, 1, 5, 1], 3, 4, [T, T, T, F]),
        ([1, 5, 1, 5], 3, 4, [T, T, F, T]),
        ([0, 0, 2, 0], 2, 4, [T, F, T, F]),
        ([0, -0.0, 2, 0], 2, 4, [T, F, T, F]),
        ([2, 0, 0, 2], 2, 4, [T, F, F, T]),
        ([9, 4, 4, 4], 2, 4, [T, T, F, F]),
        ([4, 4, 4, 9], 2, 4, [T, F, F, T]),
        # 1:4, 3:4 with distinct values
        ([0.2, -0.4, 0.3, 0.1], 1, 4, [F, T, F, F]),
        ([0.2, -0.4, 0.3, 0.1], 3, 4, [T, T, T, F]),
        ([0.1, 0.2, 0.3, 0.4], 3, 4, [F, T, T, T]),
        # 1:2
        ([1, 2], 1, 2, [F, T]),
        ([2, 2], 1, 2, [T, F]),
        ([-3, 2], 1, 2, [T, F]),
        # 1:8, 4:8
        ([1, 2, 3, 4, 5, 6, 7, -8], 1, 8, [F, F, F, F, F, F, F, T]),
        ([0, 2, 0, -2, 1, 0, 0, 2], 1, 8, [F, T, F, F, F, F, F, F]),
        ([0, 0, 0, 0, 0, 0, 0, 0], 1, 8, [T, F, F, F, F, F, F, F]),
        ([0.5, -3, 2, 0, 1, -4, 0.25, 3], 4, 8, [F, T, T, F, F, T, F, T]),
        ([1, 1, 1, 1, 1, 1, 1, 1], 4, 8, [T, T, T, T, F, F, F, F]),
        ([1, 2, 1, 2, 1, 2, 1, 1], 4, 8, [T, T, F, T, F, T, F, F]),
        ([1, 1, 1, 1, 1, 1, 1, 2], 4, 8, [T, T, T, F, F, F, F, T]),
        ([8, 7, 6, 5, 4, 3, 2, 1], 7, 8, [T, T, T, T, T, T, T, F]),
        ([1, 1, 1, 1, 1, 1, 1, 1], 7, 8, [T, T, T, T, T, T, T, F]),
        # 2:16 and other M=16 cases (more than 8 per group)
        (
            [0.1, 0.2, -0.3, -9, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 8, 1.2, 1.3, 1.4],
            2, 16,
            [F, F, F, T, F, F, F, F, F, F, F, F, T, F, F, F],
        ),
        ([1] * 16, 2, 16, [T, T] + [F] * 14),
        ([0] * 16, 2, 16, [T, T] + [F] * 14),
        (
            [0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, -5, 0, 0],
            2, 16,
            [F, T, F, F, F, F, F, F, F, F, T, F, F, F, F, F],
        ),
        (
            [0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, -5, 0, 0],
            5, 16,
            [T, T, T, F, F, F, F, F, F, F, T, F, F, T, F, F],
        ),
        (
            list(range(16)),
            4, 16,
            [F] * 12 + [T] * 4,
        ),
        (
            [-x for x in range(16, 0, -1)],
            1, 16,
            [T] + [F] * 15,
        ),
        ([2] * 16, 15, 16, [T] * 15 + [F]),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_golden_single_group(row: list, n: int, m: int, expected: list,
                             dtype: torch.dtype) -> None:
    weight = w([row], dtype)
    assert torch.equal(nm_mask(weight, n, m), b([expected]))
    assert torch.equal(nm_mask(weight, n, m, layout="flat"), b([expected]))
    # the same group repeated in several rows and groups gives the same answer everywhere
    tiled = weight.repeat(3, 2)
    assert torch.equal(nm_mask(tiled, n, m), b([expected]).repeat(3, 2))


def test_golden_conv_in_versus_flat() -> None:
    # weight (out=1, in=4, kh=1, kw=2); w[0, c, 0, :] for c = 0..3
    weight = torch.tensor([[[[1.0, 8.0]], [[2.0, 7.0]], [[3.0, 6.0]], [[4.0, 5.0]]]])
    assert weight.shape == (1, 4, 1, 2)
    # layout "in": groups along c at each kernel position
    #   kw=0: [1, 2, 3, 4] -> keep c2, c3;  kw=1: [8, 7, 6, 5] -> keep c0, c1
    expected_in = b([[[[F, T]], [[F, T]], [[T, F]], [[T, F]]]])
    # layout "flat": the row in memory order is [1, 8, 2, 7 | 3, 6, 4, 5]
    #   [1, 8, 2, 7] -> keep 8, 7;  [3, 6, 4, 5] -> keep 6, 5
    expected_flat = b([[[[F, T]], [[F, T]], [[F, T]], [[F, T]]]])
    assert torch.equal(nm_mask(weight, 2, 4), expected_in)
    assert torch.equal(nm_mask(weight, 2, 4, layout="in"), expected_in)
    assert torch.equal(nm_mask(weight, 2, 4, layout="flat"), expected_flat)
    assert not torch.equal(expected_in, expected_flat)


def test_golden_conv1d_3d() -> None:
    # weight (out=2, in=4, k=3): w[o, c, :]
    weight = torch.tensor(
        [
            [[1.0, 0.0, 5.0], [2.0, 0.0, -1.0], [-3.0, 0.0, 4.0], [0.5, 0.0, 2.0]],
            [[-1.0, 2.0, 3.0], [1.0, 2.0, 1.0], [1.0, -2.0, 3.0], [-1.0, 2.0, 3.0]],
        ]
    )
    # layout "in", out 0:  k0 [1, 2, -3, .5] -> c1, c2;  k1 all 0 -> c0, c1;
    #                      k2 [5, -1, 4, 2] -> c0, c2
    #              out 1:  k0 |1| ties -> c0, c1;  k1 |2| ties -> c0, c1;  k2 [3, 1, 3, 3] -> c0, c2
    expected_in = b(
        [
            [[F, T, T], [T, T, F], [T, F, T], [F, F, F]],
            [[T, T, T], [T, T, F], [F, F, T], [F, F, F]],
        ]
    )
    # layout "flat", out 0 row: [1, 0, 5, 2 | 0, -1, -3, 0 | 4, .5, 0, 2]
    #   -> [F F T T | F T T F | T F F T]
    # out 1 row: [-1, 2, 3, 1 | 2, 1, 1, -2 | 3, -1, 2, 3]
    #   -> [F T T F | T F F T | T F F T]
    expected_flat = b(
        [
            [[F, F, T], [T, F, T], [T, F, T], [F, F, T]],
            [[F, T, T], [F, T, F], [F, T, T], [F, F, T]],
        ]
    )
    assert torch.equal(nm_mask(weight, 2, 4), expected_in)
    assert torch.equal(nm_mask(weight, 2, 4, layout="flat"), expected_flat)


def test_golden_conv3d_5d() -> None:
    # weight (out=1, in=4, kd=1, kh=2, kw=2) at 1:4
    weight = torch.zeros(1, 4, 1, 2, 2)
    weight[0, :, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight[0, :, 0, 0, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    weight[0, :, 0, 1, 0] = torch.tensor([0.0, -9.0, 0.0, 0.0])
    weight[0, :, 0, 1, 1] = torch.tensor([5.0, 5.0, -5.0, 5.0])
    # layout "in": keep c3, c0, c1, c0 (tie -> lowest) at the four kernel positions
    expected_in = torch.zeros(1, 4, 1, 2, 2, dtype=torch.bool)
    expected_in[0, 3, 0, 0, 0] = True
    expected_in[0, 0, 0, 0, 1] = True
    expected_in[0, 1, 0, 1, 0] = True
    expected_in[0, 0, 0, 1, 1] = True
    assert torch.equal(nm_mask(weight, 1, 4), expected_in)
    # layout "flat": the row is c-major, so each group is one channel's 2x2 kernel:
    #   c0 [1, 4, 0, 5] -> idx 3;  c1 [2, 3, -9, 5] -> idx 2;
    #   c2 [3, 2, 0, -5] -> idx 3; c3 [4, 1, 0, 5] -> idx 3
    expected_flat = torch.zeros(1, 4, 1, 2, 2, dtype=torch.bool)
    expected_flat[0, 0, 0, 1, 1] = True
    expected_flat[0, 1, 0, 1, 0] = True
    expected_flat[0, 2, 0, 1, 1] = True
    expected_flat[0, 3, 0, 1, 1] = True
    assert torch.equal(nm_mask(weight, 1, 4, layout="flat"), expected_flat)


def test_golden_conv2d_along_in_with_8_channels() -> None:
    # weight (out=2, in=8, kh=1, kw=1) at 2:4 is a Linear (2, 8) in disguise
    lin = w([[0.1, 0.9, -0.5, 0.3, 6.0, 6.0, -6.0, 1.0], [0, 0, 0, 0, 1, 2, 3, 4]])
    expected = b([[F, T, T, F, T, T, F, F], [T, T, F, F, F, F, T, T]])
    conv = lin[:, :, None, None]
    assert torch.equal(nm_mask(conv, 2, 4), expected[:, :, None, None])
    assert torch.equal(nm_mask(conv, 2, 4, layout="flat"), expected[:, :, None, None])


def test_golden_layout_in_with_two_groups_per_kernel_position() -> None:
    # weight (out=1, in=8, k=2) at 1:4: at each k there are two groups of 4 channels
    weight = torch.zeros(1, 8, 2)
    weight[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0])
    weight[0, :, 1] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -2.0, 0.0])
    expected = torch.zeros(1, 8, 2, dtype=torch.bool)
    expected[0, 3, 0] = expected[0, 4, 0] = True
    expected[0, 0, 1] = expected[0, 6, 1] = True
    assert torch.equal(nm_mask(weight, 1, 4), expected)


def test_golden_kept_per_group() -> None:
    weight = w([[1, 0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 2, -3, 4, 5]])
    assert kept_per_group(weight, 4).tolist() == [[1, 3], [0, 4]]
    assert kept_per_group(weight, 4, "flat").tolist() == [[1, 3], [0, 4]]
    assert kept_per_group(weight, 2).tolist() == [[1, 0, 2, 1], [0, 0, 2, 2]]
    mask = b([[T, T, F, F, F, F, T, T], [F, T, F, T, T, F, F, F]])
    assert kept_per_group(mask, 4).tolist() == [[2, 2], [2, 1]]
    assert kept_per_group(mask, 8).tolist() == [[4], [3]]


def test_golden_kept_per_group_conv_layouts() -> None:
    # weight (out=1, in=4, kh=1, kw=2): the non-zeros are all at kw=0
    weight = torch.zeros(1, 4, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    # "in": one group per kernel position -> 3 at kw=0, 0 at kw=1
    counts_in = kept_per_group(weight, 4, "in")
    assert counts_in.numel() == 2
    assert sorted(counts_in.flatten().tolist()) == [0, 3]
    # "flat": row [1, 0, 2, 0 | 3, 0, 0, 0] -> 2 and 1
    assert kept_per_group(weight, 4, "flat").tolist() == [[2, 1]]


# ----------------------------------------------------------------------------- random cases

VALUE_KINDS = ["normal", "ties3", "ties5", "rounded", "sparse", "constant"]


def make_values(shape: tuple[int, ...], kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        values = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "ties3":  # {-1, 0, 1}
        values = torch.randint(-1, 2, shape, generator=g).double()
    elif kind == "ties5":  # {-2, -1, 0, 1, 2}
        values = torch.randint(-2, 3, shape, generator=g).double()
    elif kind == "rounded":
        values = torch.round(torch.randn(shape, generator=g, dtype=torch.float64) * 2) / 2
    elif kind == "sparse":  # mostly zeros
        values = torch.randn(shape, generator=g, dtype=torch.float64)
        values = values * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.3)
    else:
        values = torch.full(shape, -0.75, dtype=torch.float64)
    return values.to(dtype)


@st.composite
def nm_patterns(draw: st.DrawFn) -> tuple[int, int]:
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m - 1))
    return n, m


@st.composite
def shapes_for(draw: st.DrawFn, m: int, layout: str) -> tuple[int, ...]:
    ndim = draw(st.integers(2, 5))
    out = draw(st.integers(1, 3))
    if layout == "in":
        cin = m * draw(st.integers(1, 3))
        kernel = [draw(st.integers(1, 3)) for _ in range(ndim - 2)]
        return (out, cin, *kernel)
    rest = [draw(st.integers(1, 5)) for _ in range(ndim - 1)]
    rest[-1] *= m // math.gcd(math.prod(rest), m)  # make the row size divisible by M
    return (out, *rest)


@st.composite
def weight_cases(draw: st.DrawFn, dtypes: list[torch.dtype] = DTYPES):
    n, m = draw(nm_patterns())
    layout = draw(st.sampled_from(["in", "flat"]))
    shape = draw(shapes_for(m, layout))
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(VALUE_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_values(shape, kind, seed, dtype), n, m, layout


@settings(max_examples=200, deadline=None)
@given(case=weight_cases())
def test_matches_reference(case) -> None:
    weight, n, m, layout = case
    mask = nm_mask(weight, n, m, layout=layout)
    expected = reference_mask(weight, n, m, layout)
    assert mask.dtype == torch.bool
    assert mask.shape == weight.shape
    assert torch.equal(mask, expected), (weight, n, m, layout, mask, expected)


@pytest.mark.parametrize("layout", ["in", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (3, 4), (1, 8), (4, 8), (2, 16), (8, 16)])
@pytest.mark.parametrize("kind", ["normal", "ties3"])
def test_matches_reference_on_a_conv_grid(layout: str, dtype: torch.dtype, n: int, m: int,
                                          kind: str) -> None:
    weight = make_values((3, 2 * m, 3, 2), kind, seed=n * 100 + m, dtype=dtype)
    assert torch.equal(nm_mask(weight, n, m, layout=layout), reference_mask(weight, n, m, layout))


@settings(max_examples=100, deadline=None)
@given(case=weight_cases())
def test_exactly_n_kept_per_group(case) -> None:
    weight, n, m, layout = case
    mask = nm_mask(weight, n, m, layout=layout)
    counts = kept_per_group(mask, m, layout)
    assert counts.numel() == weight.numel() // m
    assert bool((counts == n).all()), counts
    assert int(mask.sum()) == weight.numel() * n // m
    # independent count over the reference grouping
    flat = mask.flatten().tolist()
    for group in reference_groups(tuple(weight.shape), m, layout):
        assert sum(flat[i] for i in group) == n


@settings(max_examples=100, deadline=None)
@given(case=weight_cases())
def test_kept_dominate_pruned(case) -> None:
    weight, n, m, layout = case
    mask = nm_mask(weight, n, m, layout=layout).flatten().tolist()
    mags = weight.double().abs().flatten().tolist()
    for group in reference_groups(tuple(weight.shape), m, layout):
        kept = [(mags[i], pos) for pos, i in enumerate(group) if mask[i]]
        pruned = [(mags[i], pos) for pos, i in enumerate(group) if not mask[i]]
        assert min(v for v, _ in kept) >= max(v for v, _ in pruned)
        # on a tie across the boundary the kept entry has the lower index
        for kv, kpos in kept:
            for pv, ppos in pruned:
                if kv == pv:
                    assert kpos < ppos


@settings(max_examples=100, deadline=None)
@given(case=weight_cases(), sign_seed=st.integers(0, 2**31 - 1))
def test_invariant_to_sign_flips(case, sign_seed: int) -> None:
    weight, n, m, layout = case
    g = torch.Generator().manual_seed(sign_seed)
    signs = torch.randint(0, 2, weight.shape, generator=g).to(weight.dtype) * 2 - 1
    flipped = weight * signs
    assert torch.equal(flipped.abs(), weight.abs())
    base = nm_mask(weight, n, m, layout=layout)
    assert torch.equal(nm_mask(flipped, n, m, layout=layout), base)
    assert torch.equal(nm_mask(-weight, n, m, layout=layout), base)


@settings(max_examples=60, deadline=None)
@given(case=weight_cases())
def test_deterministic(case) -> None:
    weight, n, m, layout = case
    first = nm_mask(weight, n, m, layout=layout)
    for _ in range(3):
        assert torch.equal(nm_mask(weight, n, m, layout=layout), first)
    assert torch.equal(nm_mask(weight.clone(), n, m, layout=layout), first)


@settings(max_examples=100, deadline=None)
@given(case=weight_cases(), k=st.integers(0, 8))
def test_invariant_to_positive_power_of_two_scale(case, k: int) -> None:
    # scaling up by 2**k is exact in every float dtype (no overflow at these magnitudes),
    # so the ordering, ties included, is unchanged
    weight, n, m, layout = case
    scaled = weight * (2.0**k)
    assert torch.equal(scaled / (2.0**k), weight)
    assert torch.equal(nm_mask(scaled, n, m, layout=layout), nm_mask(weight, n, m, layout=layout))


@settings(max_examples=60, deadline=None)
@given(case=weight_cases(dtypes=[torch.float64]), scale=st.sampled_from([3.0, 0.1, 7.25, 1e-3,
                                                                          123.456]))
def test_invariant_to_positive_scale_on_exact_integers(case, scale: float) -> None:
    # integer-valued fp64 weights times a positive scale: products stay correctly ordered and
    # ties stay ties (|a| = |b| gives identical products)
    weight, n, m, layout = case
    weight = torch.round(weight * 4)
    base = nm_mask(weight, n, m, layout=layout)
    assert torch.equal(nm_mask(weight * scale, n, m, layout=layout), base)


@settings(max_examples=60, deadline=None)
@given(case=weight_cases(dtypes=[torch.float32]))
def test_same_mask_in_every_dtype_when_values_are_exact(case) -> None:
    weight, n, m, layout = case
    # multiples of 1/8 below 16 are exact in fp16, bf16, fp32 and fp64
    weight = torch.clamp(torch.round(weight * 8), -127, 127) / 8
    base = nm_mask(weight, n, m, layout=layout)
    for dtype in DTYPES:
        assert torch.equal(nm_mask(weight.to(dtype), n, m, layout=layout), base), dtype


@settings(max_examples=40, deadline=None)
@given(case=weight_cases(dtypes=[torch.float32]))
def test_rows_are_independent(case) -> None:
    weight, n, m, layout = case
    mask = nm_mask(weight, n, m, layout=layout)
    for o in range(weight.shape[0]):
        assert torch.equal(nm_mask(weight[o:o + 1], n, m, layout=layout), mask[o:o + 1])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((4, 6), "in"),
        ((4, 6), "flat"),
        ((2, 2), "in"),
        ((3, 10), "in"),
        ((4, 3, 3, 3), "in"),
        ((4, 3, 3, 3), "flat"),
        ((4, 2, 2, 1), "in"),  # in = 2 but the flat row (4) would divide
        ((2, 6, 5), "in"),
        ((2, 1, 1, 1, 3), "flat"),
        ((2, 4, 1, 1, 3), "in"),
    ],
)
def test_not_divisible_raises_naming_shape(shape: tuple[int, ...], layout: str) -> None:
    m = 8 if shape == (2, 4, 1, 1, 3) else 4
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        nm_mask(torch.randn(shape), 2, m, layout=layout)
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.randn(shape), 2, m, layout=layout)


def test_divisibility_depends_on_layout() -> None:
    weight = torch.randn(4, 2, 2, 1)  # in = 2, flat row = 4
    with pytest.raises(ValueError, match=re.escape("(4, 2, 2, 1)")):
        nm_mask(weight, 2, 4, layout="in")
    mask = nm_mask(weight, 2, 4, layout="flat")
    assert torch.equal(mask, reference_mask(weight, 2, 4, "flat"))


@pytest.mark.parametrize("shape", [(8,), (16,), (1, 4, 1, 1, 1, 1), (2, 4, 2, 2, 2, 2)])
@pytest.mark.parametrize("layout", ["in", "flat"])
def test_bad_rank_raises(shape: tuple[int, ...], layout: str) -> None:
    with pytest.raises(ValueError, match=f"{len(shape)}-D"):
        nm_mask(torch.randn(shape), 2, 4, layout=layout)


def test_scalar_raises() -> None:
    with pytest.raises(ValueError):
        nm_mask(torch.tensor(1.0), 2, 4)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
)
def test_non_floating_raises(dtype: torch.dtype) -> None:
    weight = torch.ones(2, 8).to(dtype)
    with pytest.raises(ValueError, match="floating"):
        nm_mask(weight, 2, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["in", "flat"])
def test_nonfinite_raises(bad: float, dtype: torch.dtype, layout: str) -> None:
    weight = torch.randn(2, 3, 8, 1).to(dtype).transpose(1, 2)  # (2, 8, 3, 1)
    weight = weight.contiguous()
    weight[1, 5, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(weight, 2, 4, layout=layout)


@pytest.mark.parametrize(
    ("n", "m"),
    [(4, 2), (0, 4), (4, 4), (-1, 4), (5, 4), (2.0, 4), (2, 4.0), (True, 4), ("2", 4), (None, 4)],
    ids=repr,
)
def test_invalid_pattern_raises(n: object, m: object) -> None:
    with pytest.raises(ValueError, match="accepted"):
        nm_mask(torch.randn(4, 8), n, m)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["out", "IN", "Flat", "", "row", None, 1])
def test_unknown_layout_raises(layout: object) -> None:
    with pytest.raises(ValueError, match=r"'in'.*'flat'"):
        nm_mask(torch.randn(4, 8), 2, 4, layout=layout)  # type: ignore[arg-type]


def test_kept_per_group_errors() -> None:
    with pytest.raises(ValueError, match=re.escape("(4, 6)")):
        kept_per_group(torch.ones(4, 6), 4)
    with pytest.raises(ValueError, match=r"'in'.*'flat'"):
        kept_per_group(torch.ones(4, 8), 4, "rows")


# ----------------------------------------------------------------------------- tensor hygiene


@pytest.mark.parametrize("layout", ["in", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_does_not_modify_input(layout: str, dtype: torch.dtype) -> None:
    weight = torch.randn(4, 8, 3, 3).to(dtype)
    before = weight.clone()
    version = weight._version
    nm_mask(weight, 2, 4, layout=layout)
    assert torch.equal(weight, before)
    assert weight._version == version
    assert weight.dtype == dtype


def test_parameter_with_grad() -> None:
    param = torch.nn.Parameter(torch.randn(6, 16))
    before = param.detach().clone()
    mask = nm_mask(param, 2, 4)
    assert mask.dtype == torch.bool
    assert not mask.requires_grad
    assert param.grad is None
    assert torch.equal(param.detach(), before)
    assert torch.equal(mask, reference_mask(before, 2, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_returns_bool_of_same_shape_and_device(dtype: torch.dtype) -> None:
    weight = torch.randn(3, 8, 2).to(dtype)
    mask = nm_mask(weight, 1, 4)
    assert mask.dtype == torch.bool
    assert mask.shape == weight.shape
    assert mask.device == weight.device


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["in", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8), (2, 16)])
def test_cuda_matches_cpu(layout: str, dtype: torch.dtype, n: int, m: int) -> None:
    weight = make_values((8, 2 * m, 3, 3), "ties5", seed=7, dtype=dtype)
    mask = nm_mask(weight.cuda(), n, m, layout=layout)
    assert mask.device == weight.cuda().device
    assert mask.dtype == torch.bool
    assert torch.equal(mask.cpu(), reference_mask(weight, n, m, layout))


@pytest.mark.parametrize("layout", ["in", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_transposed_view(layout: str, dtype: torch.dtype) -> None:
    base = make_values((16, 6), "ties5", seed=3, dtype=dtype)
    weight = base.t()  # (6, 16), not contiguous
    assert not weight.is_contiguous()
    mask = nm_mask(weight, 2, 4, layout=layout)
    assert torch.equal(mask, nm_mask(weight.contiguous(), 2, 4, layout=layout))
    assert torch.equal(mask, reference_mask(weight, 2, 4, layout))
    assert torch.equal(base, weight.t())  # untouched


@pytest.mark.parametrize("layout", ["in", "flat"])
def test_other_non_contiguous_views(layout: str) -> None:
    # a strided slice
    big = make_values((3, 16, 4), "rounded", seed=5, dtype=torch.float32)
    view = big[:, ::2, 1:3]  # (3, 8, 2)
    assert not view.is_contiguous()
    assert torch.equal(nm_mask(view, 2, 4, layout=layout),
                       nm_mask(view.contiguous(), 2, 4, layout=layout))
    # a permuted conv weight
    perm = make_values((2, 3, 8, 4), "normal", seed=6, dtype=torch.float32).permute(0, 2, 3, 1)
    assert not perm.is_contiguous()
    assert torch.equal(nm_mask(perm, 1, 4, layout=layout),
                       reference_mask(perm.contiguous(), 1, 4, layout))
    # an expanded (stride-0) weight
    expanded = make_values((1, 8), "normal", seed=8, dtype=torch.float32).expand(4, 8)
    assert torch.equal(nm_mask(expanded, 2, 4, layout=layout),
                       nm_mask(expanded.contiguous(), 2, 4, layout=layout))


@pytest.mark.parametrize("layout", ["in", "flat"])
def test_channels_last_matches_contiguous(layout: str) -> None:
    # "memory order" for layout flat means the weight's logical row-major order; a channels_last
    # copy of the same weight must get the same mask as its contiguous copy
    weight = make_values((4, 8, 3, 3), "ties5", seed=9, dtype=torch.float32)
    cl = weight.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert torch.equal(nm_mask(cl, 2, 4, layout=layout), nm_mask(weight, 2, 4, layout=layout))
    assert torch.equal(nm_mask(cl, 2, 4, layout=layout), reference_mask(weight, 2, 4, layout))


def test_kept_per_group_on_weight_counts_nonzeros() -> None:
    weight = make_values((3, 16, 2, 2), "sparse", seed=11, dtype=torch.float32)
    for layout in ("in", "flat"):
        counts = kept_per_group(weight, 4, layout)
        nz = (weight != 0).flatten().tolist()
        expected = sorted(sum(nz[i] for i in g)
                          for g in reference_groups(tuple(weight.shape), 4, layout))
        assert sorted(counts.flatten().tolist()) == expected
        assert int(counts.sum()) == int((weight != 0).sum())
    pruned = weight * nm_mask(weight, 1, 4)
    assert bool((kept_per_group(pruned, 4) <= 1).all())
