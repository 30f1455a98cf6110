"""The GPU check's results: ``report.md`` and ``report.json`` (and ``kernels.md``, the
benchmark page to copy to docs/) in the output folder, each written whole or not at all.

In a dry run every number comes from :mod:`benchmarks.gpu_check.fixtures`: the report opens
with a banner saying so, every section title ends in "(FIXTURE)", and the JSON holds
``"fixture": true`` at the top and in every part's result.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from .plan import Step
from .runner import Outcome

OVERHEAD_TARGET = 1.05
DRY_BANNER = ("> **DRY RUN: every number in this report is a FIXTURE (made up in "
              "benchmarks/gpu_check/fixtures.py), not a measurement.** It checks that the GPU "
              "check runs end to end; nothing here says anything about a GPU.")


def _write(path: Path, text: str) -> Path:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return path


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def overhead_rows(results: dict) -> list[dict]:
    rows = []
    for name in ("overhead-eager", "overhead-compiled"):
        rows += results.get(name, {}).get("data", {}).get("rows", [])
    return rows


def overhead_targets(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        ratio = row.get("ratio")
        target = row.get("target") or OVERHEAD_TARGET
        out.append([f"SR-STE 2:4 training step, {row['refresh']} mask refresh",
                    f"{row['model'].split(' (')[0]}, {row['size']}", "srste",
                    _fmt(ratio, ".3f", "x") if ratio else "not measured", f"<= {target}x",
                    "-" if not ratio else "yes" if ratio <= target else "no"])
    return out


def write_report(out: Path, *, plan: list[Step], outcomes: dict[str, Outcome],
                 results: dict[str, dict], tests: dict, dry_run: bool, date: str,
                 command: str, budget: float, seconds: float) -> list[Path]:
    """Write the report files; returns their paths. If the tables cannot be built (a broken
    import, say), report.md says why and report.json still holds everything."""
    parts = []
    for step in plan:
        outcome = outcomes.get(step.part.name, Outcome("skipped", reason="not reached"))
        parts.append({"part": step.part.name, "title": step.part.title,
                      "cap_s": step.part.cap_s, "status": outcome.status,
                      "seconds": round(outcome.seconds, 1), "returncode": outcome.returncode,
                      "reason": outcome.reason, "note": step.note,
                      "summary": results.get(step.part.name, {}).get("summary", ""),
                      "command": step.command})
    payload = {"fixture": dry_run, "date": date, "command": command, "budget_s": budget,
               "seconds": round(seconds, 1), "parts": parts, "tests": tests,
               "results": results}
    written = []
    try:
        markdown, kernels_page, targets = _render(parts, results, tests, dry_run, date,
                                                  command, budget, seconds)
        payload["targets"] = targets
    except Exception:  # noqa: BLE001 - the JSON must still come out
        error = traceback.format_exc()
        payload["report_error"] = error
        markdown = ("# nmsparse GPU check\n\n" + (DRY_BANNER + "\n\n" if dry_run else "")
                    + "The Markdown tables could not be built; report.json holds the raw "
                    f"results.\n\n```\n{error}```\n")
        kernels_page = None
    written.append(_write(out / "report.json", json.dumps(payload, indent=1, default=str)))
    written.append(_write(out / "report.md", markdown))
    if kernels_page is not None:
        written.append(_write(out / "kernels.md", kernels_page))
    return written


def _render(parts: list[dict], results: dict, tests: dict, dry_run: bool, date: str,
            command: str, budget: float, seconds: float,
            ) -> tuple[str, str | None, list[dict]]:
    from benchmarks.kernels.page import render_markdown
    from benchmarks.kernels.results import (
        DECODE_HEADERS,
        DECODE_NUMERIC,
        TARGET_HEADERS,
        DecodeResult,
        KernelResult,
        decode_rows,
        format_kernel_table,
        target_rows,
    )
    from nmsparse.tables import format_table

    from .parts import KERNEL_SETTINGS, settings_argv

    def title(text: str, part: str) -> str:
        fixture = results.get(part, {}).get("fixture", False)
        return f"## {text}" + (" (FIXTURE)" if fixture else "")

    kernels = [KernelResult(**{**row, "shape": tuple(row["shape"])})
               for row in results.get("kernels", {}).get("data", {}).get("results", [])]
    decode = [DecodeResult(**{k: v for k, v in row.items() if k != "tokens_per_s"})
              for row in results.get("decode", {}).get("data", {}).get("results", [])]
    overhead = overhead_rows(results)
    targets = [row for row in target_rows(kernels, decode)] + overhead_targets(overhead)

    lines = ["# nmsparse GPU check", ""]
    if dry_run:
        lines += [DRY_BANNER, ""]
    lines += [f"- command: `{command}` (`make gpu-check`)", f"- date: {date}",
              f"- wall time: {seconds:.0f} s of a {budget:.0f} s budget; each part under its "
              "own cap (docs/gpu.md)", ""]
    machine = results.get("machine", {}).get("data", {})
    if machine:
        keys = ["GPU", "torch", "triton", "cuSPARSELt", "python", "nmsparse", "nmsparse_path"]
        lines += [title("Machine", "machine"), "",
                  format_table(["", ""], [[k, machine[k]] for k in keys if k in machine],
                               markdown=True), ""]
    lines += ["## Parts", "", format_table(
        ["part", "status", "seconds", "cap s", "result", "what"],
        [[p["part"], p["status"], f"{p['seconds']:.1f}", f"{p['cap_s']:.0f}",
          p["summary"] or p["reason"] or p["note"], p["title"]] for p in parts],
        right_aligned=[2, 3], markdown=True), ""]
    lines += [title("Targets", "kernels"), "",
              "Judged against the targets of docs/gpu.md; `not measured` where a part did "
              "not run or a kernel failed.", "",
              format_table(TARGET_HEADERS, targets, markdown=True), ""]

    lines += ["## CUDA and timm tests (pytest -m 'cuda or timm')", ""]
    if not tests:
        lines += ["Not run.", ""]
    elif not tests.get("run"):
        lines += [f"Dry run: {tests.get('collected')} CUDA tests collected, none run." if
                  dry_run else tests.get("error", "Not run."), ""]
    else:
        lines += [f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} "
                  f"errors, {tests['skipped']} skipped of {tests['tests']}.", ""]
        if tests["failed"]:
            lines += [format_table(["test", "message"],
                                   [[f["test"], f["message"]] for f in tests["failed"]],
                                   markdown=True), ""]

    correctness = results.get("correctness", {}).get("data", {}).get("rows", [])
    if correctness:
        lines += [title("Correctness on the GPU", "correctness"), "",
                  "max |y - ref| / max |ref| against F.linear (or the dense model) in fp32.", "",
                  format_table(["check", "dtype", "where", "rel err", "tolerance", "ok", "note"],
                               [[r["check"], r["dtype"], r["where"], _fmt(r["rel_err"], ".1e"),
                                 f"{r['tolerance']:.0e}", "yes" if r["ok"] else "NO",
                                 r["note"]] for r in correctness], right_aligned=[3, 4],
                               markdown=True), ""]

    kernels_page = None
    if kernels:
        settings = results["kernels"]["data"]["settings"]
        lines += [title("Kernel benchmark", "kernels"), "",
                  f"Shapes {', '.join('x'.join(map(str, s)) for s in settings['shapes'])}; "
                  f"batches {', '.join(map(str, settings['batches']))}; "
                  f"{settings['warmup']} warm-up and {settings['repeats']} timed runs "
                  f"(reduced from 10 / 50), timing {settings['timing']}. Full tables: "
                  "kernels.md beside this file (copy it to docs/kernels.md).", "",
                  "```", format_kernel_table(kernels), "```", ""]
        page_machine = {k: str(machine[k]) for k in
                        ("GPU", "torch", "triton", "cuSPARSELt", "python", "date")
                        if k in machine}
        kernel_command = "python -m benchmarks.kernels " + " ".join(
            settings_argv(KERNEL_SETTINGS)) + " --out docs/kernels.md"
        kernels_page = render_markdown(
            f"{kernel_command}  # run by make gpu-check", page_machine, kernels, decode,
            f"timing {settings['timing']}, {settings['warmup']} warm-up and "
            f"{settings['repeats']} timed runs, bf16", fixture=dry_run)
    if decode:
        lines += [title("GPT decode, batch 1", "decode"), "",
                  format_table(DECODE_HEADERS, decode_rows(decode),
                               right_aligned=DECODE_NUMERIC, markdown=True), ""]
    if overhead:
        lines += [title("SR-STE training-step overhead (2:4, SGD momentum)", "overhead-eager"),
                  "", "Median step time after warm-up (which includes compiling); dense and "
                  "sparse steps alternate. refresh_ / add_decay_: all layers' mask refresh and "
                  "SR-STE term, timed alone.", "",
                  format_table(["model", "size", "mask refresh", "dense ms", "sparse ms",
                                "ratio", "target", "refresh_ ms", "add_decay_ ms", "note"],
                               [[r["model"], r["size"], r["refresh"],
                                 _fmt(r.get("dense_ms"), ".2f"), _fmt(r.get("sparse_ms"), ".2f"),
                                 _fmt(r.get("ratio"), ".3f", "x"),
                                 f"<= {r.get('target') or OVERHEAD_TARGET}x",
                                 _fmt(r.get("refresh_ms"), ".2f"),
                                 _fmt(r.get("decay_ms"), ".2f"), r.get("note", "")]
                                for r in overhead], right_aligned=[3, 4, 5, 7, 8],
                               markdown=True), ""]
    lines += ["No accelerated 2:4 training step exists in nmsparse yet (the 2:4 tensor-core "
              "path is inference only), so none is timed.", ""]
    target_dicts = [dict(zip(TARGET_HEADERS, row, strict=True)) for row in targets]
    return "\n".join(lines), kernels_page, target_dicts
