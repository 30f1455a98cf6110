"""The command line driven through a table of bad inputs and faults: every case ends with
exit status 2, exactly one line on stderr, no traceback, and nothing half-written (no file
created or changed where the command failed before it had anything to write; no temporary
file and no unreadable JSON where a training run failed part-way)."""

import hashlib
import json
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import QUICK

from nmsparse.app.cli.main import main
from nmsparse.app.train import run_dir


def recipe(tmp, text, suffix=".toml"):
    path = tmp / f"recipe{suffix}"
    path.write_text(text)
    return ["train", "--recipe", str(path), "--out", str(tmp / "out")]


def checkpoint_file(tmp, content: bytes):
    path = tmp / "file.pt"
    path.write_bytes(content)
    return ["eval", str(path)]


def object_checkpoint(tmp, run):
    path = tmp / "file.pt"
    torch.save({"format": 1, "config": {}, "weird": pickle.PickleError("x")}, path)
    return ["eval", str(path)]


def truncated(tmp, run):
    data = (run / "latest.pt").read_bytes()
    (run / "latest.pt").write_bytes(data[: len(data) // 2])
    return ["export", str(run), "--out", str(tmp / "out")]


def moved_data(tmp, run):
    from data_fixtures import write_fashion

    write_fashion(tmp / "data")
    out = tmp / "fashion-run"
    assert main(["train", "--data", "fashion-mnist", "--data-dir", str(tmp / "data"),
                 "--model", "mlp", "--out", str(out), *QUICK]) == 0
    shutil.rmtree(tmp / "data")
    return ["eval", str(out)]


def foreign(tmp, run):
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text("mine")
    return ["train", "--out", str(tmp / "out"), *QUICK]


def planted_link(tmp, run):
    (tmp / "victim").write_text("precious")
    (run / "sad.csv").unlink()
    (run / "sad.csv").symlink_to(tmp / "victim")
    return ["train", "--resume", str(run)]


def in_use(tmp, run):
    holder = run_dir.claim(run, "run", resume=True)  # as a resumed training holds it
    in_use.holders.append(holder)
    return ["train", "--resume", str(run)]


in_use.holders = []

FAST = ["--out", "{tmp}/out", *QUICK]

# name: (arguments, or a function (tmp, run) -> arguments; a fragment of the message;
#        whether the failure comes after a run folder was legitimately started)
CASES = {
    # checkpoints
    "zero-byte checkpoint": (lambda t, r: checkpoint_file(t, b""), "empty (0 bytes", False),
    "text file as checkpoint": (lambda t, r: checkpoint_file(t, b"hello\n"),
                                "not a PyTorch checkpoint", False),
    "pickle of arbitrary objects": (object_checkpoint, "never loads", False),
    "truncated checkpoint": (truncated, "truncated or damaged", False),
    "missing checkpoint": (["eval", "{tmp}/nothing.pt"], "does not exist", False),
    "folder without a run": (["summary", "{tmp}"], "holds no run", False),
    # recipes and flags
    "recipe value of the wrong type": (lambda t, r: recipe(t, 'grad_clip = "1"\n'),
                                       "'grad_clip': expected a number or nothing", False),
    "recipe list of the wrong type": (lambda t, r: recipe(t, "exclude = [1, 2]\n"),
                                      "expected a list of strings", False),
    "recipe options not a table": (lambda t, r: recipe(t, 'model_options = "x"\n'),
                                   "expected a table of options", False),
    "unknown recipe key": (lambda t, r: recipe(t, "lrr = 1\n"), "unknown key 'lrr'", False),
    "broken YAML": (lambda t, r: recipe(t, "epochs: [\n", ".yaml"), "does not parse", False),
    "pattern 3:7 (reasons kept)": (["train", *FAST, "--pattern", "3:7"],
                                   "is not divisible by M=7", False),
    "unparsable pattern": (["train", *FAST, "--pattern", "2/4"], "accepted", False),
    "bad int flag": (["train", *FAST, "--epochs", "ten"], "invalid int value", False),
    "unknown flag": (["train", *FAST, "--lrr", "1"], "unrecognized arguments", False),
    "unknown flag of eval": (["eval", "x", "--out", "y"], "unrecognized arguments", False),
    "no command": ([], "required", False),
    "malformed model option": (["train", *FAST, "--model-option", "hidden"],
                               "expected KEY=VALUE", False),
    "unknown model option": (["train", *FAST, "--model-option", "hiddn=3"], "hiddn", False),
    "zero threads": (["train", *FAST, "--threads", "0"], "--threads must be >= 1", False),
    "resume with a recipe flag": (lambda t, r: ["train", "--resume", str(r), "--lr", "1"],
                                  "do not also give --lr", False),
    "data dir for digits": (["train", *FAST, "--data-dir", "{tmp}"], "takes no data_dir",
                            False),
    "--decay for a method without one": (["train", *FAST, "--method", "ste", "--decay", "1e-3"],
                                         "method 'ste' takes no decay", False),
    "--decay and a different decay option": (
        ["train", *FAST, "--decay", "1e-3", "--method-option", "decay=2e-3"],
        "--decay 0.001 and method option decay=0.002 disagree", False),
    "recipe decay option for ste": (
        lambda t, r: recipe(t, 'method = "ste"\nmethod_options = {decay = 1e-3}\n'),
        "method 'ste' takes no decay", False),
    "summary: run and --data": (lambda t, r: ["summary", str(r), "--data", "digits"],
                                "only for --model", False),
    "summary: bad --input-shape": (["summary", "--model", "mlp", "--input-shape", "3,x",
                                    "--num-classes", "2"], "--input-shape", False),
    # data
    "data moved since training": (moved_data, "give --data-dir with its new place", False),
    "unknown data set": (["train", *FAST, "--data", "nope"], "unknown dataset", False),
    # run and export folders
    "foreign --out folder": (foreign, "files nmsparse did not write", False),
    "link planted in a run": (planted_link, "symbolic link 'sad.csv'", False),
    "folder in use": (in_use, "in use by another nmsparse process", False),
    "--out is a file": (lambda t, r: ["export", str(r), "--out", str(r / "config.json")],
                        "is not a folder", False),
    "export --packed of a dense run": (
        lambda t, r: (main(["train", "--out", str(t / "dense"), "--pattern", "dense", *QUICK]),
                      ["export", str(t / "dense"), "--packed", "--out", str(t / "out")])[1],
        "nothing to pack", False),
    "export --packed of 1:512": (
        lambda t, r: (main(["train", "--out", str(t / "wide"), "--pattern", "1:512",
                            "--exclude", "features.1", *QUICK[:-2], "--model-option",
                            "hidden=[512]"]),
                      ["export", str(t / "wide"), "--packed", "--out", str(t / "out")])[1],
        "cannot be exported packed", False),
    # faults while training
    "diverging dense run": (["train", *FAST, "--pattern", "dense", "--lr", "1e30",
                             "--threads", "1"], "training diverged", True),
    "diverging ASP run": (["train", *FAST, "--method", "asp", "--lr", "1e30",
                           "--threads", "1"], "training diverged", True),
    "diverging SR-STE run": (["train", *FAST, "--lr", "1e30", "--threads", "1"],
                             "contains NaN or Inf", True),
}


def snapshot(root):
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() and not p.is_symlink() else "link/dir")
            for p in sorted(root.rglob("*"))}


