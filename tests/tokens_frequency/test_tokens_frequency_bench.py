"""The token/frequency benchmark: its grid (order, flags that parse) and its report on
hand-made run folders (tables hold exactly the numbers written there)."""

from __future__ import annotations

import json

from benchmarks.tokens_frequency import report
from benchmarks.tokens_frequency.grid import all_runs
from benchmarks.tokens_frequency.runner import META
from nmsparse.app.cli.main import build_parser


def test_grid_counts_order_and_flags_parse():
    runs = all_runs()
    names = [run.name for run in runs]
    assert len(names) == len(set(names)) == 18 + 3 * 6
    for index, run in enumerate(runs):
        if run.needs is not None:  # a gate run comes before the run using its channels
            assert run.needs in names[:index]
        args = run.args("/tmp/out", [0, 1] if run.needs else None)
        parsed = build_parser().parse_args(args)
        assert parsed.model == run.model and parsed.seed == run.seed


def write_run(root, name, group, labels, acc, macs_dense, macs_sparse, **extra):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(
        {"test_acc": acc, "macs_dense": macs_dense, "macs_sparse": macs_sparse}))
    (folder / META).write_text(json.dumps(
        {"name": name, "group": group, "labels": labels, "seed": 0, "wall_seconds": 60.0,
         "channels": extra.pop("channels", None), **extra}))


def test_report_tables_hold_the_run_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "DOC", tmp_path / "docs" / "tf.md")
    monkeypatch.setattr(report, "IMAGES", tmp_path / "docs" / "images")
    monkeypatch.setattr(report, "REPO", tmp_path)
    root = tmp_path / "runs"
    write_run(root, "a", "tokens", {"keep_ratio": 1.0, "weights": "dense"}, 0.8, 4e6, 4e6)
    write_run(root, "b", "tokens", {"keep_ratio": 0.5, "weights": "2:4"}, 0.75, 2e6, 1e6)
    write_run(root, "c", "frequency", {"input": "spatial 4x down"}, 0.70, 3e6, 3e6)
    write_run(root, "d", "frequency", {"input": "DCT quarter"}, 0.72, 3e6, 3e6,
              channels=[0, 1, 4, 5])
    write_run(root, "e", "gate", {"target": 0.25}, 0.6, 3e6, 3e6, gate_kept_fraction=0.1875,
              gate_expected_fraction=0.25)
    report.write_report(root)
    text = (tmp_path / "docs" / "tf.md").read_text()
    assert "| dense | 1.0 | 49 / 49 | 0.8000 | 4.00M | 4.00M | 1 | 60 |" in text
    assert "| 2:4 | 0.5 | 24 / 12 | 0.7500 | 2.00M | 1.00M | 1 | 60 |" in text
    assert "2:4 weights, keep ratio 0.5: 4.00x fewer MACs" in text and "-5.00 points" in text
    assert "| DCT quarter | 4 x 7x7 = 196 | 0.7200 | 3.00M | 0,1,4,5 | 1 | 60 |" in text
    assert "DCT quarter (196 input numbers): accuracy +2.00 points" in text
    assert "| 0.25 | 0.188 | 0.250 | 0.6000 | 1 |" in text
    assert (tmp_path / "docs" / "images" / "tokens-acc-vs-macs.png").stat().st_size > 1000
