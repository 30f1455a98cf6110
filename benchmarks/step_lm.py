"""STEP vs SR-STE under AdamW on the byte-level language model (the methods issue's Adam case).

Usage: ``python -m benchmarks.step_lm [--out docs/methods_lm.md] [--jobs 2]``

Trains gpt_tiny (2 layers, d_model 64, 2 heads) on the standard library's sources (the
``text`` dataset) at 1:8 and 2:4 with AdamW (lr 3e-3, 0.1 warm-up epochs then cosine, weight
decay 0.01, batch 16 x 64 bytes, 400 steps), 3 seeds each, with ``srste`` and with ``step``
(AutoSwitch, defaults), one ``nmsparse train`` process per run with one thread. Run folders go
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
METHODS = ("srste", "step")
SEEDS = (0, 1, 2)
COMMON = ["--model", "gpt_tiny", "--model-option", "n_layer=2", "--model-option", "n_head=2",
          "--model-option", "d_model=64", "--data", "text", "--seq-len", "64",
          "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "0.01",
          "--warmup-epochs", "0.1", "--epochs", "1", "--batch-size", "16",
          "--limit-train-batches", "400", "--limit-test-batches", "20", "--no-plots",
          "--threads", "1", "--device", "cpu"]


def folder(method: str, pattern: str, seed: int) -> Path:
    return ROOT / f"{pattern.replace(':', 'of')}-{method}-s{seed}"


def run(method: str, pattern: str, seed: int) -> dict:
    out = folder(method, pattern, seed)
    summary = out / "summary.json"
    if not summary.exists():
        command = [sys.executable, "-m", "nmsparse", "train", *COMMON, "--pattern", pattern,
                   "--method", method, "--seed", str(seed), "--out", str(out)]
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{out.name} failed:\n{done.stderr[-2000:]}")
        print(f"[step_lm] {out.name}: {time.time() - started:.0f} s", flush=True)
    return json.loads(summary.read_text())


def report(results: dict) -> str:
    lines = ["# STEP vs SR-STE under AdamW: the byte-level language model", "",
             "Written by `benchmarks/step_lm.py` (its docstring gives every setting): gpt_tiny "
             "(2 layers, d_model 64) on the standard library's sources, AdamW, 400 steps, "
             "3 seeds; test bits per byte, lower is better. Welch t-test of STEP - SR-STE; "
             "negative is STEP better. Measured on the shared 2-core CPU.", "",
             "| pattern | SR-STE bits/byte | STEP bits/byte | STEP - SR-STE [95 % CI] | p | "
             "verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for pattern in PATTERNS:
        a = [results[("step", pattern, s)]["test_bpb"] for s in SEEDS]
        b = [results[("srste", pattern, s)]["test_bpb"] for s in SEEDS]
        c = stats.welch(a, b)
        verdict = ("not decided (p >= 0.05)" if c.p >= 0.05
                   else "STEP better" if c.effect < 0 else "STEP worse")
        lines.append(f"| {pattern} | {stats.mean(b):.3f} ± {stats.sample_var(b) ** 0.5:.3f} | "
                     f"{stats.mean(a):.3f} ± {stats.sample_var(a) ** 0.5:.3f} | "
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
    cases = [(m, p, s) for p in PATTERNS for s in SEEDS for m in METHODS]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(cases, pool.map(lambda c: run(*c), cases), strict=True))
    text = report(results)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
