"""One-shot pruning of a trained byte-level GPT: magnitude vs Wanda vs SparseGPT, then recovery.

Takes a dense run (``--dense RUN``; without it, trains one with :data:`DENSE_FLAGS` through
``nmsparse train``), prunes a fresh copy of it to every pattern with every method, and
measures bits per byte on the first ``--eval-batches`` batches of the held-out split. Then,
for the ``--recovery-patterns``, each pruned model is fine-tuned for ``--recovery-steps``
steps with the mask fixed (the ASP recipe) and, separately, with SR-STE starting from the
one-shot mask, and measured again. Writes a Markdown table (``--out``, default
docs/oneshot.md) and the raw numbers next to it as JSON.

    python benchmarks/oneshot.py --dense runs/text-dense            # the committed table
    python benchmarks/oneshot.py --dense RUN --quick                 # a smoke run

Wall times are measured on whatever machine runs it (the committed table: 2 shared CPU
cores), so they are only comparable within one table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import nmsparse
from nmsparse.app.cli.prune import calibration_batches
from nmsparse.app.train import checkpoint
from nmsparse.app.train.config import from_dict
from nmsparse.app.train.trainer import build, loss_and_correct
from nmsparse.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = ["2:4", "4:8", "1:4", "unstructured:0.5"]
METHODS = ["magnitude", "wanda", "sparsegpt"]
DENSE_FLAGS = ["--data", "text", "--model", "gpt_tiny", "--model-option", "n_layer=3",
               "--model-option", "d_model=64", "--model-option", "n_head=4", "--seq-len", "64",
               "--pattern", "dense", "--optimizer", "adamw", "--lr", "3e-3",
               "--weight-decay", "0.01", "--batch-size", "16", "--epochs", "2",
               "--limit-train-batches", "500", "--limit-test-batches", "32",
               "--warmup-epochs", "0.1", "--grad-clip", "1.0", "--no-plots"]


def bits_per_byte(model, batches) -> float:
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for x, y in batches:
            loss, _ = loss_and_correct(model(x), y)
            total += float(loss) * y.numel()
            count += y.numel()
    return total / count / math.log(2)


def fresh_dense(config, state):
    _, model = build(config)
    model.load_state_dict(state)
    return model


def recover(model, data, steps: int, lr: float, seed: int) -> None:
    """``steps`` AdamW steps on training batches; the sparsity handle acts inside step()."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        indices = torch.randint(len(data.train), (16,), generator=generator)
        x, y = data.train.get_batch(indices, generator=generator)
        loss, _ = loss_and_correct(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", help="a trained dense run folder (default: train one)")
    parser.add_argument("--calibration", type=int, default=128, help="calibration samples")
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--recovery-steps", type=int, default=60)
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--recovery-patterns", nargs="*", default=["2:4"])
    parser.add_argument("--quick", action="store_true", help="2 patterns, tiny budgets")
    parser.add_argument("--out", default=str(ROOT / "docs" / "oneshot.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    dense_dir = args.dense
    dense_seconds = None
    if dense_dir is None:
        dense_dir = str(ROOT / "runs" / "oneshot-dense")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nmsparse", "train", *DENSE_FLAGS, "--out",
                        dense_dir], check=True)
        dense_seconds = time.perf_counter() - started
    saved = checkpoint.load(dense_dir)
    config = from_dict(saved["config"])
    data, _ = build(config)
    state = saved["model"]
    summary_path = Path(dense_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    patterns = PATTERNS[:2] if args.quick else PATTERNS
    steps = 5 if args.quick else args.recovery_steps

    test = data.test
    eval_batches = [test.get_batch(torch.arange(i * 16, min((i + 1) * 16, len(test))))
                    for i in range(min(args.eval_batches, math.ceil(len(test) / 16)))]
    calibration = calibration_batches(data.train, args.calibration, 16, seed=0)
    dense_bpb = bits_per_byte(fresh_dense(config, state), eval_batches)
    print(f"dense: {dense_bpb:.4f} bits/byte", flush=True)

    rows = []
    for pattern in patterns:
        for method in METHODS:
            model = fresh_dense(config, state)
            result = nmsparse.prune(model, pattern, method,
                                    calibration=None if method == "magnitude" else calibration)
            row = {"pattern": pattern, "method": method, "seconds": result.seconds,
                   "mode": result.mode, "one_shot": bits_per_byte(model, eval_batches)}
            if pattern in args.recovery_patterns:
                row["fixed"] = _recovered(config, state, pattern, method, calibration, data,
                                          "fixed", steps, args, eval_batches)
                row["srste"] = _recovered(config, state, pattern, method, calibration, data,
                                          "srste", steps, args, eval_batches)
            rows.append(row)
            print(json.dumps(row), flush=True)

    report = {"dense_bpb": dense_bpb, "dense_run": str(dense_dir), "rows": rows,
              "calibration_samples": args.calibration, "seq_len": config.seq_len,
              "eval_bytes": sum(y.numel() for _, y in eval_batches),
              "recovery_steps": steps, "recovery_lr": args.recovery_lr,
              "dense_train_seconds": summary.get("wall_seconds", dense_seconds),
              "dense_steps": summary.get("steps"), "config": saved["config"],
              "machine": f"{cpu_model()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, {platform.python_version()}",
              "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name,
                                                            *(argv or sys.argv[1:])])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.write_text(embed(out.read_text() if out.is_file() else "", render(report)))
    print(f"wrote {out}")
    return 0


def _recovered(config, state, pattern, method, calibration, data, then, steps, args,
               eval_batches) -> float:
    model = fresh_dense(config, state)
    nmsparse.prune(model, pattern, method,
                   calibration=None if method == "magnitude" else calibration, then=then)
    recover(model, data, steps, args.recovery_lr, seed=1)
    nmsparse.finalize(model)
    return bits_per_byte(model, eval_batches)


BEGIN, END = "<!-- oneshot:begin -->", "<!-- oneshot:end -->"


def embed(document: str, generated: str) -> str:
    """Put the generated part between the markers of ``document`` (hand-written text around
    it is kept); a document without markers becomes just the generated part."""
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        return head + BEGIN + "\n" + generated + END + rest.split(END, 1)[1]
    return f"# One-shot pruning: measured\n\n{BEGIN}\n{generated}{END}\n"


def orderings(report) -> list[str]:
    """The published orderings, checked on these numbers."""
    by = {(r["pattern"], r["method"]): r["one_shot"] for r in report["rows"]}
    patterns = list(dict.fromkeys(r["pattern"] for r in report["rows"]))
    found = []
    for pattern in patterns:
        magnitude = by[(pattern, "magnitude")]
        better = [m for m in ("wanda", "sparsegpt") if by[(pattern, m)] < magnitude]
        found.append(f"- {pattern}: calibrated better than magnitude: "
                     f"{'both' if len(better) == 2 else ', '.join(better) or 'neither'} "
                     f"(magnitude {magnitude:.3f}, wanda {by[(pattern, 'wanda')]:.3f}, "
                     f"sparsegpt {by[(pattern, 'sparsegpt')]:.3f})")
    if "2:4" in patterns and "4:8" in patterns:
        for method in METHODS:
            a, b = by[("4:8", method)], by[("2:4", method)]
            found.append(f"- {method}: 4:8 {'better' if a < b else 'not better'} than 2:4 "
                         f"({a:.3f} vs {b:.3f})")
    return found


def render(report) -> str:
    patterns = list(dict.fromkeys(r["pattern"] for r in report["rows"]))
    by = {(r["pattern"], r["method"]): r for r in report["rows"]}
    config = report["config"]
    options = ", ".join(f"{k}={v}" for k, v in config["model_options"].items())
    setup = [
        f"- Model: `{config['model']}` ({options}), byte-level, sequence length "
        f"{config['seq_len']}; data `{config['data']}` (the standard-library corpus).",
        f"- Dense training: {report['dense_steps']} AdamW steps of batch "
        f"{config['batch_size']}, lr {config['lr']}, "
        f"{report['dense_train_seconds']:.0f} s of training wall time.",
        f"- Calibration: {report['calibration_samples']} training sequences "
        f"({report['calibration_samples'] * config['seq_len']} bytes), fixed seed; every "
        "Linear is pruned, the head included.",
        f"- Evaluation: bits per byte on the first {report['eval_bytes']} bytes of the "
        "held-out split.",
        f"- Recovery: {report['recovery_steps']} AdamW steps (lr {report['recovery_lr']}, "
        "batch 16) from the one-shot model, mask fixed or SR-STE from the one-shot mask.",
        f"- Machine: {report['machine']}. Command: `{report['command']}`.",
    ]
    lines = ["| method | " + " | ".join(patterns) + " | prune wall time (s), same order |",
             "|---|" + "---:|" * len(patterns) + "---|"]
    for method in METHODS:
        cells = [f"{by[(p, method)]['one_shot']:.3f}" for p in patterns]
        times = " / ".join(f"{by[(p, method)]['seconds']:.1f}" for p in patterns)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {times} |")
    recovery = [r for r in report["rows"] if "fixed" in r]
    rec_lines = []
    if recovery:
        rec_lines = ["Recovery (bits per byte):", "",
                     "| pattern | method | one-shot | + fixed-mask fine-tune | + SR-STE |",
                     "|---|---|---:|---:|---:|"]
        rec_lines += [f"| {r['pattern']} | {r['method']} | {r['one_shot']:.3f} | "
                      f"{r['fixed']:.3f} | {r['srste']:.3f} |" for r in recovery]
        rec_lines.append("")
    return "\n".join([
        "<!-- generated by benchmarks/oneshot.py from measured numbers (oneshot.json) -->",
        "", *setup, "", f"Dense: **{report['dense_bpb']:.3f}** bits per byte. One-shot "
        "(bits per byte, lower is better):", "", *lines, "", *rec_lines,
        "Orderings on these numbers:", "", *orderings(report), ""])


if __name__ == "__main__":
    sys.exit(main())
