"""Small-scale reproductions for docs/channels.md, on Fashion-MNIST, through the real CLI.

    OMP_NUM_THREADS=1 python -m benchmarks.channels.run [--root DIR] [--seeds 0 1 2]

Studies (an MLP 784-128-128-10, every run ``--limit-train-batches 150`` of 128 samples per
epoch, i.e. 19,200 of the 60,000 training images, and the full 10,000 test images; one
thread; seeds 0-2):

* ``permute``: a dense run (2 epochs), then ``nmsparse prune --method magnitude`` at 2:4 and
  2:8, with and without ``--permute``;
* ``patterns``: training from scratch with STE at 75 % sparsity: 2:8, unstructured:0.25 and
  gs:4:2:0.25;
* ``reweighted``: ``reweighted`` (2 regularized epochs + 2 fixed-mask retraining epochs)
  against SR-STE for the same 4 epochs, at 2:4 and 1:4.

A run whose folder already holds ``summary.json`` (train) or ``prune.json`` (prune) is
skipped, so an interrupted study resumes. CHEX has its own study: benchmarks/channels/chex.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import torch

from nmsparse.app.cli.main import main

DATA = ["--data", "fashion-mnist", "--data-dir", "/usr/share/datasets/fashion-mnist"]
MODEL = ["--model", "mlp", "--model-option", "hidden=[128,128]"]
SHORT = ["--batch-size", "128", "--limit-train-batches", "150", "--no-plots", "--lr", "0.05"]
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "results" / "channels"


def run(args: list[str], done: Path) -> float:
    """Run one CLI command unless ``done`` exists; returns the seconds it took."""
    if done.exists():
        return 0.0
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    if code != 0:
        raise SystemExit(f"failed ({code}): nmsparse {' '.join(args)}")
    return time.perf_counter() - started


def train(root: Path, name: str, seed: int, extra: list[str], epochs: int) -> float:
    out = root / name / f"seed{seed}"
    return run(["train", *DATA, *MODEL, *SHORT, "--epochs", str(epochs), "--seed", str(seed),
                *extra, "--out", str(out)], out / "summary.json")


def main_study(root: Path, seeds: list[int]) -> None:
    torch.set_num_threads(1)
    spent = 0.0
    for seed in seeds:
        spent += train(root, "dense", seed, ["--pattern", "dense"], 2)
        for pattern in ("2:4", "2:8"):
            for permute in (False, True):
                name = f"prune-{pattern.replace(':', 'of')}{'-permute' if permute else ''}"
                out = root / name / f"seed{seed}"
                spent += run(["prune", str(root / "dense" / f"seed{seed}"), "--method",
                              "magnitude", "--pattern", pattern, "--out", str(out),
                              *(["--permute"] if permute else [])], out / "prune.json")
        for pattern in ("2:8", "unstructured:0.25", "gs:4:2:0.25"):
            label = pattern.replace(":", "_")
            spent += train(root, f"pattern-{label}", seed,
                           ["--pattern", pattern, "--method", "ste"], 2)
        for pattern in ("2:4", "1:4"):
            label = pattern.replace(":", "of")
            spent += train(root, f"srste-{label}", seed,
                           ["--pattern", pattern, "--method", "srste"], 4)
            spent += train(root, f"reweighted-{label}", seed,
                           ["--pattern", pattern, "--method", "reweighted", "--method-option",
                            "groups=nm", "--method-option", "penalty=0.0002",
                            "--method-option", "update_every=50"], 2)
        print(f"seed {seed} done, {spent:.0f} s of runs so far", flush=True)
    for checkpoint in root.glob("*/seed*/*.pt"):  # the report reads the JSON files only
        checkpoint.unlink()
    (root / "budget.txt").write_text(f"{spent:.0f} s wall for the runs made in the last "
                                     "invocation (one thread, shared machine)\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    options = parser.parse_args()
    main_study(options.root, options.seeds)
