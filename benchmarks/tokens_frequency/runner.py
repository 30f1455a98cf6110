"""Run the grid in this process through ``nmsparse.app.cli.main.main`` (the code path of
``nmsparse train``; one process spares each run the import and start-up time), one folder
per run under ``runs/``, its console output in ``<run>.log``. A folder with ``summary.json``
is skipped, anything else in its place is cleared and run again. After a gate run, the
static top-k channels of its trained gate are written to ``bench_run.json`` for the run
that needs them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from nmsparse.app.cli.main import main
from nmsparse.app.models.frequency import top_channels
from nmsparse.app.train.trainer import load_trained

from .grid import Run

META = "bench_run.json"
DEFAULT_ROOT = Path(__file__).resolve().parent / "runs"


def gate_result(run_dir: Path, keep: int) -> dict:
    """The trained gate of a gate run: its logits, inference kept fraction and top-k."""
    _, _, model, _ = load_trained(run_dir / "latest.pt", with_data=False)
    return {"gate_logits": model.gate.logits.detach().tolist(),
            "gate_kept_fraction": model.gate.kept_fraction(),
            "gate_expected_fraction": model.gate.expected_fraction(),
            "top_channels": top_channels(model.gate, keep)}


def run_one(run: Run, root: Path, say=print) -> None:
    run_dir = root / run.name
    if (run_dir / "summary.json").is_file():
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    channels = None
    if run.needs is not None:
        channels = json.loads((root / run.needs / META).read_text())["top_channels"]
    args = run.args(str(run_dir), channels)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(root / f"{run.name}.log", "w", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(args)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"run {run.name} failed (exit {code}); see {root / run.name}.log")
    meta = {"name": run.name, "group": run.group, "labels": run.labels, "seed": run.seed,
            "command": ["nmsparse", *args], "wall_seconds": wall, "channels": channels}
    if run.group == "gate":
        meta.update(gate_result(run_dir, run.keep))
    (run_dir / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    summary = json.loads((run_dir / "summary.json").read_text())
    say(f"[bench] {run.name}: acc {summary['test_acc']:.4f} in {wall:.0f} s")
