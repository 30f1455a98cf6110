"""The report generator on hand-made run folders: verdicts over seeds, tables, figures, the
bundle of a preset measured elsewhere."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.study.bundle import pack, read_bundle
from benchmarks.study.claims import (
    NOT_MEASURED,
    REPRODUCED,
    REVERSED,
    UNDECIDED,
    claims,
    verdict_of,
)
from benchmarks.study.records import load_run
from benchmarks.study.report import render
from benchmarks.study.runner import STUDY_FILE
from nmsparse.app.train.config import TrainConfig

STEPS = 100
JITTER = (-0.001, 0.0, 0.001)  # per-seed offsets shared by every row (same-seed pairing)
WOBBLE = (0.0004, -0.0002, -0.0002)  # per-seed noise of the differences


def _write_run(root: Path, name: str, *, method: str, pattern: str, seed: int,
               acc: float | None = None, bpb: float | None = None, sad: int = 0,
               data: str = "fashion-mnist", decay: float = 2e-4,
               meta: dict | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = TrainConfig(data=data, model="resnet20", pattern=pattern, method=method,
                         seed=seed, epochs=2, exclude=["fc"], decay=decay).to_dict()
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [{"name": "conv", "macs_dense": 100, "density": 0.5 if pattern != "dense" else 1.0}]
    summary = {"test_acc": acc if acc is not None else 0.0, "test_loss": 0.5, "steps": STEPS,
               "wall_seconds": 10.0, "params_dense": 1000, "params_kept": 500,
               "macs_dense": 2_000_000, "macs_sparse": 1_000_000, "torch": "2.x",
               "device": "cpu", "summary": {"rows": rows}}
    if bpb is not None:
        summary["test_bpb"] = bpb
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / STUDY_FILE).write_text(json.dumps({"name": name, "group": "main",
                                                  "wall_seconds": 12.0, **(meta or {})}))
    with (run_dir / "metrics.jsonl").open("w") as file:
        for step in range(10, STEPS + 1, 10):
            file.write(json.dumps({"kind": "step", "step": step, "lr": 0.1}) + "\n")
        for epoch in (1, 2):
            file.write(json.dumps({"kind": "epoch", "step": epoch * 50, "epoch": epoch,
                                   "test_acc": acc or 0.0}) + "\n")
    if pattern != "dense":
        with (run_dir / "sad.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["step", "epoch", "sad_prev_total", "sad_prev_frac",
                             "sad_init_total", "sad_init_frac"])
            for step in range(10, STEPS + 1, 10):
                writer.writerow([step, step // 50, sad, sad / 1000, sad, 0.1])
    return run_dir


def _records(root: Path) -> list:
    return [load_run(p) for p in sorted(root.iterdir())]


def _grid(root: Path, srste_acc: float, ste_acc: float, ste_sad: int, srste_sad: int,
          seeds: int = 3):
    for seed in range(seeds):
        jitter, wobble = JITTER[seed], WOBBLE[seed]
        _write_run(root, f"dense-{seed}", method="srste", pattern="dense", seed=seed,
                   acc=0.90 + jitter)
        _write_run(root, f"srste-{seed}", method="srste", pattern="1:8", seed=seed,
                   acc=srste_acc + jitter + wobble, sad=srste_sad + seed)
        _write_run(root, f"ste-{seed}", method="ste", pattern="1:8", seed=seed,
                   acc=ste_acc + jitter, sad=ste_sad)
    return _records(root)


def _claim(found, start: str):
    return next(c for c in found if c.claim.startswith(start))


@pytest.mark.parametrize(("kind", "low", "high", "margin", "verdict"), [
    ("greater", 0.1, 0.5, 0, REPRODUCED), ("greater", -0.5, -0.1, 0, REVERSED),
    ("greater", -0.1, 0.5, 0, UNDECIDED),
    ("within", -0.2, 0.4, 0.3, REPRODUCED), ("within", -0.9, -0.4, 0.3, REVERSED),
    ("within", -0.5, 0.1, 0.3, UNDECIDED),
    ("close", -0.2, 0.2, 0.3, REPRODUCED), ("close", 0.4, 0.9, 0.3, REVERSED),
    ("close", 0.1, 0.5, 0.3, UNDECIDED)])
def test_verdict_rules(kind, low, high, margin, verdict) -> None:
    assert verdict_of(kind, low, high, margin) == verdict


def test_srste_ahead_is_reproduced(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.85, ste_acc=0.80, ste_sad=50, srste_sad=5))
    beats = _claim(found, "SR-STE beats STE at 1:8")
    assert beats.verdict == REPRODUCED
    assert beats.effect.test == "paired" and beats.effect.n_a == 3
    assert beats.effect.effect == pytest.approx(5.0)  # points
    assert "95 % CI" in beats.comparison and "paired t" in beats.comparison
    assert _claim(found, "SR-STE lowers SAD at 1:8").verdict == REPRODUCED
    assert _claim(found, "SR-STE beats STE at 1:16").verdict == NOT_MEASURED
    assert _claim(found, "SR-STE 2:4 is within").verdict == NOT_MEASURED


def test_ste_ahead_is_reversed(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.80, ste_acc=0.85, ste_sad=5, srste_sad=50))
    assert _claim(found, "SR-STE beats STE at 1:8").verdict == REVERSED
    assert _claim(found, "SR-STE lowers SAD").verdict == REVERSED


def test_difference_inside_noise_is_not_decided(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.8001, ste_acc=0.80, ste_sad=5, srste_sad=5))
    assert _claim(found, "SR-STE beats STE at 1:8").verdict == UNDECIDED


def test_a_single_seed_decides_nothing(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.90, ste_acc=0.80, ste_sad=50, srste_sad=5,
                         seeds=1))
    claim = _claim(found, "SR-STE beats STE at 1:8")
    assert claim.verdict == UNDECIDED and "fewer than 2 seeds" in claim.comparison


def test_shared_seeds_are_paired_and_disjoint_seeds_use_welch(tmp_path) -> None:
    records = _grid(tmp_path / "a", srste_acc=0.85, ste_acc=0.80, ste_sad=50, srste_sad=5)
    records = [r for r in records if not (r.method == "ste" and r.seed == 2)]
    claim = _claim(claims(records), "SR-STE beats STE at 1:8")
    assert claim.effect.test == "paired" and claim.effect.n_a == 2  # seeds 0 and 1
    records = [r for r in records if r.method != "ste"]
    for seed in (7, 8):
        _write_run(tmp_path / "b", f"ste-{seed}", method="ste", pattern="1:8", seed=seed,
                   acc=0.80 + 0.001 * seed)
    claim = _claim(claims(records + _records(tmp_path / "b")), "SR-STE beats STE at 1:8")
    assert claim.effect.test == "Welch" and (claim.effect.n_a, claim.effect.n_b) == (3, 2)


def test_within_dense_and_lm(tmp_path) -> None:
    for seed, jitter in enumerate(JITTER):
        _write_run(tmp_path, f"dense-{seed}", method="srste", pattern="dense", seed=seed,
                   acc=0.900 + jitter)
        _write_run(tmp_path, f"sr24-{seed}", method="srste", pattern="2:4", seed=seed,
                   acc=0.899 + jitter + WOBBLE[seed])
        _write_run(tmp_path, f"sr48-{seed}", method="srste", pattern="4:8", seed=seed,
                   acc=0.880 + jitter + WOBBLE[seed])
        _write_run(tmp_path, f"lm-dense-{seed}", method="srste", pattern="dense", seed=seed,
                   bpb=2.00 + jitter, data="text")
        _write_run(tmp_path, f"lm-sr24-{seed}", method="srste", pattern="2:4", seed=seed,
                   bpb=2.10 + jitter + WOBBLE[seed], data="text")
        _write_run(tmp_path, f"lm-ste24-{seed}", method="ste", pattern="2:4", seed=seed,
                   bpb=2.20 + jitter, data="text")
    found = claims(_records(tmp_path))
    assert _claim(found, "SR-STE 2:4 is within 0.3").verdict == REPRODUCED  # -0.1 points
    assert _claim(found, "SR-STE 4:8 is within 0.3").verdict == REVERSED  # -2 points
    assert _claim(found, "4:8 beats 2:4").verdict == REVERSED
    # bits per byte: lower is better; 2.10 vs 2.00 is 5 % worse, past the 2 % margin
    assert _claim(found, "On a language model SR-STE 2:4").verdict == REVERSED
    assert _claim(found, "On a language model SR-STE beats STE").verdict == REPRODUCED


def test_render_writes_tables_and_figures(tmp_path) -> None:
    runs = tmp_path / "runs"
    records = _grid(runs, srste_acc=0.85, ste_acc=0.80, ste_sad=50, srste_sad=5)
    for seed in range(2):
        _write_run(runs, f"extra-{seed}", method="ste", pattern="1:8", seed=seed, acc=0.81,
                   meta={"group": "extra"})
    records = _records(runs)
    images = tmp_path / "images"
    text = render(records, "quick", images, command="python -m benchmarks.study")
    assert "| srste | 1:8 | 85.00 ± 0.07 | 3 | -5.00 [" in text
    assert "| dense | dense | 90.00 ± 0.10 | 3 | - |" in text
    assert "### Further methods" in text and "| ste | 1:8 | - | 81.00 ± 0.00 | 2 | -3.96 [" in text
    assert "reproduced" in text and NOT_MEASURED in text and "Tally:" in text
    # cumulative decay from the logged lr: 100 steps x 0.1 x 2e-4 = 0.002
    assert "| main | 1:8 | 0.0002 | 3 | 100 | 0.002 |" in text
    for name in ("study-sad.png", "study-curves.png", "study-density.png",
                 "study-sad-accuracy.png"):
        assert (images / name).is_file(), name


def test_bundle_round_trip_and_merge(tmp_path) -> None:
    records = _grid(tmp_path / "runs", srste_acc=0.85, ste_acc=0.80, ste_sad=50, srste_sad=5)
    bundle = pack("gpu", records, [r.name for r in records])
    wrapped = {"fixture": False, "results": {"study": bundle}}  # as in a GPU check report
    path = tmp_path / "report.json"
    path.write_text(json.dumps(wrapped))
    preset, back = read_bundle(path)
    assert preset == "gpu" and len(back) == len(records)
    assert sorted(r.score for r in back) == sorted(r.score for r in records)
    assert [c.verdict for c in claims(back)] == [c.verdict for c in claims(records)]
    text = render(records[:1], "quick", tmp_path / "images", command="x",
                  merged={"gpu": back})
    assert "## Preset `gpu`" in text and "study-gpu-sad.png" in text
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no study bundle"):
        read_bundle(tmp_path / "empty.json")
