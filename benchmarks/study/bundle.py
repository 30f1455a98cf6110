"""A preset's finished runs packed into one JSON file, and read back as run records.

A lent GPU machine returns at most 8 files, so the ``gpu`` preset's run folders cannot come
back as they are: the GPU check packs them (config, summary without per-layer tables beyond
what the report draws, the runner's metadata, the epoch and step records the report reads,
the SAD rows) into one bundle, and the report merges that bundle as its own section. The
bundle may also sit inside a GPU check ``report.json`` (the study part's result): reading
looks for the first object carrying the ``study_bundle`` marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import RunRecord, load_run

MARKER = "study_bundle"
VERSION = 1
_METRIC_KEYS = ("kind", "step", "epoch", "lr", "test_acc", "test_bpb")


def pack(preset: str, records: list[RunRecord], planned: list[str]) -> dict[str, Any]:
    runs = []
    for r in records:
        metrics = [{k: m[k] for k in _METRIC_KEYS if k in m} for m in r.metrics
                   if m.get("kind") in ("step", "epoch")]
        runs.append({"name": r.name, "config": r.config, "summary": r.summary,
                     "meta": r.meta, "metrics": metrics, "sad": r.sad})
    done = len(runs)
    return {MARKER: VERSION, "preset": preset, "planned": planned, "runs": runs,
            "summary": f"study preset {preset}: {done} of {len(planned)} runs finished"}


def write_bundle(path: Path, preset: str, root: Path, names: list[str]) -> dict[str, Any]:
    """Pack the finished runs among ``names`` (folders under ``root``) into ``path``."""
    records = [r for r in (load_run(root / name) for name in names) if r]
    data = pack(preset, records, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return data


def _find(data: Any) -> dict[str, Any] | None:
    if isinstance(data, dict):
        if data.get(MARKER) == VERSION:
            return data
        children = data.values()
    elif isinstance(data, list):
        children = data
    else:
        return None
    for child in children:
        found = _find(child)
        if found is not None:
            return found
    return None


def read_bundle(path: Path) -> tuple[str, list[RunRecord]]:
    """(preset, records) of the bundle in ``path`` (a bundle or a GPU check report.json)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read study bundle {path}: {error}") from None
    bundle = _find(data)
    if bundle is None:
        raise ValueError(f"{path} holds no study bundle (a JSON object with "
                         f"\"{MARKER}\": {VERSION}); write one with --bundle")
    records = [RunRecord(Path(run["name"]), run["config"], run["summary"], run["meta"],
                         run["metrics"], run["sad"]) for run in bundle["runs"]]
    return bundle["preset"], records