def assert_nothing_half_written(root):
    for path in root.rglob("*"):
        assert not run_dir.TEMP_FILE.match(path.name), f"temporary file left: {path}"
        if path.suffix in (".json", ".jsonl") and path.is_file() and not path.is_symlink():
            for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [None]:
                json.loads(line if line is not None else path.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_and_faults(case, trained_run, tmp_path, capsys):
    make, fragment, starts_a_run = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    args = (make(work, trained_run) if callable(make)
            else [a.replace("{tmp}", str(work)) for a in make])
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        try:
            status = main(args)
        except SystemExit as exit_:  # argparse usage errors
            status = exit_.code
    finally:
        while in_use.holders:
            in_use.holders.pop().release()
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and fragment in lines[0], err
    assert lines[0].startswith("nmsparse"), err
    assert "weights_only=False" not in err and "fp16" not in err
    if starts_a_run:
        assert_nothing_half_written(tmp_path)
    else:
        assert snapshot(tmp_path) == before  # nothing created, nothing changed


def test_full_disk_while_training(tmp_path):
    """A write that fails (here: a file-size limit, the same EFBIG/ENOSPC path as a full
    disk) ends with one line, exit 2, and leaves no temporary file behind."""
    out = tmp_path / "run"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run(
        [sys.executable, "-m", "nmsparse", "train", "--out", str(out), "--epochs", "1",
         "--no-plots", "--threads", "1"], capture_output=True, text=True,
        preexec_fn=small_files, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "File too large" in lines[0] and "latest.pt" in lines[0], lines
    assert_nothing_half_written(out)
    assert not (out / "latest.pt").exists()
