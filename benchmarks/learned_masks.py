"""Learned N:M masks (MaskLLM, ProxSparse) against one-shot pruning on the byte-level GPT.

Usage (from the repository root)::

    python -m benchmarks.learned_masks                     # trains a dense GPT first
    python -m benchmarks.learned_masks --dense RUN         # or starts from a dense run
    python -m benchmarks.learned_masks --quick             # a smoke run

Every row of a pattern and seed sees the same number of training sequences (``--steps`` x 16
sequences of the run's length, drawn with the seed): the one-shot rows (Wanda, SparseGPT) as
calibration data; the rows that start from a SparseGPT mask spend 128 sequences (8 steps'
worth) on SparseGPT's calibration and the rest on training; the learned rows train for all
``--steps`` steps. Magnitude uses no data. "sparsegpt mask, original weights" is SparseGPT's
mask (same data) on the dense weights, without its reconstruction of the kept weights: the
mask alone, as MaskLLM (frozen weights) and ProxSparse (original weights restored) deploy.
Training rows use AdamW (lr ``--lr``, no weight decay, batch 16);
with MaskLLM the weights stay frozen and the method's own Adam trains the logits (its
defaults, the schedules spread over the row's steps); ProxSparse uses its defaults (lambda1
0.1, original weights restored on the final mask). Bits per byte on the first
``--eval-batches`` x 16 sequences of the held-out split, after ``finalize``.

Then the step-time overhead: median wall time of one optimizer step (forward, backward,
step) over ``--timing-steps`` steps for the dense model, a fixed 2:4 mask, MaskLLM and
ProxSparse, on whatever machine runs it (the committed table: a shared, loaded 2-core CPU).
Writes a Markdown section between markers in ``--out`` (default docs/learned_masks.md) and
the raw numbers next to it as JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import nmsparse
from benchmarks.oneshot import bits_per_byte, fresh_dense
from nmsparse.app.train import checkpoint
from nmsparse.app.train.config import from_dict
from nmsparse.app.train.trainer import build, loss_and_correct
from nmsparse.machine import cpu_model
from nmsparse.methods import MaskLLM, ProxSparse

ROOT = Path(__file__).resolve().parents[1]
BATCH, PRIOR_SEQUENCES = 16, 128
DENSE_FLAGS = ["--data", "text", "--model", "gpt_tiny", "--model-option", "n_layer=2",
               "--model-option", "d_model=64", "--model-option", "n_head=4", "--seq-len", "64",
               "--pattern", "dense", "--optimizer", "adamw", "--lr", "3e-3",
               "--weight-decay", "0.01", "--batch-size", "16", "--epochs", "1",
               "--limit-train-batches", "400", "--limit-test-batches", "8",
               "--warmup-epochs", "0.1", "--grad-clip", "1.0", "--no-plots"]
ROWS = ["magnitude", "wanda", "sparsegpt", "sparsegpt mask, original weights",
        "sparsegpt + fixed", "sparsegpt + srste",
        "maskllm (sparsegpt prior)", "maskllm (no prior)", "proxsparse"]
BEGIN, END = "<!-- learned_masks:begin -->", "<!-- learned_masks:end -->"


def batches_of(data, steps: int, seed: int) -> list:
    """``steps`` training batches of 16 sequences, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(steps):
        indices = torch.randint(len(data.train), (BATCH,), generator=generator)
        out.append(data.train.get_batch(indices, generator=generator))
    return out


