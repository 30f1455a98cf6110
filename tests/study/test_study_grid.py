"""Grid expansion: counts per preset, stable and distinct run ids, exact CLI round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.gpu_check import __main__ as gpu_check
from benchmarks.gpu_check import plan
from benchmarks.study.__main__ import main as study_main
from benchmarks.study.grid import (
    CPU,
    FULL,
    GPU,
    GPU_JOBS,
    PAPER_CUMULATIVE_DECAY,
    QUICK,
    RunSpec,
    expand,
    matched_decay,
    sum_lr,
)
from benchmarks.study.runner import train_args
from nmsparse.app.cli.main import build_parser
from nmsparse.app.train.config import FIELDS, resolve


def _keys(specs: list[RunSpec]) -> set[tuple]:
    out = set()
    for s in specs:
        c = s.config()
        out.add((s.group, "dense" if c.dense else c.method, c.pattern, c.seed))
    return out


def test_quick_preset_has_the_asked_runs() -> None:
    specs = expand("quick")
    assert len(specs) == 8
    keys = _keys(specs)
    for method, pattern in (("ste", "2:4"), ("srste", "2:4"), ("ste", "1:8"),
                            ("srste", "1:8"), ("asp", "2:4")):
        assert ("main", method, pattern, 0) in keys
    assert ("main", "dense", "dense", 0) in keys
    assert ("lm", "dense", "dense", 0) in keys and ("lm", "srste", "2:4", 0) in keys


def test_full_preset_counts() -> None:
    specs = expand(FULL)
    groups = [s.group for s in specs]
    # main: (dense + 2 methods x 6 patterns + 3 asp) x 3 seeds; the sweep's 2e-4 run is the
    # main table's 1:8 SR-STE run, so 4 new decays x 3 seeds; 2 flat layouts x 3; 7 LM runs.
    assert groups.count("main") == 16 * 3
    assert groups.count("decay") == 4 * 3
    assert groups.count("layout") == 2 * 3
    assert groups.count("lm") == 7
    assert len(specs) == 73


def test_ids_are_stable_and_distinct() -> None:
    first = [s.run_id for s in expand("full")]
    again = [s.run_id for s in expand("full")]
    assert first == again
    assert len(set(first)) == len(first)
    assert all(len(i) == 10 for i in first)
    assert {s.run_id for s in expand(QUICK)}.isdisjoint(first)  # different sizes


def test_id_follows_the_resolved_config() -> None:
    base = RunSpec("main", {"data": "digits", "pattern": "2:4"})
    explicit_default = RunSpec("main", {"data": "digits", "pattern": "2:4",
                                        "method_options": {"decay": 2e-4}})
    changed = RunSpec("main", {"data": "digits", "pattern": "2:4",
                               "method_options": {"decay": 2e-3}})
    assert base.run_id == explicit_default.run_id
    assert base.run_id != changed.run_id
    # where it is written, and whether plots are drawn, does not change what it is
    assert base.run_id == RunSpec("main", {"data": "digits", "pattern": "2:4",
                                           "out": "x"}).run_id
    assert base.run_id == RunSpec("main", {"data": "digits", "pattern": "2:4",
                                           "plots": False}).run_id


def test_train_args_round_trip_through_the_cli_parser(tmp_path) -> None:
    for spec in expand("quick"):
        args = build_parser().parse_args(["train", *train_args(spec.config(), tmp_path)])
        given = {n: getattr(args, n) for n in FIELDS if hasattr(args, n)}
        if "model_options" in given:  # the CLI collects KEY=VALUE pairs
            given["model_options"] = dict(given["model_options"])
        parsed = resolve(None, given).to_dict()
        wanted = spec.config().to_dict()
        wanted["out"] = str(tmp_path)
        assert parsed == wanted


def _seeds(specs: list[RunSpec], group: str, method: str, pattern: str, **extra) -> list[int]:
    out = []
    for s in specs:
        c = s.config()
        row = "dense" if c.dense else c.method
        values = {**c.to_dict(), **c.make_method().options()}  # decay: a method option
        if s.group == group and row == method and c.pattern == pattern and all(
                values.get(k) == v for k, v in extra.items()):
            out.append(c.seed)
    return sorted(out)


def test_cpu_preset_seeds_per_comparison() -> None:
    specs = expand(CPU)
    groups = [s.group for s in specs]
    # main: 11 rows + ASP at equal budget, 5 seeds; decay: 4 new decays + the matched one,
    # 3 seeds (2e-4 is the main table's run); no layout rows (Linear layers only); LM 3 x 3.
    assert groups.count("main") == 12 * 5
    assert groups.count("decay") == 5 * 3
    assert groups.count("layout") == 0
    assert groups.count("lm") == 9
    assert groups.count("extra") == 4 * 3
    assert len(specs) == 96
    five, three = [0, 1, 2, 3, 4], [0, 1, 2]
    for method, pattern in (("dense", "dense"), ("ste", "2:4"), ("srste", "2:4"),
                            ("ste", "1:8"), ("srste", "1:8"), ("ste", "1:16"),
                            ("srste", "1:16"), ("srste", "4:8"), ("srste", "2:8"),
                            ("srste", "1:4")):
        assert _seeds(specs, "main", method, pattern) == five, (method, pattern)
    assert _seeds(specs, "main", "asp", "2:4", epochs=4) == five  # 4 + 4: 2x the budget
    assert _seeds(specs, "main", "asp", "2:4", epochs=2) == five  # 2 + 2: the same budget
    for decay in (0.0, 2e-5, 2e-3, 2e-2):
        assert _seeds(specs, "decay", "srste", "1:8", decay=decay) == three
    assert _seeds(specs, "lm", "srste", "2:4") == three
    assert all(s.config().device == "cpu" for s in specs)
    # seed by seed: a study cut short has every table at its first seeds
    assert max(i for i, s in enumerate(specs) if s.config().seed < 3) < min(
        i for i, s in enumerate(specs) if s.config().seed >= 3)


def test_matched_decay_reaches_the_papers_cumulative_value() -> None:
    decay = matched_decay(CPU)
    # 4 epochs x 235 steps of batch 256 on 60,000 images; warm-up 0.5 epoch then cosine:
    # sum_t lr_t is close to lr x (warm-up / 2 + rest / 2) = 0.1 x 470
    total = sum_lr(CPU.vision, 60_000)
    assert total == pytest.approx(0.1 * 940 / 2, rel=0.01)
    assert decay * total == pytest.approx(PAPER_CUMULATIVE_DECAY, rel=1e-3)
    assert pytest.approx(6.0, abs=0.01) == PAPER_CUMULATIVE_DECAY
    assert _seeds(expand(CPU), "decay", "srste", "1:8", decay=decay) == [0, 1, 2]


def test_extra_rows_are_listed_by_name() -> None:
    preset = dataclasses.replace(CPU, extra=(("srste", "1:8", {"decay": 1e-3}),
                                             ("ste", "2:8", {}), ("ste", "2:4", {})))
    extra = [s for s in expand(preset) if s.group == "extra"]
    # ("ste", "2:4", {}) is the main table's run: the same config is the same run, kept once
    assert len(extra) == 2 * 3
    assert {s.config().method_options.get("decay") for s in extra} == {1e-3, None}
    assert all("-extra" not in s.name and "decay0.001" in s.name for s in extra
               if s.config().method == "srste")
    assert len({s.run_id for s in extra}) == 6


def test_gpu_preset_and_the_gpu_check_that_runs_it(tmp_path) -> None:
    specs = expand(GPU)
    assert len(specs) == 21 and {s.config().seed for s in specs} == {0, 1, 2}
    assert {s.config().device for s in specs} == {"cuda"}
    assert {s.config().model for s in specs} == {"resnet20"}
    # the GPU check runs it only when asked (its default parts already fill the budget)
    assert all(s.part.name != "study" for s in plan.steps("python3", tmp_path, False))
    assert gpu_check.parse_only("machine,study") == ["machine", "study"]
    (step,) = plan.steps("python3", tmp_path, False, ["study"])
    assert step.command[:5] == ["python3", "-m", "benchmarks.study", "--preset", "gpu"]
    assert step.command[-4:] == ["--jobs", str(GPU_JOBS), "--threads", "2"]
    assert step.result == tmp_path / "study.json" and step.part.cap_s <= plan.BUDGET_S
    # the dry run's command, run here: the grid listed and an empty bundle as the result
    (dry,) = plan.steps("python3", tmp_path, True, ["study"])
    assert dry.command[-1] == "--list"
    assert study_main(dry.command[3:]) == 0
    data = json.loads((tmp_path / "study.json").read_text())
    assert data["preset"] == "gpu" and data["runs"] == []
    assert data["planned"] == [s.name for s in specs]
