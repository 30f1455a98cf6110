"""Tests for nmsparse.patterns: parsing and validating "N:M" (keep N of every M)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.patterns import NM, parse_pattern

# ----------------------------------------------------------------------------- accepted specs


@pytest.mark.parametrize(
    ("spec", "n", "m"),
    [
        ("2:4", 2, 4),
        ("1:4", 1, 4),
        ("3:4", 3, 4),
        ("1:2", 1, 2),
        ("1:8", 1, 8),
        ("4:8", 4, 8),
        ("7:8", 7, 8),
        ("2:16", 2, 16),
        ("4:16", 4, 16),
        ("15:16", 15, 16),
        (" 2:4", 2, 4),
        ("2:4 ", 2, 4),
        (" 2 : 4 ", 2, 4),
        ("2 :4", 2, 4),
        ("2: 4", 2, 4),
        ("\t1:8\n", 1, 8),
        ((2, 4), 2, 4),
        ((1, 8), 1, 8),
        ((3, 4), 3, 4),
        (NM(2, 4), 2, 4),
        (NM(1, 16), 1, 16),
    ],
)
def test_parse_accepted(spec: object, n: int, m: int) -> None:
    p = parse_pattern(spec)  # type: ignore[arg-type]
    assert isinstance(p, NM)
    assert p == NM(n, m)
    assert (p.n, p.m) == (n, m)
    assert type(p.n) is int and type(p.m) is int


def test_parse_nm_instance_returns_equal_pattern() -> None:
    p = NM(2, 4)
    assert parse_pattern(p) == p


def test_all_spellings_agree() -> None:
    assert parse_pattern("2:4") == parse_pattern((2, 4)) == parse_pattern(NM(2, 4))
    assert parse_pattern(" 2 : 4 ") == parse_pattern("2:4")


# ----------------------------------------------------------------------------- rejected specs


@pytest.mark.parametrize(
    "spec",
    [
        "4:2",  # N > M
        "0:4",  # N = 0
        "4:4",  # N = M keeps everything: not a sparsity pattern
        "8:4",
        "0:0",
        "1:1",
        "1:0",
        "2/4",
        "2-4",
        "2 4",
        "2,4",
        "a:b",
        "2:b",
        "a:4",
        "2:4:8",
        "2:",
        ":4",
        ":",
        "",
        "   ",
        "-1:4",
        "2:-4",
        "+2:4",
        "2.0:4",
        "2:4.0",
        "2.5:4",
        "2:4x",
        "x2:4",
        None,
        2.5,
        2,
        True,
        False,
        b"2:4",
        (2.0, 4),
        (2, 4.0),
        (2.5, 4),
        (True, 4),
        (1, True),
        ("2", "4"),
        ("2", 4),
        (4, 2),
        (0, 4),
        (4, 4),
        (-1, 4),
        (2,),
        (2, 4, 8),
        (),
        [2, 4],
        {2: 4},
    ],
    ids=repr,
)
def test_parse_rejected(spec: object) -> None:
    with pytest.raises(ValueError, match="accepted"):
        parse_pattern(spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "m"),
    [(4, 2), (0, 4), (4, 4), (-1, 4), (0, 0), (1, 1), (2.0, 4), (2, 4.0), (True, 4), (1, True),
     ("2", 4), (None, 4)],
    ids=repr,
)
def test_nm_constructor_validates(n: object, m: object) -> None:
    with pytest.raises(ValueError, match="accepted"):
        NM(n, m)  # type: ignore[arg-type]


def test_error_message_describes_accepted_form() -> None:
    with pytest.raises(ValueError) as info:
        parse_pattern("4:2")
    msg = str(info.value)
    assert "accepted" in msg
    assert "N:M" in msg
    # the message should spell out the rule, not just say "invalid"
    assert "N < M" in msg or "N<M" in msg


# ----------------------------------------------------------------------------- NM object


@pytest.mark.parametrize(
    ("p", "text"),
    [(NM(2, 4), "2:4"), (NM(1, 8), "1:8"), (NM(4, 16), "4:16"), (NM(15, 16), "15:16")],
)
def test_str(p: NM, text: str) -> None:
    assert str(p) == text
    assert f"{p}" == text
    assert parse_pattern(str(p)) == p


def test_str_of_parsed_whitespace_spec_is_canonical() -> None:
    assert str(parse_pattern("  1 :  8 ")) == "1:8"


def test_frozen() -> None:
    p = NM(2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.n = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.m = 8  # type: ignore[misc]
    assert (p.n, p.m) == (2, 4)


def test_hashable_and_equality() -> None:
    patterns = {NM(2, 4), parse_pattern("2:4"), parse_pattern((2, 4)), parse_pattern(" 2 : 4 ")}
    assert len(patterns) == 1
    assert hash(NM(2, 4)) == hash(parse_pattern("2:4"))
    table = {NM(2, 4): "half", NM(1, 4): "quarter"}
    assert table[parse_pattern("2:4")] == "half"
    assert table[parse_pattern("1:4")] == "quarter"
    assert NM(2, 4) != NM(1, 4)
    assert NM(2, 4) != NM(2, 8)
    assert NM(1, 2) != NM(2, 4)  # same density, different pattern


@pytest.mark.parametrize(
    ("p", "density", "sparsity"),
    [
        (NM(2, 4), 0.5, 0.5),
        (NM(1, 4), 0.25, 0.75),
        (NM(3, 4), 0.75, 0.25),
        (NM(1, 2), 0.5, 0.5),
        (NM(1, 8), 0.125, 0.875),
        (NM(4, 8), 0.5, 0.5),
        (NM(2, 16), 0.125, 0.875),
        (NM(4, 16), 0.25, 0.75),
    ],
)
def test_density_sparsity(p: NM, density: float, sparsity: float) -> None:
    assert p.density == pytest.approx(density)
    assert p.sparsity == pytest.approx(sparsity)
    assert p.density + p.sparsity == pytest.approx(1.0)


# ----------------------------------------------------------------------------- properties

_ws = st.sampled_from(["", " ", "  ", "\t"])


@settings(max_examples=150, deadline=None)
@given(
    m=st.integers(2, 256),
    data=st.data(),
    pre=_ws,
    mid1=_ws,
    mid2=_ws,
    post=_ws,
)
def test_valid_specs_roundtrip(m: int, data: st.DataObject, pre: str, mid1: str, mid2: str,
                               post: str) -> None:
    n = data.draw(st.integers(1, m - 1))
    p = parse_pattern(f"{pre}{n}{mid1}:{mid2}{m}{post}")
    assert p == NM(n, m) == parse_pattern((n, m))
    assert str(p) == f"{n}:{m}"
    assert p.density == pytest.approx(n / m)
    assert p.sparsity == pytest.approx((m - n) / m)
    assert 0.0 < p.density < 1.0


@settings(max_examples=150, deadline=None)
@given(n=st.integers(-5, 64), m=st.integers(-5, 64))
def test_invalid_integer_pairs_rejected(n: int, m: int) -> None:
    if 1 <= n < m:
        assert parse_pattern((n, m)) == NM(n, m)
        return
    with pytest.raises(ValueError, match="accepted"):
        parse_pattern((n, m))
    with pytest.raises(ValueError, match="accepted"):
        parse_pattern(f"{n}:{m}")
    with pytest.raises(ValueError, match="accepted"):
        NM(n, m)


def test_numpy_integers_are_accepted_and_unicode_digits_are_not():
    import numpy as np

    pattern = parse_pattern((np.int64(2), np.int64(4)))
    assert pattern == NM(2, 4) and type(pattern.n) is int
    with pytest.raises(ValueError, match="accepted"):
        parse_pattern("\uff12:\uff14")  # full-width digits
