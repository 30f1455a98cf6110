"""The run's machine-readable log: one JSON object per line in ``metrics.jsonl``.

Every record has ``kind`` ("step", "epoch" or "final") and the global ``step``. On resume the
records written after the checkpoint are dropped, so the log reads as one unbroken run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ...atomic import atomic_open
from .run_dir import append_text

METRICS = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf: write them as null rather than emit a file other tools reject
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    def __init__(self, run_dir: Path | None, *, tensorboard: bool = False) -> None:
        self.path = run_dir / METRICS if run_dir else None
        self.writer = None
        if run_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: "
                                 "pip install 'nmsparse[tensorboard]'") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only the records up to ``step`` (called when resuming from a checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        kept = [line for line in read(self.path) if line["step"] <= step
                and line["kind"] != "final"]
        with atomic_open(self.path, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in kept)

    def write(self, kind: str, step: int, **values: Any) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        append_text(self.path, json.dumps(record) + "\n")  # never through a planted link
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the log
    return records
