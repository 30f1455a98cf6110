"""``python -m benchmarks.gpu_check --out DIR [--dry-run]``: see :mod:`benchmarks.gpu_check`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .plan import BUDGET_S, MIN_START_S, SELECTABLE_NAMES, Step, steps
from .runner import Outcome, run_capped

ROOT = Path(__file__).resolve().parents[2]
LOG_NAME = "log.txt"
LOG_PART_CHARS = 2 * 2**20  # each part's output kept in log.txt: its last 2 MiB
EXIT_INCOMPLETE = 1


def parse_only(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SELECTABLE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none)'}; "
                                         f"accepted: {', '.join(SELECTABLE_NAMES)}")
    return names


def parse_budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= BUDGET_S:
        raise argparse.ArgumentTypeError(f"budget {text!r} must be a number of seconds in "
                                         f"(0, {BUDGET_S:.0f}]")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Every CUDA path of nmsparse checked and measured in one run of at most "
                    f"{BUDGET_S / 60:.0f} minutes, each part under its own time cap; Markdown "
                    "and JSON results in one folder (docs/gpu.md).")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the results: created, or empty (nothing is overwritten)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: every part runs with fixture numbers and no GPU call")
    parser.add_argument("--only", type=parse_only, default=None,
                        help="comma-separated parts to run (default: all but the opt-in "
                             "study): " + ", ".join(SELECTABLE_NAMES))
    parser.add_argument("--budget", type=parse_budget, default=BUDGET_S,
                        help=f"seconds for all parts together (default and maximum "
                             f"{BUDGET_S:.0f})")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs the parts (default: this one)")
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder; give a new or "
                     "empty folder (nothing is overwritten)")
    return args


def part_env() -> dict[str, str]:
    """Parts import nmsparse from src/ even if the install failed, and benchmarks from here."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def gpu_gate(outcome: Outcome, result: dict | None) -> str:
    """Why the GPU parts cannot run ("" if they can), from the machine part."""
    if outcome.status != "ok" or result is None:
        return f"the machine part did not finish ({outcome.status}: {outcome.reason})"
    data = result.get("data", {})
    if data.get("cuda") is False:
        return result.get("summary", "no CUDA GPU")
    return data.get("problem") or ""


def tests_summary(step: Step, outcome: Outcome, work: Path, dry_run: bool) -> dict:
    """Counts of the CUDA tests: from the JUnit file, or the collection line of a dry run."""
    if dry_run:
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", outcome.tail)
        return {"collected": int(found.group(1)) if found else None, "run": False}
    path = work / "junit.xml"
    if not path.exists():  # killed at its cap: count the verbose lines it got to
        log = (work / "tests.log").read_text(errors="replace") \
            if (work / "tests.log").exists() else ""
        counts = {word: len(re.findall(rf"::\S+ {word}\b", log))
                  for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        return {"run": False, "error": "no JUnit report (pytest did not finish); from its "
                f"log: {counts['PASSED']} passed, {counts['FAILED']} failed, "
                f"{counts['ERROR']} errors, {counts['SKIPPED']} skipped before it stopped"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": message[0][:200] if message else ""})
    return {"run": True, **counts, "passed": counts["tests"] - counts["failures"]
            - counts["errors"] - counts["skipped"], "failed": failed}


def read_result(step: Step, outcome: Outcome, results: dict[str, dict]) -> None:
    """The part's JSON into ``results``; a killed part's partial result is kept, marked."""
    try:
        result = json.loads(step.result.read_text())
    except (OSError, ValueError) as exc:
        if outcome.status == "ok":
            outcome.status, outcome.reason = "failed", f"no readable result: {exc}"
        return
    if result.get("partial"):
        if outcome.status == "ok":
            outcome.status, outcome.reason = "failed", "exited with a partial result"
        outcome.reason += "; partial result kept"
        result["summary"] = f"PARTIAL: {result.get('summary', '')}"
    results[step.part.name] = result


def append_log(log: Path, name: str, outcome: Outcome, part_log: Path) -> None:
    text = part_log.read_text(errors="replace") if part_log.exists() else ""
    if len(text) > LOG_PART_CHARS:
        text = f"[... {len(text) - LOG_PART_CHARS} earlier characters left out ...]\n" \
               + text[-LOG_PART_CHARS:]
    with log.open("a") as handle:
        handle.write(f"\n===== {name}: {outcome.status} in {outcome.seconds:.1f} s "
                     f"(cap {outcome.cap_s:.0f} s) {outcome.reason}\n{text}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / LOG_NAME
    log.write_text(f"nmsparse GPU check{' (DRY RUN: fixtures)' if args.dry_run else ''}, "
                   f"{date}\n")
    plan = steps(args.python, work, args.dry_run, args.only)
    outcomes: dict[str, Outcome] = {}
    results: dict[str, dict] = {}
    tests: dict = {}
    gate = ""
    try:
        for step in plan:
            part = step.part
            left = deadline - time.perf_counter()
            if part.gpu and gate:
                outcome = Outcome("skipped", reason=f"no usable GPU: {gate}")
            elif left < MIN_START_S:
                outcome = Outcome("skipped", reason=f"{left:.0f} s left of the {args.budget:.0f}"
                                  " s budget")
            else:
                print(f"[gpu-check] {part.name} (cap {min(part.cap_s, left):.0f} s) ...",
                      flush=True)
                part_log = work / f"{part.name}.log"
                outcome = run_capped(step.command, min(part.cap_s, left), part_log, ROOT,
                                     {**part_env(), **step.env})
                append_log(log, part.name, outcome, part_log)
            if step.result is not None and outcome.status != "skipped":
                read_result(step, outcome, results)
            if part.name == "machine" and outcome.status != "skipped":
                gate = gpu_gate(outcome, results.get("machine"))
            if part.name == "tests" and outcome.status != "skipped":
                tests = tests_summary(step, outcome, work, args.dry_run)
            outcomes[part.name] = outcome
            print(f"[gpu-check] {part.name}: {outcome.status} {outcome.seconds:.1f} s "
                  f"{outcome.reason}", flush=True)
        from .report import write_report

        command = "python -m benchmarks.gpu_check " + shlex.join(argv)
        written = write_report(args.out, plan=plan, outcomes=outcomes, results=results,
                               tests=tests, dry_run=args.dry_run, date=date,
                               command=command, budget=args.budget,
                               seconds=time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in written:
        print(f"[gpu-check] wrote {path}")
    complete = all(outcome.status == "ok" for outcome in outcomes.values())
    return 0 if complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
