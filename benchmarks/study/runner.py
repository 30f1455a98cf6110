"""Run the grid through the real ``nmsparse train`` command, one folder per run.

Each run is a subprocess (``python -m nmsparse train ...``): the same code path as a user's
run, a crash or out-of-memory in one run cannot take the study down, and the exact command
can be written into the report. A folder with ``summary.json`` for the same configuration is
skipped; a folder with a checkpoint but no summary is resumed with ``--resume``; anything else
in the folder (a run killed before its first checkpoint) is cleared and started again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nmsparse.app.train.config import TrainConfig

from .grid import NOT_HASHED, RunSpec

STUDY_FILE = "study_run.json"  # written by the runner next to the training outputs
DEFAULT_ROOT = Path(__file__).resolve().parent / "runs"


def train_args(config: TrainConfig, out: Path) -> list[str]:
    """The ``nmsparse train`` flags that reproduce ``config`` exactly (every field given,
    so a later change of a default cannot change what a listed command means)."""
    args: list[str] = []
    for key, value in config.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if key in ("out", "tensorboard"):
            continue
        if key == "plots":
            args += [] if value else ["--no-plots"]
        elif key in ("model_options", "method_options"):  # --model-option KEY=VALUE ...
            for name, option in value.items():
                args += [flag[:-1], f"{name}={json.dumps(option)}"]
        elif isinstance(value, list):
            if value:
                args += [flag, *value]
        elif value is None:
            continue
        else:
            args += [flag, str(value)]
    return [*args, "--out", str(out)]


def _same_config(run_dir: Path, config: TrainConfig) -> bool:
    path = run_dir / "config.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    wanted = config.to_dict()
    return all(saved.get(k) == wanted[k] for k in wanted if k not in NOT_HASHED)


def state_of(spec: RunSpec, root: Path) -> str:
    """``done``, ``partial`` (a checkpoint to resume), ``stale`` or ``todo``."""
    run_dir = root / spec.name
    config = spec.config()
    if (run_dir / "summary.json").is_file() and _same_config(run_dir, config):
        return "done"
    if (run_dir / "latest.pt").is_file() and _same_config(run_dir, config):
        return "partial"
    if run_dir.exists():
        return "stale"
    return "todo"


def command_for(spec: RunSpec, root: Path, resume: bool) -> list[str]:
    run_dir = root / spec.name
    if resume:
        return [sys.executable, "-m", "nmsparse", "train", "--resume", str(run_dir)]
    return [sys.executable, "-m", "nmsparse", "train",
            *train_args(spec.config(), run_dir)]


def run_one(spec: RunSpec, root: Path, *, quiet: bool = False,
            say: Callable[[str], None] = print, threads: int | None = None,
            ) -> dict[str, Any]:
    """Bring one run to ``done``; returns what happened (skipped / resumed / ran).

    ``threads``: CPU threads of the training process (OMP/MKL), None for PyTorch's default;
    one thread per run is much faster than the default on a shared machine."""
    run_dir = root / spec.name
    state = state_of(spec, root)
    if state == "done":
        return {"run": spec.name, "action": "skipped"}
    if state == "stale":  # killed before any checkpoint, or a different config: start over
        shutil.rmtree(run_dir)
    resume = state == "partial"
    command = command_for(spec, root, resume)
    root.mkdir(parents=True, exist_ok=True)
    say(f"[study] {'resume' if resume else 'run'} {spec.name}")
    started = time.perf_counter()
    log_path = root / f"{spec.name}.log"
    with log_path.open("a", encoding="utf-8") as log:
        # The full output goes to <run>.log next to the folder (the console gets one line).
        env = None
        if threads is not None:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads)}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4 gives this child's own CPU time (user + system), also when runs go side by side.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"run {spec.name} failed (exit {process.returncode}):\n{tail}")
    # Keep the original command (not the --resume one) and add up wall time over pieces.
    meta_path = run_dir / STUDY_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    first = command_for(spec, root, resume=False)
    meta.update({
        "run_id": spec.run_id, "name": spec.name, "group": spec.group,
        "overrides": spec.overrides,
        "command": ["nmsparse", "train", *first[4:]],
        "wall_seconds": meta.get("wall_seconds", 0.0) + wall,
        "cpu_seconds": meta.get("cpu_seconds", 0.0) + cpu,
        "pieces": meta.get("pieces", 0) + 1,
        "label": spec.label, "threads": threads,
    })
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    if not quiet:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        metric = (f"bpb {summary['test_bpb']:.4f}" if "test_bpb" in summary
                  else f"acc {summary['test_acc']:.4f}")
        say(f"[study] done {spec.name}: {metric} in {wall:.0f} s")
    return {"run": spec.name, "action": "resumed" if resume else "ran", "wall": wall}


def run_all(specs: list[RunSpec], root: Path, jobs: int = 1, *, quiet: bool = False,
            say: Callable[[str], None] = print, threads: int | None = None,
            ) -> list[dict[str, Any]]:
    """Every run, sequentially by default (one training process already uses every core)."""
    def one(spec: RunSpec) -> dict[str, Any]:
        return run_one(spec, root, quiet=quiet, say=say, threads=threads)

    if jobs <= 1:
        return [one(spec) for spec in specs]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, specs))


def listing(specs: list[RunSpec], root: Path) -> str:
    lines = [f"{'state':8} {'group':7} run"]
    for spec in specs:
        lines.append(f"{state_of(spec, root):8} {spec.group:7} {spec.name}")
    done = sum(state_of(s, root) == "done" for s in specs)
    lines.append(f"{done} of {len(specs)} done under {root}")
    return "\n".join(lines)
