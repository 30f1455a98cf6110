"""The pre-registered study's design: seeds from the power formula, the verdict rule, the
section kept in place when the report is rewritten."""

from __future__ import annotations

import pytest

from benchmarks.study import power, stats


def test_seed_counts_follow_the_power_formula():
    # ((1.96 + 0.84) * 0.31 / 0.2)^2 + 1.96^2 / 2 = 18.83 + 1.92 = 20.75 -> 21
    assert power.seeds_for(0.31) == 21
    assert power.seeds_for(0.05) == power.FLOOR  # the floor, not the formula's 2
    assert power.seeds_for(0.0044, 0.01, floor=1) == 4
    # and 21 pairs at sd 0.31 do detect 0.2 with 80 % power by the t quantiles
    assert power.detectable(0.31, 21) <= 0.2 < power.detectable(0.31, 20)
    assert [a.seeds for a in power.MLP_ARMS] == [21, 8, 8] and power.LM_ARM.seeds == 5


def test_every_run_of_an_arm_pairs_its_methods_on_the_same_seeds():
    specs = power.arm_specs(power.MLP_ARMS[0])
    assert len(specs) == 2 * 21
    seen = {(s.overrides["method"], s.overrides["seed"]) for s in specs}
    assert seen == {(m, k) for m in ("ste", "srste") for k in range(21)}
    assert len(power.specs()) == 42 + 3 * 5 + 2 * 8 + 2 * 8


def comparison(low, high):
    return stats.Comparison("paired", 5, 5, (low + high) / 2, low, high, 4, 0.5, None)


@pytest.mark.parametrize(("low", "high", "word"), [
    (0.01, 0.3, "reproduced"), (-0.3, -0.01, "reversed"),
    (-0.1, 0.15, "no gain of 0.2 (not reproduced)"), (-0.1, 0.3, "not decided")])
def test_verdict_rule(low, high, word):
    assert power.verdict(comparison(low, high), 0.2) == word


def test_the_section_is_replaced_in_place_or_appended():
    block = f"{power.START}\nnew\n{power.END}"
    text = f"head\n{power.START}\nold\n{power.END}\ntail\n"
    assert power.splice(text, block) == f"head\n{block}\ntail\n"
    assert power.splice("head\n", block) == f"head\n\n{block}\n"
