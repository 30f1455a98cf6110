"""Seed statistics of the study: Student t quantiles, paired and Welch comparisons, Pearson r.

Written out here (no SciPy) so the report depends on nothing but the standard library. The
t distribution's CDF goes through the regularized incomplete beta function (a continued
fraction evaluated with the modified Lentz method), its quantile by bisection on that CDF;
``tests/study/test_study_stats.py`` checks both against printed table values.

A comparison returns the effect (mean difference a - b, in the unit of the values), its 95 %
confidence interval, the two-sided p-value and a standardized effect size (Cohen's d_z for
paired data, Cohen's d with the pooled standard deviation for Welch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (df may be fractional)."""
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on :func:`t_cdf` (to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_var(values: Sequence[float]) -> float:
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


@dataclass(frozen=True)
class Comparison:
    """a - b over seeds: the effect, its CI, the test that gave them."""

    test: str  # "paired" or "Welch"
    n_a: int
    n_b: int
    effect: float  # mean of a - mean of b (paired: mean of the per-seed differences)
    low: float  # 95 % confidence interval of the effect
    high: float
    df: float
    p: float  # two-sided, H0: effect = 0
    d: float | None  # standardized effect (d_z paired, Cohen's d Welch); None if no spread

    def text(self, digits: int = 2, unit: str = "") -> str:
        unit = f" {unit}" if unit else ""
        d = "n/a" if self.d is None else f"{self.d:+.2f}"
        n = f"n={self.n_a} pairs" if self.test == "paired" else f"n={self.n_a} vs {self.n_b}"
        return (f"{self.effect:+.{digits}f}{unit}, 95 % CI [{self.low:+.{digits}f}, "
                f"{self.high:+.{digits}f}] ({self.test} t, {n}, df {self.df:.3g}, "
                f"p {self.p:.2g}, d {d})")


def _from_t(test: str, n_a: int, n_b: int, effect: float, se: float, df: float,
            d: float | None) -> Comparison:
    if se == 0.0:  # identical differences on every seed: the effect is exact
        p = 1.0 if effect == 0.0 else 0.0
        return Comparison(test, n_a, n_b, effect, effect, effect, df, p, d)
    q = t_quantile(0.5 + LEVEL / 2.0, df)
    p = 2.0 * (1.0 - t_cdf(abs(effect) / se, df))
    return Comparison(test, n_a, n_b, effect, effect - q * se, effect + q * se, df, p, d)


def paired(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Paired t over matched seeds: ``a[i]`` and ``b[i]`` come from the same seed."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired needs two equal-length samples of >= 2, got {len(a)} and "
                         f"{len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    sd = math.sqrt(sample_var(diffs))
    effect = mean(diffs)
    return _from_t("paired", n, n, effect, sd / math.sqrt(n), n - 1,
                   effect / sd if sd > 0 else None)


def welch(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Welch's unequal-variance t (Welch-Satterthwaite degrees of freedom)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch needs >= 2 values per side, got {len(a)} and {len(b)}")
    va, vb = sample_var(a) / len(a), sample_var(b) / len(b)
    se = math.sqrt(va + vb)
    effect = mean(a) - mean(b)
    if va + vb == 0.0:
        df = float(len(a) + len(b) - 2)
    else:
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    pooled = math.sqrt(((len(a) - 1) * sample_var(a) + (len(b) - 1) * sample_var(b))
                       / (len(a) + len(b) - 2))
    return _from_t("Welch", len(a), len(b), effect, se, df,
                   effect / pooled if pooled > 0 else None)


@dataclass(frozen=True)
class Correlation:
    n: int
    r: float
    low: float  # 95 % CI by Fisher's z (n >= 4)
    high: float
    p: float  # two-sided, H0: r = 0 (t with n - 2 df)

    def text(self) -> str:
        return (f"r = {self.r:+.2f}, 95 % CI [{self.low:+.2f}, {self.high:+.2f}], "
                f"p {self.p:.2g}, n = {self.n}")


def pearson(x: Sequence[float], y: Sequence[float]) -> Correlation | None:
    """Pearson's r with a Fisher-z interval; None with fewer than 4 points or no spread."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 4:
        return None
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    if abs(r) == 1.0:
        return Correlation(n, r, r, r, 0.0)
    z, half = math.atanh(r), 1.959963984540054 / math.sqrt(n - 3)
    t = r * math.sqrt((n - 2) / (1 - r * r))
    p = 2.0 * (1.0 - t_cdf(abs(t), n - 2))
    return Correlation(n, r, math.tanh(z - half), math.tanh(z + half), p)