def train(model, batches, lr: float, timings: list | None = None) -> None:
    """One AdamW step per batch; the sparsity handle acts inside ``step()``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for x, y in batches:
        started = time.perf_counter()
        loss, _ = loss_and_correct(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if timings is not None:
            timings.append(time.perf_counter() - started)


def run_row(row: str, pattern: str, config, state, data, steps: int, seed: int, lr: float,
            eval_batches) -> float:
    model = fresh_dense(config, state)
    budget = batches_of(data, steps, seed)
    inputs = [x for x, _ in budget]
    prior_steps = PRIOR_SEQUENCES // BATCH
    if row in ("magnitude", "wanda", "sparsegpt"):
        nmsparse.prune(model, pattern, row, calibration=None if row == "magnitude" else inputs)
    elif row == "sparsegpt mask, original weights":  # the mask alone, no reconstruction
        masks = nmsparse.prune(copy.deepcopy(model), pattern, "sparsegpt", calibration=inputs,
                               then=None).masks
        nmsparse.sparsify(model, pattern, "fixed", masks=masks, include=list(masks),
                          tied="sparse")
    elif row.startswith("sparsegpt + "):
        then = row.split(" + ")[1]
        nmsparse.prune(model, pattern, "sparsegpt", calibration=inputs[:prior_steps], then=then)
        train(model, budget[prior_steps:], lr)
    else:
        names = list(nmsparse.prune(copy.deepcopy(model), pattern, "magnitude",
                                    then=None).masks)  # the same layers as the other rows
        if row == "maskllm (sparsegpt prior)":
            masks = nmsparse.prune(copy.deepcopy(model), pattern, "sparsegpt",
                                   calibration=inputs[:prior_steps], then=None).masks
            nmsparse.sparsify(model, pattern, MaskLLM(steps=steps - prior_steps, seed=seed),
                              masks=masks, include=names, tied="sparse")
            train(model, budget[prior_steps:], lr)
        else:
            method = MaskLLM(steps=steps, seed=seed) if row.startswith("maskllm") \
                else ProxSparse()
            nmsparse.sparsify(model, pattern, method, include=names, tied="sparse")
            train(model, budget, lr)
    nmsparse.finalize(model)
    return bits_per_byte(model, eval_batches)


def step_times(config, state, data, steps: int, lr: float) -> dict[str, float]:
    """Median seconds per optimizer step (after two warm-up steps) at 2:4."""
    found = {}
    for name in ("dense", "fixed", "maskllm", "proxsparse"):
        model = fresh_dense(config, state)
        if name != "dense":
            method = {"fixed": "fixed", "maskllm": MaskLLM(), "proxsparse": ProxSparse()}[name]
            nmsparse.sparsify(model, "2:4", method, tied="sparse")
        timings: list[float] = []
        train(model, batches_of(data, steps + 2, seed=0), lr, timings)
        found[name] = statistics.median(timings[2:])
    return found


def summarise(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def verdict(report, pattern: str) -> str:
    """Whether learning the mask beat SparseGPT at equal data, in plain words."""
    cell = report["cells"][pattern]
    best_learned = min(("maskllm (sparsegpt prior)", "maskllm (no prior)", "proxsparse"),
                       key=lambda r: statistics.fmean(cell[r]))
    learned, oneshot = statistics.fmean(cell[best_learned]), statistics.fmean(cell["sparsegpt"])
    fixed = statistics.fmean(cell["sparsegpt + fixed"])
    alone = statistics.fmean(cell["sparsegpt mask, original weights"])
    if learned < oneshot:
        word, every = "beats", max(cell[best_learned]) < min(cell["sparsegpt"])
    else:
        word, every = "is worse than", min(cell[best_learned]) > max(cell["sparsegpt"])
    return (f"- {pattern}: the best learned mask ({best_learned}, {learned:.3f}) {word} "
            f"SparseGPT with the same data ({oneshot:.3f}) by {abs(oneshot - learned):.3f} bits "
            f"per byte ({'on every seed' if every else 'not on every seed'}); SparseGPT's mask "
            f"alone on the original weights gives {alone:.3f}, SparseGPT + fixed-mask recovery "
            f"{fixed:.3f}.")


def render(report) -> str:
    patterns = list(report["cells"])
    lines = ["| row | " + " | ".join(patterns) + " |", "|---|" + "---:|" * len(patterns)]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(summarise(report["cells"][p][row])
                                               for p in patterns) + " |")
    times = report["step_seconds"]
    timing = ["| step | median s / step | vs fixed mask |", "|---|---:|---:|"]
    for name, seconds in times.items():
        timing.append(f"| {name} | {seconds:.4f} | {seconds / times['fixed']:.2f}x |")
    config = report["config"]
    options = ", ".join(f"{k}={v}" for k, v in config["model_options"].items())
    return "\n".join([
        "<!-- generated by benchmarks/learned_masks.py from measured numbers "
        "(learned_masks.json) -->", "",
        f"- Model: `{config['model']}` ({options}), byte level, sequence length "
        f"{config['seq_len']}, trained dense for {report['dense_steps']} steps: "
        f"**{report['dense_bpb']:.3f}** bits per byte.",
        f"- Budget per row: {report['steps']} x {BATCH} sequences "
        f"({report['steps'] * BATCH * config['seq_len']} bytes) per seed; seeds "
        f"{report['seeds']}; training lr {report['lr']}.",
        f"- Evaluation: bits per byte on {report['eval_bytes']} held-out bytes, after "
        "finalize; mean ± sample std over the seeds.",
        f"- Machine: {report['machine']}; load average {report['load']} while it ran (shared,"
        f" loaded: timings are indicative only). Command: `{report['command']}`; "
        f"{report['seconds']:.0f} s in all.", "",
        "Bits per byte (lower is better):", "", *lines, "",
        *[verdict(report, p) for p in patterns], "",
        f"Step time at 2:4 (median of {report['timing_steps']} steps, AdamW, batch {BATCH}, "
        "loaded machine):", "", *timing, ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", help="a dense run folder; trained there first if empty")
    parser.add_argument("--steps", type=int, default=48, help="training steps per row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one seed, tiny budgets")
    parser.add_argument("--render", metavar="JSON", help="only rewrite --out from the raw "
                        "numbers a previous run saved")
    parser.add_argument("--out", default=str(ROOT / "docs" / "learned_masks.md"))
    args = parser.parse_args(argv)
    if args.render:
        write(Path(args.out), json.loads(Path(args.render).read_text()))
        return 0
    started = time.perf_counter()
    if args.quick:
        args.steps, args.seeds, args.eval_batches, args.timing_steps = 10, [0], 2, 3
    if args.steps <= PRIOR_SEQUENCES // BATCH:
        parser.error(f"--steps must be > {PRIOR_SEQUENCES // BATCH} (the prior's calibration)")

    dense_dir = args.dense or str(ROOT / "runs" / "learned-masks-dense")
    if not (Path(dense_dir) / "summary.json").is_file():  # trained once, then reused
        subprocess.run([sys.executable, "-m", "nmsparse", "train", *DENSE_FLAGS, "--out",
                        dense_dir], check=True)
    saved = checkpoint.load(dense_dir)
    config = from_dict(saved["config"])
    data, _ = build(config)
    state = saved["model"]
    test = data.test
    eval_batches = [test.get_batch(torch.arange(i * BATCH, (i + 1) * BATCH))
                    for i in range(args.eval_batches)]
    summary = json.loads((Path(dense_dir) / "summary.json").read_text())

    cells: dict = {}
    for pattern in args.patterns:
        cells[pattern] = {row: [] for row in ROWS}
        for seed in args.seeds:
            for row in ROWS:
                torch.manual_seed(seed)
                value = run_row(row, pattern, config, state, data, args.steps, seed, args.lr,
                                eval_batches)
                cells[pattern][row].append(value)
                print(json.dumps({"pattern": pattern, "seed": seed, "row": row,
                                  "bpb": value}), flush=True)
    report = {
        "cells": cells, "dense_bpb": bits_per_byte(fresh_dense(config, state), eval_batches),
        "dense_steps": summary.get("steps"), "steps": args.steps, "seeds": args.seeds,
        "lr": args.lr, "eval_bytes": sum(y.numel() for _, y in eval_batches),
        "step_seconds": step_times(config, state, data, args.timing_steps, args.lr),
        "timing_steps": args.timing_steps, "config": saved["config"],
        "load": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "machine": f"{cpu_model()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, {platform.python_version()}",
        "command": " ".join(["python -m benchmarks.learned_masks", *(argv or sys.argv[1:])]),
    }
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write(out, report)
    return 0


def write(out: Path, report) -> None:
    """The rendered table between the markers of ``out`` (text around them is kept)."""
    document = out.read_text() if out.is_file() else ""
    if BEGIN not in document:
        document = f"# Learned N:M masks: measured\n\n{BEGIN}\n{END}\n"
    head, rest = document.split(BEGIN, 1)
    out.write_text(head + BEGIN + "\n" + render(report) + END + rest.split(END, 1)[1])
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
