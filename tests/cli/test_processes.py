"""Runs as separate processes: resume after SIGKILL reaches the same weights as a run that was
never stopped, and torchrun with 2 processes trains data-parallel with one writer."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

ARGS = ["--epochs", "6", "--batch-size", "32", "--model-option", "hidden=[32]",
        "--no-plots", "--seed", "3"]


def nmsparse(*args):
    return [sys.executable, "-m", "nmsparse", *args]


def final_state(run):
    return torch.load(run / "latest.pt", weights_only=True)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(nmsparse("train", "--out", str(straight), *ARGS), check=True,
                   capture_output=True)
    process = subprocess.Popen(nmsparse("train", "--out", str(killed), *ARGS),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "latest.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    interrupted_at = final_state(killed)["epoch"]
    assert interrupted_at < 6
    subprocess.run(nmsparse("train", "--resume", str(killed)), check=True,
                   capture_output=True)
    a, b = final_state(straight), final_state(killed)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (6, b["step"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # the log reads as one run: nothing repeated
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3, 4, 5, 6]


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "nmsparse", "train", "--out", str(out), "--epochs", "2", "--batch-size", "16",
         "--model-option", "hidden=[32]", "--no-plots"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_acc"] > 0.5
    # one writer: every epoch logged once, and each step covers 2 x 16 samples
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"epoch"' in line and '"kind": "epoch"' in line]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert summary["steps"] == 2 * (1437 // 32)
    assert result.stdout.count("final test accuracy") == 1
