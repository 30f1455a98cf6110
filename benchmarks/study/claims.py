"""The paper's claims, each decided over seeds by a stated rule.

Every claim compares a (first) with b (second) through the per-seed values of each side:
a **paired** t comparison over the seeds both sides share, when at least two (same seed =
same initial weights and data order, so the pair shares its noise), else **Welch's** t.
The effect is the advantage of a over b (for bits per byte, where lower is better, b - a),
with its 95 % confidence interval; the verdict follows from where that interval lies:

- ``greater`` (a beats b): reproduced if the CI lies above 0, reversed if below 0;
- ``within`` margin m (a is at most m worse than b): reproduced if the CI lies above -m,
  reversed if it lies below -m;
- ``close`` margin m (|a - b| <= m): reproduced if the CI lies inside (-m, m), reversed if
  it lies wholly outside;

and "not decided at this scale" otherwise. A side with fewer than two seeds decides
nothing (never a single-seed verdict); a missing row is "not measured in this preset".
The claims are tested one by one at the 95 % level, without a multiple-comparison
correction: with ~25 claims about one may fall on the wrong side by chance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import stats
from .records import RunRecord, decay_groups, layout_groups, lm_groups, main_groups

REPRODUCED, REVERSED = "reproduced", "reversed"
UNDECIDED = "not decided at this scale"
NOT_MEASURED = "not measured in this preset"

Values = dict[int, float]  # seed -> value


@dataclass
class Claim:
    claim: str
    verdict: str
    comparison: str
    effect: stats.Comparison | None = None
    interval: str = ""  # the table's effect cell when there is no Comparison (a correlation)

    def sentence(self) -> str:
        return f"**{self.claim}**: {self.verdict}. {self.comparison}"


def values(runs: list[RunRecord] | None,
           value: Callable[[RunRecord], float | None] = lambda r: r.score) -> Values | None:
    if not runs:
        return None
    out = {r.seed: v for r in runs for v in [value(r)] if v is not None}
    return out or None


def compare(a: Values, b: Values) -> stats.Comparison | None:
    """Paired over the seeds both sides share (when at least 2; a side's other seeds are left
    out), else Welch; None with fewer than 2 seeds on a side."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) >= 2:
        return stats.paired([a[s] for s in seeds], [b[s] for s in seeds])
    if len(a) >= 2 and len(b) >= 2:
        return stats.welch(list(a.values()), list(b.values()))
    return None


RULES = {"greater": "reproduced if the 95 % CI of a - b lies above 0, reversed if below",
         "within": "reproduced if the 95 % CI of a - b lies above -{m}, reversed if below",
         "close": "reproduced if the 95 % CI of a - b lies inside ±{m}, reversed if wholly "
                  "outside"}


def verdict_of(kind: str, low: float, high: float, margin: float) -> str:
    if kind == "greater":
        return REPRODUCED if low > 0 else REVERSED if high < 0 else UNDECIDED
    if kind == "within":
        return REPRODUCED if low > -margin else REVERSED if high < -margin else UNDECIDED
    if kind == "close":
        if -margin < low and high < margin:
            return REPRODUCED
        return REVERSED if low > margin or high < -margin else UNDECIDED
    raise ValueError(f"unknown claim kind {kind!r}; accepted: {', '.join(RULES)}")


def decide(claim: str, a: Values | None, b: Values | None, kind: str, what: str, *,
           margin: float = 0.0, unit: str = "points", higher_better: bool = True,
           digits: int = 2) -> Claim:
    """Decide ``claim`` about a vs b (see the module docstring for the rules)."""
    if not a or not b:
        return Claim(claim, NOT_MEASURED, f"Needs {what}.")
    sign = 1.0 if higher_better else -1.0
    result = compare({s: sign * v for s, v in a.items()}, {s: sign * v for s, v in b.items()})
    means = (f"a = {stats.mean(list(a.values())):.{digits}f} (n={len(a)}), "
             f"b = {stats.mean(list(b.values())):.{digits}f} (n={len(b)})")
    if result is None:
        return Claim(claim, UNDECIDED, f"Compared {what}: {means}; fewer than 2 seeds on a "
                     "side, so no interval and no verdict.")
    rule = RULES[kind].format(m=f"{margin:.3g}")
    flipped = "" if higher_better else " (lower is better: the effect is b - a)"
    verdict = verdict_of(kind, result.low, result.high, margin)
    why = ""
    if verdict == UNDECIDED:
        edge = {"greater": "0", "within": f"-{margin:.3g}"}.get(kind, f"±{margin:.3g}")
        why = (f" Not decided: the interval [{result.low:+.{digits}f}, "
               f"{result.high:+.{digits}f}] reaches both sides of {edge}.")
    return Claim(claim, verdict, f"Compared {what}{flipped}: {means}; effect "
                 f"{result.text(digits, unit)}; rule: {rule}.{why}", result)


