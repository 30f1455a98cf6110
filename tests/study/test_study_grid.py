"""Grid expansion: counts per preset, stable and distinct run ids, exact CLI round trip."""

from __future__ import annotations

from benchmarks.study.grid import FULL, QUICK, RunSpec, expand
from benchmarks.study.runner import train_args
from nmsparse.cli.main import build_parser
from nmsparse.train.config import FIELDS, resolve


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
    explicit_default = RunSpec("main", {"data": "digits", "pattern": "2:4", "decay": 2e-4})
    changed = RunSpec("main", {"data": "digits", "pattern": "2:4", "decay": 2e-3})
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
