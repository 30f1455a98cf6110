"""The pre-registered study's design: seeds from the power formula, the verdict rule, the
section kept in place when the report is rewritten."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.study import power, power_followup, stats


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


def test_follow_up_seeds_come_from_stage_ones_observed_sd():
    scores = power_followup.stage1_scores()
    diffs = [scores[("srste", k)] - scores[("ste", k)] for k in range(8)]
    assert diffs[4] == pytest.approx(85.79 - 85.22)  # seed 4 of stage 1's table
    sd = statistics.stdev(diffs)
    assert power_followup.OBSERVED_SD == pytest.approx(sd) == pytest.approx(0.308, abs=1e-3)
    assert power_followup.TOTAL == power.seeds_for(sd) == 21
    new = {(s.overrides["method"], s.overrides["seed"]) for s in power_followup.mlp_specs()}
    assert new == {(m, k) for m in ("ste", "srste") for k in range(8, 21)}
    # stage 1's eight pairs give its row of the table (85.45 / 85.47, sd 0.31)
    row = power.gain_row(power.MLP_ARMS[2], scores)
    assert row[1:4] == ["8 / 8", "85.45", "85.47"] and row[6].startswith("0.31 ")


def test_conv_runs_pair_the_methods_and_go_seed_by_seed():
    specs = power_followup.conv_specs()
    assert len(specs) == 3 * 2 * power_followup.CONV_SEEDS
    first = [(s.overrides["pattern"], s.overrides["method"], s.overrides["seed"])
             for s in specs[:6]]
    assert first == [(p, m, 0) for p in ("2:4", "1:8", "1:16") for m in ("ste", "srste")]
    configs = {s.overrides["method"]: s.config() for s in specs[:2]}
    assert configs["srste"].make_method().decay == 2e-4
    assert configs["ste"].exclude == ["conv1", "fc"] and configs["ste"].model == "resnet20"


def test_the_follow_up_block_sits_inside_the_section_and_survives_its_rewrite(tmp_path):
    results = tmp_path / "results.md"
    results.write_text(f"head\n{power.START}\nstage 1\n{power.END}\ntail\n")
    power_followup.write_block(results, tmp_path / "runs")
    text = results.read_text()
    block = power.marked(text, power.FOLLOW_UP_START, power.FOLLOW_UP_END)
    assert "No run has finished yet." in block
    assert text.index(power.START) < text.index(block) < text.index(power.END)
    power.write_section(results, tmp_path / "runs")  # stage 1 rewritten: the block stays
    assert block in results.read_text() and "stage 1\n" not in results.read_text()


def test_a_conv_arm_stopped_by_the_clock_is_decided_on_its_seeds_finished_in_order():
    arm = power_followup.CONV_ARMS[0]
    gains = [0.30, 0.35, 0.25, 0.42]
    scores = {("ste", k): 90.0 for k in range(4)}
    scores.update({("srste", k): 90.0 + g for k, g in enumerate(gains)})
    scores[("ste", 5)] = scores[("srste", 5)] = 80.0  # seed 4 unfinished: seed 5 not used
    assert power_followup.finished_in_order(arm, scores) == 4
    row = power_followup._clocked_row(arm, scores)
    assert row[1] == "4 / 8 (stopped by the clock)"
    assert row[4].startswith("+0.33 [") and row[-1] == "reproduced"
    two = {k: v for k, v in scores.items() if k[1] < 2}
    assert power_followup._clocked_row(arm, two)[-1].startswith("unfinished")
