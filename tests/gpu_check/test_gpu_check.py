"""The GPU check (``make gpu-check``, benchmarks/gpu_check) on the CPU: the dry run end to end
(every part in its own capped process, fixture numbers, the report files), the time caps,
the budget, the GPU gate on a machine without CUDA, argument errors and the report's
fallbacks. No GPU is used; no number here is a measurement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import __main__ as gpu_check
from benchmarks.gpu_check import plan, report, runner

ROOT = Path(__file__).resolve().parents[2]
FILE_LIMIT = 16 * 2**20


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_writes_the_report_files(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["kernels.md", "log.txt", "report.json", "report.md"]
    assert len(files) <= 8 and all((out / f).stat().st_size <= FILE_LIMIT for f in files)


def test_dry_run_ran_every_part_under_its_cap(dry_run):
    _, out = dry_run
    data = json.loads((out / "report.json").read_text())
    parts = {p["part"]: p for p in data["parts"]}
    assert list(parts) == plan.PART_NAMES
    for part in plan.PARTS:
        row = parts[part.name]
        assert row["status"] == "ok", row
        assert 0 < row["seconds"] < part.cap_s
    assert data["seconds"] <= plan.BUDGET_S
    assert "--fixture" in parts["kernels"]["command"]
    assert parts["install"]["command"][-2:] == ["pip", "--version"]  # nothing installed
    log = (out / "log.txt").read_text()
    assert all(f"===== {name}: ok" in log for name in plan.PART_NAMES)


def test_dry_run_numbers_are_marked_as_fixtures(dry_run):
    _, out = dry_run
    data = json.loads((out / "report.json").read_text())
    assert data["fixture"] is True
    assert all(result["fixture"] is True and result["partial"] is False
               for result in data["results"].values())
    text = (out / "report.md").read_text()
    assert text.splitlines()[2].startswith("> **DRY RUN: every number in this report is a "
                                           "FIXTURE")
    for section in ("Machine", "Targets", "Correctness on the GPU", "Kernel benchmark",
                    "GPT decode, batch 1", "SR-STE training-step overhead"):
        heading = next(line for line in text.splitlines() if line.startswith(f"## {section}"))
        assert heading.endswith("(FIXTURE)"), heading
    page = (out / "kernels.md").read_text()
    assert "FIXTURE page from a dry run" in page and "These figures are measured" not in page


def test_dry_run_report_content(dry_run):
    _, out = dry_run
    data = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    # the CUDA tests were selected by the marker (collected, not run)
    assert data["tests"]["run"] is False and data["tests"]["collected"] >= 100
    assert f"Dry run: {data['tests']['collected']} CUDA tests collected, none run." in text
    # targets of docs/gpu.md, judged on the fixture numbers (worked out by hand from
    # benchmarks/gpu_check/fixtures.py: 10/6 us, 800/640 us, 0.5/0.4 s, 10.8/10 ms ...)
    targets = {(t["target"], t["where"]): t for t in data["targets"]}
    two_four = targets[("batch-1 decode, 2:4 (best 2:4 kernel)", "4096x4096, batch 1")]
    assert (two_four["measured"], two_four["met"]) == ("1.67x", "yes")
    big = targets[("8192x8192 at batch 4096, 2:4 tensor cores", "8192x8192, batch 4096")]
    assert (big["measured"], big["met"]) == ("1.25x", "no")
    decode = targets[("gpt_1b decode end to end, 2:4 (same threshold, for reference)",
                      "batch 1")]
    assert decode["measured"] == "1.25x"
    cnn = targets[("SR-STE 2:4 training step, eager mask refresh",
                   "small CNN, batch 2048, 28x28")]
    assert (cnn["measured"], cnn["threshold"], cnn["met"]) == ("1.080x", "<= 1.05x", "no")
    vit = targets[("SR-STE 2:4 training step, compiled mask refresh",
                   "ViT, batch 512, 32x32")]
    assert (vit["measured"], vit["met"]) == ("1.040x", "yes")
    assert "| accelerate 2:4 (tensor cores) | bfloat16 |" in text and "| NO |" in text


# ------------------------------------------------------------------ time caps and budget

def test_runner_kills_the_whole_process_group_at_the_cap(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    start = time.perf_counter()
    outcome = runner.run_capped([sys.executable, "-c", script], 3, tmp_path / "log", tmp_path)
    assert time.perf_counter() - start < 20
    assert outcome.status == "timed out" and outcome.returncode is None
    assert "killed at its cap of 3 s" in outcome.reason and "started" in outcome.tail
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous; the zombie is reaped by init
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{grandchild}/status").exists() and "zombie" in Path(
                f"/proc/{grandchild}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild process outlived its part's cap")


def test_runner_reports_exit_status_and_output(tmp_path):
    ok = runner.run_capped([sys.executable, "-c", "print('hello')"], 30, tmp_path / "a",
                           tmp_path)
    assert (ok.status, ok.returncode, ok.tail.strip()) == ("ok", 0, "hello")
    bad = runner.run_capped([sys.executable, "-c", "import sys; sys.exit(3)"], 30,
                            tmp_path / "b", tmp_path)
    assert (bad.status, bad.returncode, bad.reason) == ("failed", 3, "exit status 3")
    missing = runner.run_capped([str(tmp_path / "no-such-program")], 30, tmp_path / "c",
                                tmp_path)
    assert missing.status == "failed" and "could not start" in missing.reason


def test_caps_fit_the_budget():
    assert sum(part.cap_s for part in plan.PARTS) <= plan.BUDGET_S == 480
    assert plan.PART_NAMES[:3] == ["install", "machine", "tests"]
    assert all(part.gpu for part in plan.PARTS[2:])


def test_an_exhausted_budget_skips_parts_and_still_reports(tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--budget", "1", "--only", "machine,kernels",
                           "--out", str(out)])
    assert code == gpu_check.EXIT_INCOMPLETE
    data = json.loads((out / "report.json").read_text())
    assert [(p["part"], p["status"]) for p in data["parts"]] == [("machine", "skipped"),
                                                                ("kernels", "skipped")]
    assert "s left of the 1 s budget" in data["parts"][0]["reason"]
    assert "| kernels | skipped |" in (out / "report.md").read_text()


def test_without_cuda_the_gpu_parts_are_skipped(tmp_path):
    """The real (not dry) machine part on this CPU-only machine closes the GPU gate."""
    out = tmp_path / "out"
    code = gpu_check.main(["--only", "machine,correctness", "--out", str(out)])
    assert code == gpu_check.EXIT_INCOMPLETE
    data = json.loads((out / "report.json").read_text())
    machine, correctness = data["parts"]
    assert machine["status"] == "ok" and data["results"]["machine"]["fixture"] is False
    assert machine["summary"] == "no CUDA GPU: torch.cuda.is_available() is False"
    assert correctness["status"] == "skipped"
    assert correctness["reason"] == "no usable GPU: " + machine["summary"]
    assert not (out / "kernels.md").exists()


# ------------------------------------------------------------------ arguments

@pytest.mark.parametrize(("argv", "message"), [
    (["--only", "kernels,gpu"], "unknown part(s) gpu; accepted: install, machine"),
    (["--budget", "481"], "must be a number of seconds in (0, 480]"),
    (["--budget", "soon"], "must be a number of seconds in (0, 480]"),
    ([], "the following arguments are required: --out"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        gpu_check.main([*argv, *(["--out", str(tmp_path / "o")] if argv else [])])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_non_empty_out_folder_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_target():
    def dry(*args):
        proc = subprocess.run(["make", "-n", "-W", ".venv/bin/.installed", "gpu-check", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        return proc.stdout.strip().splitlines()[-1]

    assert dry("OUT=/tmp/o") == 'python3 -m benchmarks.gpu_check --out "/tmp/o"'
    assert dry("DRY=1", "OUT=/tmp/o") == \
        '.venv/bin/python -m benchmarks.gpu_check --out "/tmp/o" --dry-run'


# ------------------------------------------------------------------ results and report

def test_a_partial_result_is_kept_and_marked(tmp_path):
    step = plan.steps(sys.executable, tmp_path, dry_run=False, only=["kernels"])[0]
    step.result.write_text(json.dumps({"part": "kernels", "fixture": False, "partial": True,
                                       "summary": "3 kernel rows", "data": {}}))
    outcome = runner.Outcome("timed out", 100.0, None, 100.0, reason="killed at its cap")
    results: dict = {}
    gpu_check.read_result(step, outcome, results)
    assert results["kernels"]["summary"] == "PARTIAL: 3 kernel rows"
    assert outcome.status == "timed out" and outcome.reason.endswith("partial result kept")


def test_junit_and_log_counts(tmp_path):
    step = plan.steps(sys.executable, tmp_path, dry_run=False, only=["tests"])[0]
    assert "--junitxml" in step.command and "-v" in step.command
    (tmp_path / "tests.log").write_text(
        "tests/a.py::test_x[2:4-bf16] PASSED   [ 1%]\ntests/a.py::test_y FAILED   [ 2%]\n")
    partial = gpu_check.tests_summary(step, runner.Outcome("timed out"), tmp_path, False)
    assert partial["run"] is False and "1 passed, 1 failed, 0 errors, 0 skipped" in \
        partial["error"]
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="test_x"/>'
        '<testcase classname="tests.a" name="test_y"><failure message="boom&#10;more"/>'
        '</testcase><testcase classname="tests.a" name="test_z"><skipped/></testcase>'
        '</testsuite></testsuites>')
    done = gpu_check.tests_summary(step, runner.Outcome("failed"), tmp_path, False)
    assert (done["passed"], done["failures"], done["skipped"]) == (1, 1, 1)
    assert done["failed"] == [{"test": "tests.a::test_y", "message": "boom"}]


def test_report_falls_back_to_raw_json_when_tables_fail(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ImportError("nmsparse.tables is gone")

    monkeypatch.setattr(report, "_render", broken)
    steps = plan.steps(sys.executable, tmp_path, dry_run=True, only=["machine"])
    written = report.write_report(tmp_path, plan=steps, outcomes={}, results={}, tests={},
                                  dry_run=True, date="d", command="c", budget=480, seconds=1)
    assert [p.name for p in written] == ["report.json", "report.md"]
    text = (tmp_path / "report.md").read_text()
    assert "could not be built" in text and "nmsparse.tables is gone" in text
    assert "DRY RUN" in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["parts"][0]["status"] == "skipped" and "report_error" in data
