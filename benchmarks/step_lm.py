"""STEP vs SR-STE under AdamW on the byte-level language model (the methods issue's Adam case).

Usage: ``python -m benchmarks.step_lm [--out docs/methods_lm.md] [--jobs 2]``

Trains gpt_tiny (2 layers, d_model 64, 2 heads) on the standard library's sources (the
``text`` dataset) at 1:8 and 2:4 with AdamW (lr 3e-3, 0.1 warm-up epochs then cosine, weight
decay 0.01, batch 16 x 64 bytes, 400 steps), 3 seeds each, with ``srste``, with ``step``
(AutoSwitch, defaults) and with ``step`` switching at a fixed step 100 (a quarter of the run),
one ``nmsparse train`` process per run with one thread. The step at which STEP switched (or
that it never did) is read from each run's checkpoint. Run folders go
to ``benchmarks/step_lm_runs/`` (git-ignored); a finished folder is reused. The report gives
test bits per byte (lower is better) as mean +- std and a Welch t-test of STEP against SR-STE
(``benchmarks.study.stats``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.study import stats

ROOT = Path(__file__).resolve().parent / "step_lm_runs"
PATTERNS = ("2:4", "1:8")
# row label -> (method, extra CLI arguments)
METHODS = {"srste": ("srste", []), "step": ("step", []),
           "step-100": ("step", ["--method-option", "switch_step=100"])}
SEEDS = (0, 1, 2)
COMMON = ["--model", "gpt_tiny", "--model-option", "n_layer=2", "--model-option", "n_head=2",
          "--model-option", "d_model=64", "--data", "text", "--seq-len", "64",
          "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "0.01",
          "--warmup-epochs", "0.1", "--epochs", "1", "--batch-size", "16",
          "--limit-train-batches", "400", "--limit-test-batches", "20", "--no-plots",
          "--threads", "1", "--device", "cpu"]


def folder(label: str, pattern: str, seed: int) -> Path:
    return ROOT / f"{pattern.replace(':', 'of')}-{label}-s{seed}"


def switched_at(out: Path) -> int | None:
    """The step STEP switched at, from the run's last checkpoint (None: it never did)."""
    import torch

    checkpoint = torch.load(out / "latest.pt", weights_only=True, map_location="cpu")
    states = checkpoint["sparsity"]["methods"].values()
    return next((state["switched_at"] for state in states if "switched_at" in state), None)


def run(label: str, pattern: str, seed: int) -> dict:
    out = folder(label, pattern, seed)
    summary = out / "summary.json"
    method, extra = METHODS[label]
    if not summary.exists():
        command = [sys.executable, "-m", "nmsparse", "train", *COMMON, "--pattern", pattern,
                   "--method", method, *extra, "--seed", str(seed), "--out", str(out)]
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{out.name} failed:\n{done.stderr[-2000:]}")
        print(f"[step_lm] {out.name}: {time.time() - started:.0f} s", flush=True)
    result = json.loads(summary.read_text())
    result["switched_at"] = switched_at(out) if method == "step" else None
    return result


def report(results: dict) -> str:
    lines = ["# STEP vs SR-STE under AdamW: the byte-level language model", "",
             "Written by `benchmarks/step_lm.py` (its docstring gives every setting): gpt_tiny "
             "(2 layers, d_model 64) on the standard library's sources, AdamW, 400 steps, "
             "3 seeds; test bits per byte, lower is better. Welch t-test against SR-STE; "
             "negative is better. A STEP run that never switched trained dense and is "
             "evaluated with its final magnitude mask (no sparse training at all). Measured "
             "on the shared 2-core CPU.", "",
             "| pattern | method | bits/byte (mean ± std) | switched at step | "
             "- SR-STE [95 % CI] | p | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for pattern in PATTERNS:
        base = [results[("srste", pattern, s)]["test_bpb"] for s in SEEDS]
        for label in METHODS:
            rs = [results[(label, pattern, s)] for s in SEEDS]
            a = [r["test_bpb"] for r in rs]
            spread = f"{stats.mean(a):.3f} ± {stats.sample_var(a) ** 0.5:.3f}"
            if label == "srste":
                lines.append(f"| {pattern} | {label} | {spread} | - | - | - | - |")
                continue
            switches = ", ".join("never" if r["switched_at"] is None else str(r["switched_at"])
                                 for r in rs)
            c = stats.welch(a, base)
            verdict = ("not decided (p >= 0.05)" if c.p >= 0.05
                       else "better than SR-STE" if c.effect < 0 else "worse than SR-STE")
            lines.append(f"| {pattern} | {label} | {spread} | {switches} | "
                         f"{c.effect:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | {c.p:.2g} | "
                         f"{verdict} |")
    wall = sum(r["wall_seconds"] for r in results.values())
    lines += ["", f"{len(results)} runs, summed wall time {wall / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/methods_lm.md")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    cases = [(label, p, s) for p in PATTERNS for s in SEEDS for label in METHODS]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(cases, pool.map(lambda c: run(*c), cases), strict=True))
    text = report(results)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
