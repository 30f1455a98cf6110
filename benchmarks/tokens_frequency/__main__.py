"""``python -m benchmarks.tokens_frequency [--only PREFIX] [--report-only] [--list]``: run
the grid (see ``grid.py`` for sizes and budget), then write ``docs/tokens_frequency.md``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .grid import all_runs
from .runner import DEFAULT_ROOT, run_one


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokens_frequency")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="run folders")
    parser.add_argument("--only", default="", help="run only names starting with this")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    runs = [run for run in all_runs() if run.name.startswith(args.only)]
    if args.list:
        for run in runs:
            done = (args.root / run.name / "summary.json").is_file()
            print(f"{'done' if done else 'todo':5} {run.name}")
        return
    if not args.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for run in runs:
            run_one(run, args.root)
    from .report import write_report  # matplotlib only when reporting

    print(write_report(args.root))


if __name__ == "__main__":
    main()
