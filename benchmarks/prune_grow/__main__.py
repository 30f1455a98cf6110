"""Run the reproductions into run folders, then write the report.

    .venv/bin/python -m benchmarks.prune_grow                 # every run not done yet, report
    .venv/bin/python -m benchmarks.prune_grow --only dst      # one experiment
    .venv/bin/python -m benchmarks.prune_grow --report-only

Each run writes ``benchmarks/prune_grow/runs/<experiment>-<arm>-seed<k>/result.json``
(written atomically; an existing one is kept, so an interrupted set continues where it
stopped). One thread per process (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from nmsparse.atomic import atomic_open  # noqa: E402

from . import experiments, report  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prune_grow")
    parser.add_argument("--only", choices=sorted(experiments.EXPERIMENTS), action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(experiments.SEEDS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.report_only:
        data = experiments.load_data()
        for name in args.only or experiments.EXPERIMENTS:
            fn, arms = experiments.EXPERIMENTS[name]
            for seed in args.seeds:
                for arm in arms:
                    folder = RUNS / f"{name}-{arm}-seed{seed}"
                    if (folder / "result.json").exists():
                        continue
                    result = experiments.timed(fn, data, arm, seed)
                    result.update(experiment=name, arm=arm, seed=seed)
                    folder.mkdir(parents=True, exist_ok=True)
                    with atomic_open(folder / "result.json") as file:
                        json.dump(result, file, indent=1)
                    print(f"{folder.name}: {result['accuracy']} "
                          f"({result['cpu_seconds']} CPU s)", flush=True)
    print(report.write(RUNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
