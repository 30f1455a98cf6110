"""The packed N:M format: golden bytes, exact round trips, sizes and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.engine.masks import nm_mask
from nmsparse.packing import (
    PackedWeight,
    index_width,
    pack,
    pack_positions,
    unpack,
    unpack_positions,
    unpack_rows,
)

INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float32: torch.int32, torch.float64: torch.int64}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT_VIEW[tensor.dtype])


def finalized(weight: torch.Tensor, n: int, m: int, layout: str = "in"):
    mask = nm_mask(weight.float(), n, m, layout)
    return weight.masked_fill(~mask, 0), mask


# --- golden bytes --------------------------------------------------------------------------


def test_golden_2_4():
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 4.0],
                           [5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 7.0, 8.0]])
    packed = pack(weight, 2, 4)
    assert packed.values.tolist() == [[1.5, -2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    # positions row 0: 1, 3, 0, 3 -> 0b11_00_11_01; row 1: 0, 1, 2, 3 -> 0b11_10_01_00
    assert packed.indices.dtype == torch.uint8
    assert packed.indices.tolist() == [[0b11001101], [0b11100100]]
    assert packed.shape == (2, 8) and packed.index_bits == 2
    assert torch.equal(unpack(packed), weight)


def test_golden_1_8_with_row_padding():
    weight = torch.zeros(2, 24)
    weight[0, 5], weight[0, 8 + 2], weight[0, 16 + 7] = 1.0, 2.0, 3.0
    weight[1, 7], weight[1, 8 + 0], weight[1, 16 + 4] = 4.0, 5.0, 6.0
    packed = pack(weight, 1, 8)
    assert packed.values.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    # 3 positions x 4 bits = 12 bits -> 2 bytes per row, the last high nibble zero
    assert packed.indices.tolist() == [[5 | 2 << 4, 7], [7 | 0 << 4, 4]]
    assert torch.equal(unpack(packed), weight)


def test_golden_2_16():
    weight = torch.zeros(1, 32, dtype=torch.float16)
    weight[0, 3], weight[0, 12], weight[0, 16], weight[0, 31] = 1.0, -1.0, 2.0, -2.0
    packed = pack(weight, 2, 16)
    assert packed.values.tolist() == [[1.0, -1.0, 2.0, -2.0]]
    assert packed.indices.tolist() == [[3 | 12 << 4, 0 | 15 << 4]]
    assert torch.equal(unpack(packed), weight)


def test_golden_1_bit_and_8_bit_widths():
    weight = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert pack(weight, 1, 2).indices.tolist() == [[0b1101]]  # positions 1, 0, 1, 1
    wide = torch.zeros(1, 64)
    wide[0, 31], wide[0, 32 + 17] = 1.0, 2.0
    assert pack(wide, 1, 32).indices.tolist() == [[31, 17]]


def test_golden_conv_in_layout():
    # (out=1, in=4, kh=1, kw=2): the groups run along `in` at each kernel position
    weight = torch.zeros(1, 4, 1, 2)
    weight[0, 1, 0, 0], weight[0, 2, 0, 0] = 1.0, 2.0
    weight[0, 0, 0, 1], weight[0, 3, 0, 1] = 3.0, 4.0
    packed = pack(weight, 2, 4)
    assert packed.values.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert packed.indices.tolist() == [[1 | 2 << 2], [0 | 3 << 2]]
    assert torch.equal(unpack(packed), weight)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 9, 16, 17, 200, 256])
def test_index_width(m):
    width = index_width(m)
    assert width in (1, 2, 4, 8) and 2**width >= m
    assert width == 1 or 2 ** (width // 2) < m


def test_positions_round_trip():
    positions = torch.randint(0, 16, (5, 7))
    packed = pack_positions(positions, 16)
    assert packed.shape == (5, 4)
    assert torch.equal(unpack_positions(packed, 16, 7), positions)


# --- round trips ---------------------------------------------------------------------------

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PATTERNS = ((1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (1, 16), (3, 16), (2, 6), (7, 32))


@st.composite
def weights(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    layout = draw(st.sampled_from(("in", "flat")))
    ndim = draw(st.integers(2, 5))
    out = draw(st.integers(1, 5))
    kernel = [draw(st.integers(1, 3)) for _ in range(ndim - 2)]
    if layout == "in":
        inp = m * draw(st.integers(1, 4))
    else:  # the row size must be divisible by m: make the `in` dim a multiple of it
        inp = m // math.gcd(m, math.prod(kernel)) * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    weight = torch.randn(out, inp, *kernel, generator=torch.Generator().manual_seed(seed))
    return weight.to(dtype), n, m, layout


@settings(max_examples=60, deadline=None)
@given(weights())
def test_round_trip_is_exact(case):
    weight, n, m, layout = case
    sparse, mask = finalized(weight, n, m, layout)
    packed = pack(sparse, n, m, layout, mask=mask)
    rows = weight.shape[0] * (math.prod(weight.shape[2:]) if layout == "in" else 1)
    slots = weight.numel() // m * n // rows
    assert packed.values.shape == (rows, slots) and packed.values.dtype == weight.dtype
    assert packed.indices.shape == (rows, -(-slots * index_width(m) // 8))
    back = unpack(packed)
    assert back.shape == weight.shape and back.dtype == weight.dtype
    assert torch.equal(bits(back), bits(sparse))  # bit for bit
    assert torch.equal(back, weight * mask)  # W * mask: equal values (-0.0 == +0.0)
    # the non-zero pattern gives the same packing when every group has N non-zeros
    if bool((sparse[mask] != 0).all()):
        again = pack(sparse, n, m, layout)
        assert torch.equal(bits(again.values), bits(packed.values))
        assert torch.equal(again.indices, packed.indices)


def test_round_trip_keeps_special_values_bit_exact():
    weight = torch.tensor([[float("nan"), -0.0, 0.0, 1.0],
                           [float("inf"), 0.0, float("-inf"), 0.0]], dtype=torch.float16)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    back = unpack(pack(weight, 2, 4, mask=mask))
    assert torch.equal(bits(back), bits(weight.masked_fill(~mask, 0)))
    assert bits(back)[0, 1].item() == bits(torch.tensor([-0.0], dtype=torch.float16)).item()


def test_mask_keeps_explicit_zeros_and_ignores_unmasked_values():
    weight = torch.tensor([[0.0, 9.0, 0.0, 2.0]])
    mask = torch.tensor([[True, False, False, True]])
    packed = pack(weight, 2, 4, mask=mask)
    assert packed.values.tolist() == [[0.0, 2.0]]
    assert torch.equal(unpack(packed), torch.tensor([[0.0, 0.0, 0.0, 2.0]]))


def test_unpack_rows_is_the_dense_linear_weight():
    sparse, mask = finalized(torch.randn(6, 32), 2, 8)
    packed = pack(sparse, 2, 8, mask=mask)
    assert torch.equal(unpack_rows(packed.values, packed.indices, 2, 8), sparse)


# --- the non-zero pattern path -------------------------------------------------------------


def test_short_groups_are_padded_with_their_first_zeros():
    weight = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 3.0]])
    packed = pack(weight, 2, 4)
    assert packed.values.tolist() == [[0.0, 5.0, 0.0, 0.0, 2.0, 3.0]]
    # one non-zero (at 2): padded with the zero at 0; none: positions 0, 1; two: kept as is
    positions = unpack_positions(packed.indices, 4, 6).tolist()
    assert positions == [[0, 2, 0, 1, 1, 3]]
    assert torch.equal(unpack(packed), weight)


def test_short_groups_3_of_8():
    weight = torch.zeros(1, 8)
    weight[0, 6] = 1.0
    assert unpack_positions(pack(weight, 3, 8).indices, 8, 3).tolist() == [[0, 1, 6]]


def test_too_many_non_zeros_names_the_shape():
    weight = torch.ones(3, 8)
    with pytest.raises(ValueError, match=r"shape \(3, 8\) is not 2:4.*6 of 6 groups"):
        pack(weight, 2, 4)


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "fraction"), [(2, 4, 9 / 16), (2, 8, 5 / 16),
                                                  (1, 4, 9 / 32), (4, 16, 5 / 16)])
def test_fp16_sizes(n, m, fraction):
    sparse, mask = finalized(torch.randn(64, 128), n, m)
    packed = pack(sparse.half(), n, m, mask=mask)
    assert packed.dense_nbytes == 64 * 128 * 2
    assert packed.nbytes == packed.dense_nbytes * fraction


def test_rows_are_padded_to_whole_bytes():
    sparse, mask = finalized(torch.randn(3, 4), 2, 4)  # 2 positions x 2 bits per row
    packed = pack(sparse.half(), 2, 4, mask=mask)
    assert packed.indices.shape == (3, 1)
    assert packed.nbytes == 3 * 2 * 2 + 3
    assert int((packed.indices >> 4).max()) == 0  # unused high bits are zero
    sparse, mask = finalized(torch.randn(2, 3, 8), 3, 8, "flat")  # 9 x 4 bits -> 5 bytes
    assert pack(sparse, 3, 8, "flat", mask=mask).indices.shape == (2, 5)


def test_to_device_copies_the_format():
    sparse, mask = finalized(torch.randn(4, 16), 1, 4)
    packed = pack(sparse, 1, 4, mask=mask)
    moved = packed.to("meta")
    assert moved.device.type == "meta" and moved.indices.dtype == torch.uint8
    assert (moved.n, moved.m, moved.shape, moved.layout) == (1, 4, (4, 16), "in")
    assert torch.equal(unpack(packed.to("cpu")), sparse)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "n", "m", "layout", "match"), [
    ((4, 6), 2, 4, "in", "not divisible by M=4"),
    ((4, 3, 3, 3), 1, 4, "flat", "not divisible by M=4"),
    ((8,), 2, 4, "in", "1-D"),
    ((1, 4, 1, 1, 1, 1), 2, 4, "in", "6-D"),
    ((4, 8), 4, 2, "in", "invalid N:M pattern 4:2"),
    ((4, 8), 0, 4, "in", "invalid N:M pattern 0:4"),
    ((4, 512), 1, 512, "in", "at most 256"),
    ((4, 8), 2, 4, "rows", "unknown layout"),
])
def test_pack_errors(shape, n, m, layout, match):
    with pytest.raises(ValueError, match=match):
        pack(torch.zeros(shape), n, m, layout)


def test_mask_errors():
    weight = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4\) does not match"):
        pack(weight, 2, 4, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        pack(weight, 2, 4, mask=torch.ones(2, 8))
    mask = nm_mask(weight, 2, 4)
    mask[1, 0] = ~mask[1, 0]
    with pytest.raises(ValueError, match=r"not 2:4: 1 of 4 groups keep [13]\.\.[13] entries"):
        pack(weight, 2, 4, mask=mask)


def test_packed_weight_validates_its_tensors():
    packed = pack(torch.zeros(4, 8), 2, 4)
    with pytest.raises(ValueError, match="values of shape"):
        PackedWeight(packed.values[:, :2], packed.indices, 2, 4, (4, 8))
    with pytest.raises(ValueError, match="indices must be uint8"):
        PackedWeight(packed.values, packed.indices.int(), 2, 4, (4, 8))
    with pytest.raises(ValueError, match="not divisible"):
        PackedWeight(packed.values, packed.indices, 2, 4, (4, 9))


def test_unpack_rejects_corrupt_positions():
    packed = pack(torch.zeros(1, 6), 1, 6)  # 4-bit positions can encode 6..15
    bad = PackedWeight(packed.values, torch.tensor([[7]], dtype=torch.uint8), 1, 6, (1, 6))
    with pytest.raises(ValueError, match="position is >= M=6"):
        unpack(bad)
    packed = pack(torch.zeros(1, 4), 2, 4)
    duplicate = PackedWeight(packed.values, torch.tensor([[0b0101]], dtype=torch.uint8), 2, 4,
                             (1, 4))
    with pytest.raises(ValueError, match="not strictly ascending"):
        unpack(duplicate)
