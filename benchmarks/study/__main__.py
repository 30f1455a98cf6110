"""``python -m benchmarks.study``: run the grid of a preset, then write the report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .bundle import read_bundle, write_bundle
from .grid import PRESETS, expand
from .runner import DEFAULT_ROOT, listing, run_all

REPO = Path(__file__).resolve().parents[2]
GPU_REPORT = REPO / "benchmarks" / "results" / "gpu" / "report.json"


def _holds_bundle(path: Path) -> bool:
    try:
        read_bundle(path)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--only", metavar="SUBSTRING", help="only runs whose name contains it")
    parser.add_argument("--list", action="store_true", help="show the grid and what is done")
    parser.add_argument("--report-only", action="store_true", help="only write the report")
    parser.add_argument("--no-report", action="store_true", help="only run, no report")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per training process (default: PyTorch's)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="results root")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="also pack the preset's finished runs into this JSON file")
    parser.add_argument("--merge", type=Path, action="append", default=None,
                        help="merge another preset's bundle (or a GPU check report.json "
                             "holding one) into the report (default: "
                             f"{GPU_REPORT.relative_to(REPO)} when it holds one)")
    parser.add_argument("--data-dir", default=None,
                        help="where Fashion-MNIST is, if not at the preset's path (gives the "
                             "runs other ids)")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args(argv)

    specs = expand(args.preset, data_dir=args.data_dir)
    if args.only:
        specs = [s for s in specs if args.only in s.name]
    if args.list:
        print(listing(specs, args.root))
        if args.bundle:
            write_bundle(args.bundle, args.preset, args.root, [s.name for s in specs])
        return 0
    if not args.report_only:
        started = time.perf_counter()
        try:
            run_all(specs, args.root, jobs=args.jobs, threads=args.threads)
        finally:  # a study cut short (a time cap) still returns what it finished
            if args.bundle:
                data = write_bundle(args.bundle, args.preset, args.root,
                                    [s.name for s in specs])
                print(f"[study] bundle {args.bundle}: {data['summary']}")
        print(f"[study] {len(specs)} runs in {time.perf_counter() - started:.0f} s")
    if not args.no_report:
        from .report import write_report

        # The command that reproduces the runs and the report (not the --report-only pass).
        given = sys.argv[1:] if argv is None else argv
        command = "python -m benchmarks.study " + shlex.join(
            [a for a in given if a not in ("--report-only", "--no-report")])
        merge = args.merge
        if merge is None and GPU_REPORT.is_file() and args.preset != "gpu":
            merge = [GPU_REPORT] if _holds_bundle(GPU_REPORT) else []
        write_report(args.root, args.preset, args.results, args.images, command=command,
                     merge=merge)
        print(f"[study] report: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