def _gain(main, pattern: str) -> Values | None:
    """Per seed: SR-STE minus STE at ``pattern``."""
    sr, st = values(main.get(("srste", pattern))), values(main.get(("ste", pattern)))
    if not sr or not st:
        return None
    return {s: sr[s] - st[s] for s in sr if s in st} or None


def sad_accuracy(records: list[RunRecord], sweep: bool = False,
                 ) -> dict[str, stats.Correlation | None]:
    """Pearson r of SAD summed over training with top-1, per pattern, over the main table's
    STE and SR-STE runs (the paper's comparison), or with ``sweep`` over every decay too
    (ASP's fixed mask has no SAD to speak of)."""
    out: dict[str, stats.Correlation | None] = {}
    main = {id(r) for rs in main_groups(records).values() for r in rs}
    moving = [r for r in records if not r.lm and r.method in ("ste", "srste")
              and r.group != "extra" and r.sad_total is not None
              and (sweep or id(r) in main)]
    for pattern in sorted({r.pattern for r in moving}):
        rs = [r for r in moving if r.pattern == pattern]
        out[pattern] = stats.pearson([r.sad_total for r in rs], [r.score for r in rs])
    return out


def claims(records: list[RunRecord]) -> list[Claim]:
    main = main_groups(records)
    lm = lm_groups(records)
    dense = values(main.get(("dense", "dense")))

    def sr(pattern: str, row: str = "srste") -> Values | None:
        return values(main.get((row, pattern)))

    out = []
    for pattern in ("2:4", "1:8", "1:16"):
        out.append(decide(f"SR-STE beats STE at {pattern}", sr(pattern), sr(pattern, "ste"),
                          "greater", f"top-1 of a = SR-STE {pattern} vs b = STE {pattern}"))
    out += [
        decide("SR-STE's gain over STE grows with sparsity (1:16 vs 2:4)", _gain(main, "1:16"),
               _gain(main, "2:4"), "greater", "the per-seed gain SR-STE - STE of a = 1:16 vs "
               "b = 2:4"),
        decide("SR-STE 2:4 is within 0.3 points of dense (paper 77.0 vs 77.3)", sr("2:4"),
               dense, "within", "top-1 of a = SR-STE 2:4 vs b = dense", margin=0.3),
        decide("SR-STE 4:8 is within 0.3 points of dense (paper 77.4 vs 77.3)", sr("4:8"),
               dense, "within", "top-1 of a = SR-STE 4:8 vs b = dense", margin=0.3),
        decide("4:8 beats 2:4 at the same 50 % sparsity (SR-STE; paper 77.4 vs 77.0)",
               sr("4:8"), sr("2:4"), "greater", "top-1 of a = SR-STE 4:8 vs b = SR-STE 2:4"),
        decide("2:8 beats 1:4 at the same 75 % sparsity (SR-STE; paper 76.2-76.4 vs "
               "75.3-75.9)", sr("2:8"), sr("1:4"), "greater",
               "top-1 of a = SR-STE 2:8 vs b = SR-STE 1:4"),
        decide("SR-STE 1:4 is at most 2 points below dense", sr("1:4"), dense, "within",
               "top-1 of a = SR-STE 1:4 vs b = dense", margin=2.0),
        decide("SR-STE 2:8 is at most 2 points below dense", sr("2:8"), dense, "within",
               "top-1 of a = SR-STE 2:8 vs b = dense", margin=2.0),
        decide("SR-STE 2:4 beats ASP 2:4 at the same training budget", sr("2:4"),
               sr("2:4", "asp-1x"), "greater", "top-1 of a = SR-STE 2:4 vs b = ASP 2:4 "
               "(dense half, prune, retrain half)"),
        decide("SR-STE 2:4 beats ASP 2:4 trained 2x as long (paper 77.0 vs 76.8)", sr("2:4"),
               sr("2:4", "asp"), "greater", "top-1 of a = SR-STE 2:4 vs b = ASP 2:4 (full "
               "dense run, prune, full retrain)"),
    ]
    sparse_patterns = sorted({p for (m, p) in main if m == "ste"})
    for pattern in sparse_patterns:
        out.append(decide(f"SR-STE lowers SAD at {pattern}",
                          values(main.get(("ste", pattern)), lambda r: r.sad_total),
                          values(main.get(("srste", pattern)), lambda r: r.sad_total),
                          "greater", f"SAD summed over training (mask flips per logged "
                          f"interval, from sad.csv) of a = STE {pattern} vs b = SR-STE "
                          f"{pattern}", unit="flips", digits=0))
    correlations = {p: c for p, c in sad_accuracy(records).items() if c is not None
                    and ("ste", p) in main and ("srste", p) in main}
    for pattern in sparse_patterns:
        c = correlations.get(pattern)
        if c is None:
            continue
        verdict = REPRODUCED if c.high < 0 else REVERSED if c.low > 0 else UNDECIDED
        out.append(Claim(f"Lower SAD goes with higher accuracy (across runs at {pattern})",
                         verdict, f"Pearson correlation of SAD summed over training with "
                         f"top-1 over the main table's STE and SR-STE runs at {pattern}: "
                         f"{c.text()}; rule: reproduced if the CI lies below 0, reversed if "
                         "above.", None, f"r {c.r:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"))
    if not correlations:
        out.append(Claim("Lower SAD goes with higher accuracy", NOT_MEASURED,
                         "Needs at least 4 STE / SR-STE runs at one pattern."))
    sweep = decay_groups(records)
    if sweep:
        pattern = next(iter(sweep.values()))[0].pattern
        out.append(decide(f"SR-STE decay 2e-4 beats decay 0 (plain STE) at {pattern}",
                          values(sweep.get(2e-4)), values(sweep.get(0.0)), "greater",
                          f"top-1 of a = decay 2e-4 vs b = decay 0 at {pattern}"))
        matched = [d for d in sweep if d not in (0.0, 2e-5, 2e-4, 2e-3, 2e-2)]
        if matched:
            out.append(decide(f"The decay matching the paper's cumulative sum_t lr_t * decay "
                              f"beats 2e-4 at {pattern}", values(sweep[matched[0]]),
                              values(sweep.get(2e-4)), "greater",
                              f"top-1 of a = decay {matched[0]:g} vs b = decay 2e-4"))
    else:
        out.append(Claim("SR-STE decay 2e-4 beats decay 0 (plain STE) in a decay sweep",
                         NOT_MEASURED, "Needs the decay sweep."))
    for pattern in ("2:4", "1:4"):
        lay = layout_groups(records, pattern)
        if lay or pattern == "2:4":
            out.append(decide(f"Input-channel grouping is within 0.3 points of the paper's "
                              f"flat grouping at {pattern}", values(lay.get("in")),
                              values(lay.get("flat")), "close", f"top-1 of a = SR-STE "
                              f"{pattern} layout in vs b = layout flat", margin=0.3))
    dense_bpb = values(lm.get(("dense", "dense")))
    margin = 0.02 * stats.mean(list(dense_bpb.values())) if dense_bpb else 0.0
    out.append(decide("On a language model SR-STE 2:4 stays within 2 % of dense bits per "
                      "byte (the paper's Transformer claim)", values(lm.get(("srste", "2:4"))),
                      dense_bpb, "within", "test bits per byte of a = SR-STE 2:4 vs b = "
                      "dense", margin=margin, unit="bits/byte", higher_better=False,
                      digits=3))
    out.append(decide("On a language model SR-STE beats STE at 2:4",
                      values(lm.get(("srste", "2:4"))), values(lm.get(("ste", "2:4"))),
                      "greater", "test bits per byte of a = SR-STE 2:4 vs b = STE 2:4",
                      unit="bits/byte", higher_better=False, digits=3))
    return out
