"""The finished runs as read from their folders, and how the report groups them into rows.

Every number comes from files the training wrote (``config.json``, ``summary.json``,
``metrics.jsonl``, ``sad.csv``) or the runner wrote (``study_run.json``: group, label,
command, wall time). A row of a table is a ``(row, pattern)`` key, ``row`` being the method
name, or ``asp-1x`` for ASP trained at the same total budget as the one-phase methods.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmsparse.app.train import metrics_log

from .runner import STUDY_FILE

PAPER_DEFAULT_DECAY = 2e-4


@dataclass
class RunRecord:
    """One finished run folder, as read from disk."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sad: list[dict[str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def group(self) -> str:
        return self.meta.get("group", "main")

    @property
    def method(self) -> str:
        return "dense" if self.pattern == "dense" else self.config["method"]

    @property
    def row(self) -> str:
        """The method's row name: ``asp-1x`` for ASP at the one-phase methods' budget."""
        if self.method == "asp" and str(self.meta.get("label", "")).startswith("equal"):
            return "asp-1x"
        return self.method

    @property
    def pattern(self) -> str:
        p = self.config["pattern"]
        return "dense" if p.strip().lower() == "dense" else p

    @property
    def lm(self) -> bool:
        return "test_bpb" in self.summary

    @property
    def score(self) -> float:
        """Top-1 in percent, or bits per byte for a language model."""
        return self.summary["test_bpb"] if self.lm else 100.0 * self.summary["test_acc"]

    @property
    def wall(self) -> float:
        return self.meta.get("wall_seconds", self.summary["wall_seconds"])

    @property
    def sad_total(self) -> float | None:
        """SAD summed over training: the mask flips of every logged interval."""
        if not self.sad:
            return None
        return sum(row["sad_prev_total"] for row in self.sad)

    def cumulative_decay(self) -> tuple[int, float] | None:
        """(steps, sum over steps of lr_t * decay) from the logged lr (step records)."""
        if self.method != "srste":
            return None
        steps = [r for r in self.metrics if r.get("kind") == "step" and r.get("lr") is not None]
        if not steps:
            return None
        total, previous = 0.0, 0
        for record in steps:  # each logged lr stands for the steps since the previous log
            total += record["lr"] * (record["step"] - previous)
            previous = record["step"]
        last = int(self.summary.get("steps", previous))  # steps after the last log record
        total += steps[-1]["lr"] * max(0, last - previous)
        return max(last, previous), total * self.decay

    @property
    def decay(self) -> float:
        # saved before decay became a method option: the top-level key (2e-4 by default)
        legacy = self.config.get("decay")
        return float(self.config.get("method_options", {}).get(
            "decay", PAPER_DEFAULT_DECAY if legacy is None else legacy))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_run(run_dir: Path) -> RunRecord | None:
    """The record of a finished run folder, or None when it holds no summary.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return None
    record = RunRecord(run_dir, _read_json(run_dir / "config.json"),
                       _read_json(run_dir / "summary.json"))
    if (run_dir / STUDY_FILE).is_file():
        record.meta = _read_json(run_dir / STUDY_FILE)
    if (run_dir / metrics_log.METRICS).is_file():  # the trainer's own reader: a line cut
        record.metrics = metrics_log.read(run_dir / metrics_log.METRICS)  # by a crash ends it
    if (run_dir / "sad.csv").is_file():
        with (run_dir / "sad.csv").open(encoding="utf-8") as file:
            record.sad = [{k: float(v) for k, v in row.items() if v != ""}
                          for row in csv.DictReader(file)]
    return record


Key = tuple[str, str]  # (row, pattern)


def groups(records: list[RunRecord], where: Callable[[RunRecord], bool],
           key: Callable[[RunRecord], Any]) -> dict[Any, list[RunRecord]]:
    out: dict[Any, list[RunRecord]] = {}
    for record in records:
        if where(record):
            out.setdefault(key(record), []).append(record)
    return out


def is_main(r: RunRecord) -> bool:
    # The paper-shaped table: default decay and hardware layout (dense rows have neither).
    if r.lm or r.group == "extra":
        return False
    return r.method == "dense" or (r.config["layout"] == "in" and (
        r.method != "srste" or r.decay == PAPER_DEFAULT_DECAY))


def main_groups(records: list[RunRecord]) -> dict[Key, list[RunRecord]]:
    return groups(records, is_main, lambda r: (r.row, r.pattern))


def lm_groups(records: list[RunRecord]) -> dict[Key, list[RunRecord]]:
    return groups(records, lambda r: r.lm, lambda r: (r.row, r.pattern))


def extra_groups(records: list[RunRecord]) -> dict[tuple[str, str, str], list[RunRecord]]:
    """The extra method rows, keyed (method, pattern, options as text)."""
    def key(r: RunRecord) -> tuple[str, str, str]:
        options = ", ".join(f"{k}={v}" for k, v in sorted(r.config["method_options"].items()))
        return (r.method, r.pattern, options)

    return groups(records, lambda r: not r.lm and r.group == "extra", key)


def decay_groups(records: list[RunRecord]) -> dict[float, list[RunRecord]]:
    """SR-STE runs at the single pattern that was swept (more than two decays)."""
    by_pattern = groups(records, lambda r: not r.lm and r.method == "srste"
                        and r.group != "extra" and r.config["layout"] == "in",
                        lambda r: r.pattern)
    for rs in by_pattern.values():
        decays = groups(rs, lambda r: True, lambda r: r.decay)
        if len(decays) > 2:
            return decays
    return {}


def layout_groups(records: list[RunRecord], pattern: str) -> dict[str, list[RunRecord]]:
    out = groups(records, lambda r: not r.lm and r.method == "srste" and r.pattern == pattern
                 and r.group != "extra" and r.decay == PAPER_DEFAULT_DECAY,
                 lambda r: r.config["layout"])
    return out if "flat" in out else {}
