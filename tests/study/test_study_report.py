"""The report generator on hand-made run folders: tables, figures and claim sentences."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from benchmarks.study.report import NOT_MEASURED, claims, load_run, render
from nmsparse.train.config import TrainConfig

STEPS = 100


def _write_run(root: Path, name: str, *, method: str, pattern: str, seed: int,
               acc: float | None = None, bpb: float | None = None, sad: int = 0,
               data: str = "fashion-mnist") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = TrainConfig(data=data, model="resnet20", pattern=pattern, method=method,
                         seed=seed, epochs=2, exclude=["fc"]).to_dict()
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [{"name": "conv", "macs_dense": 100, "density": 0.5 if pattern != "dense" else 1.0}]
    summary = {"test_acc": acc if acc is not None else 0.0, "test_loss": 0.5, "steps": STEPS,
               "wall_seconds": 10.0, "params_dense": 1000, "params_kept": 500,
               "macs_dense": 2_000_000, "macs_sparse": 1_000_000, "torch": "2.x",
               "device": "cpu", "summary": {"rows": rows}}
    if bpb is not None:
        summary["test_bpb"] = bpb
    (run_dir / "summary.json").write_text(json.dumps(summary))
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


def _grid(root: Path, srste_acc: float, ste_acc: float, ste_sad: int, srste_sad: int):
    for seed, jitter in enumerate((-0.001, 0.0, 0.001)):
        _write_run(root, f"dense-{seed}", method="srste", pattern="dense", seed=seed,
                   acc=0.90 + jitter)
        _write_run(root, f"srste-{seed}", method="srste", pattern="1:8", seed=seed,
                   acc=srste_acc + jitter, sad=srste_sad)
        _write_run(root, f"ste-{seed}", method="ste", pattern="1:8", seed=seed,
                   acc=ste_acc + jitter, sad=ste_sad)
    return _records(root)


def _claim(found, start: str):
    return next(c for c in found if c.claim.startswith(start))


def test_srste_ahead_is_reproduced(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.85, ste_acc=0.80, ste_sad=50, srste_sad=5))
    assert _claim(found, "SR-STE beats STE at 1:8").verdict == "reproduced"
    assert _claim(found, "STE's SAD is higher than SR-STE's at 1:8").verdict == "reproduced"
    assert _claim(found, "SR-STE beats STE at 1:16").verdict == NOT_MEASURED
    assert _claim(found, "SR-STE 2:4 is within").verdict == NOT_MEASURED
    assert "seed noise" in _claim(found, "SR-STE beats STE at 1:8").comparison


def test_ste_ahead_is_reversed(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.80, ste_acc=0.85, ste_sad=5, srste_sad=50))
    assert _claim(found, "SR-STE beats STE at 1:8").verdict == "reversed"
    assert _claim(found, "STE's SAD is higher").verdict == "reversed"


def test_difference_inside_noise_is_not_reproduced(tmp_path) -> None:
    found = claims(_grid(tmp_path, srste_acc=0.8005, ste_acc=0.80, ste_sad=5, srste_sad=5))
    assert _claim(found, "SR-STE beats STE at 1:8").verdict.startswith("not reproduced")


def test_within_dense_and_lm(tmp_path) -> None:
    _write_run(tmp_path, "dense", method="srste", pattern="dense", seed=0, acc=0.900)
    _write_run(tmp_path, "sr24", method="srste", pattern="2:4", seed=0, acc=0.898)
    _write_run(tmp_path, "sr48", method="srste", pattern="4:8", seed=0, acc=0.880)
    _write_run(tmp_path, "lm-dense", method="srste", pattern="dense", seed=0, bpb=2.00,
               data="text")
    _write_run(tmp_path, "lm-sr24", method="srste", pattern="2:4", seed=0, bpb=2.10,
               data="text")
    found = claims(_records(tmp_path))
    # one seed each: the verdict says it stands on a single seed
    assert _claim(found, "SR-STE 2:4 is within 0.3").verdict == "reproduced (single seed)"
    assert _claim(found, "SR-STE 4:8 is within 0.3").verdict == "not reproduced (single seed)"
    assert _claim(found, "4:8 >= 2:4").verdict == "reversed (single seed)"
    assert "single seed" in _claim(found, "4:8 >= 2:4").comparison
    assert _claim(found, "On a language model SR-STE 2:4").verdict.startswith("not reproduced")


def test_render_writes_tables_and_figures(tmp_path) -> None:
    records = _grid(tmp_path / "runs", srste_acc=0.85, ste_acc=0.80, ste_sad=50, srste_sad=5)
    images = tmp_path / "images"
    text = render(records, "quick", images, command="python -m benchmarks.study")
    assert "| srste | 1:8 | 85.00 ± 0.10 | 3 |" in text
    assert "| dense | dense | 90.00 ± 0.10 | 3 | - |" in text
    assert "reproduced" in text and NOT_MEASURED in text
    # cumulative decay from the logged lr: 100 steps x 0.1 x 2e-4
    assert "sum_t lr_t * decay = 0.002" in text
    assert (images / "study-sad-1of8.png").is_file()
    assert (images / "study-density.png").is_file()
    assert (images / "study-curves.png").is_file()
