"""The study's statistics against printed table values and hand-computed examples."""

from __future__ import annotations

import math

import pytest

from benchmarks.study.stats import betainc, paired, pearson, t_cdf, t_quantile, welch

# Two-sided 95 % critical values of Student's t (any printed t table), and one-sided 0.95.
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281,
         30: 2.0423, 120: 1.9799}
T_95 = {1: 6.3138, 4: 2.1318, 10: 1.8125}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_table(df: int) -> None:
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=6e-5)
    assert t_quantile(0.025, df) == pytest.approx(-T_975[df], abs=6e-5)
    if df in T_95:
        assert t_quantile(0.95, df) == pytest.approx(T_95[df], abs=6e-5)


def test_t_cdf_closed_forms() -> None:
    # df 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-7.0, -1.3, 0.0, 0.4, 2.5, 30.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # large df tends to the normal: Phi(1.959964) = 0.975
    assert t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)
    assert t_quantile(0.5, 3) == 0.0


def test_betainc_simple_cases() -> None:
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(2, 1, 0.5) == pytest.approx(0.25)  # x^2
    assert betainc(1, 3, 0.2) == pytest.approx(1 - 0.8 ** 3)
    with pytest.raises(ValueError, match="0 <= x <= 1"):
        betainc(1, 1, 1.5)


def test_paired_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3), df 2
    c = paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302653 / math.sqrt(3)
    assert (c.test, c.effect, c.df) == ("paired", 2.0, 2)
    assert c.low == pytest.approx(2 - half, abs=1e-5) and c.high == pytest.approx(2 + half,
                                                                                   abs=1e-5)
    assert c.d == pytest.approx(2.0)
    t = 2 * math.sqrt(3)  # df 2 closed form: two-sided p = 1 - t / sqrt(2 + t^2)
    assert c.p == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)
    with pytest.raises(ValueError, match="equal-length"):
        paired([1.0, 2.0], [1.0])


def test_paired_with_constant_difference_is_exact() -> None:
    c = paired([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert (c.low, c.high, c.p, c.d) == (0.5, 0.5, 0.0, None)


def test_welch_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    c = welch(a, b)
    va, vb = (5 / 3) / 4, 4.0 / 3  # sample variances 5/3 and 4, over n
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert c.effect == pytest.approx(2.5 - 4.0)
    assert c.df == pytest.approx(df)
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    assert (c.low, c.high) == (pytest.approx(-1.5 - half), pytest.approx(-1.5 + half))
    pooled = math.sqrt((3 * 5 / 3 + 2 * 4) / 5)
    assert c.d == pytest.approx(-1.5 / pooled)


def test_pearson_by_hand() -> None:
    assert pearson([1, 2, 3], [1, 2, 3]) is None  # too few points for an interval
    c = pearson([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0])
    assert c.r == pytest.approx(0.8)  # sxy 8, sxx 10, syy 10
    half = 1.959964 / math.sqrt(2)
    assert c.low == pytest.approx(math.tanh(math.atanh(0.8) - half), abs=1e-6)
    assert c.high == pytest.approx(math.tanh(math.atanh(0.8) + half), abs=1e-6)
    assert c.p == pytest.approx(2 * (1 - t_cdf(0.8 * math.sqrt(3 / 0.36), 3)))
