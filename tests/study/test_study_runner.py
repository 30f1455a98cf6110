"""Runner caching on a tiny two-run grid (real ``nmsparse train`` on the bundled digits):
run, skip when done, resume from a checkpoint, restart a folder that holds no checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.study.grid import RunSpec
from benchmarks.study.runner import STUDY_FILE, listing, run_all, run_one, state_of

TINY = {"data": "digits", "model": "mlp", "model_options": {"hidden": [32]}, "epochs": 1,
        "batch_size": 64, "limit_train_batches": 2, "limit_test_batches": 1, "plots": False,
        "device": "cpu", "log_every": 1}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    specs = [RunSpec("main", {**TINY, "pattern": "dense"}),
             RunSpec("main", {**TINY, "pattern": "2:4", "method": "srste"}, label="tag")]
    first = run_all(specs, root, quiet=True, say=lambda m: None, threads=1)
    return root, specs, first


def test_runs_then_skips(grid) -> None:
    root, specs, first = grid
    assert [r["action"] for r in first] == ["ran", "ran"]
    for spec in specs:
        run_dir = root / spec.name
        assert (run_dir / "summary.json").is_file() and (run_dir / "sad.csv").exists() \
            or spec.config().dense
        meta = json.loads((run_dir / STUDY_FILE).read_text())
        assert meta["run_id"] == spec.run_id and meta["command"][:2] == ["nmsparse", "train"]
        assert meta["threads"] == 1 and meta["label"] == spec.label
        assert state_of(spec, root) == "done"
    again = run_all(specs, root, quiet=True, say=lambda m: None)
    assert [r["action"] for r in again] == ["skipped", "skipped"]
    assert "2 of 2 done" in listing(specs, root)


def test_interrupted_run_is_resumed(grid) -> None:
    root, specs, _ = grid
    spec = specs[1]
    run_dir = root / spec.name
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    assert state_of(spec, root) == "partial"
    result = run_one(spec, root, quiet=True, say=lambda m: None)
    assert result["action"] == "resumed"
    assert (run_dir / "summary.json").is_file()
    assert "resumed at epoch" in (root / f"{spec.name}.log").read_text()
    assert json.loads((run_dir / STUDY_FILE).read_text())["pieces"] == 2


def test_folder_without_checkpoint_starts_over(grid) -> None:
    root, specs, _ = grid
    spec = specs[0]
    run_dir = root / spec.name
    shutil.rmtree(run_dir)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')  # a dead start
    assert state_of(spec, root) == "stale"
    assert run_one(spec, root, quiet=True, say=lambda m: None)["action"] == "ran"
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[0]).get("loss") is not None  # the dead start was cleared


def test_changed_config_is_not_taken_for_done(grid) -> None:
    root, specs, _ = grid
    spec = specs[0]
    config = json.loads((root / spec.name / "config.json").read_text())
    config["lr"] = 0.5  # a folder of that name holding another configuration
    (root / spec.name / "config.json").write_text(json.dumps(config))
    assert state_of(spec, root) == "stale"
