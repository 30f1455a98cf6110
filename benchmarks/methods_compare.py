"""Seeded comparison of the N:M training methods beyond SR-STE on Fashion-MNIST.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.methods_compare [--out docs/methods.md]``

What it trains (single-threaded, deterministic per seed): an MLP 784-256-256-10 on a
training subset of Fashion-MNIST (``--train-size``, default 30,000 of the 60,000 images,
4 epochs (``--epochs``),
no augmentation), its two hidden layers sparse (the 10-way classifier stays dense: 10 outputs
fit no M x M block), evaluated on the full 10,000-image test set.

* SGD (momentum 0.9, lr 0.05 cosine to 0 per step, weight decay 5e-5, batch 128): dense, and at
  2:4, 1:8 and 1:16 each of srste (decay 2e-4), decaying (pruning-mask decay on weights,
  step schedule over the first half of the steps), sste, gradual (srste inside, kept count
  halving from M over the first third of the steps) and srste on the transposable pattern
  (exact per 4x4 block for 2:4, greedy for 1:8 / 1:16).
* AdamW (lr 1e-3 cosine, weight decay 1e-4, batch 128): srste vs step (AutoSwitch) at 2:4 and
  1:16.

Every cell is run with 3 seeds (model init and data order); the table gives the test
accuracy's mean +- std (sample std) and a Welch t-test of each method against srste with
the same pattern and optimizer: "better" / "worse" when p < 0.05, else "same (p=...)".
Results go to a Markdown file (default ``docs/methods.md``) together with the settings and
the published anchors; nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nmsparse
from nmsparse.app.data.fashion_mnist import DEFAULT_DIR, _load_split, find_files

MEAN, STD = 0.2860, 0.3530
PATTERNS = ("2:4", "1:8", "1:16")
SGD_METHODS = ("srste", "decaying", "sste", "gradual", "transposable")
ADAM_METHODS = ("srste", "step")
ADAM_PATTERNS = ("2:4", "1:16")
SEEDS = (0, 1, 2)
NOTES_MARK = "<!-- hand-written notes below: methods_compare keeps everything after this line -->"
HEADER = """# N:M training methods compared on the same task

Fashion-MNIST, MLP 784-256-256-10, both hidden layers N:M sparse, the classifier dense; every
cell 3 seeds. Written by `benchmarks/methods_compare.py` (its docstring gives every setting);
the machine was a shared 2-core CPU, so the CPU seconds are indicative only.

Published anchors, for context (ImageNet, ResNet-50, top-1 %, from the papers; not measured
here): SR-STE 2:4 77.0 (Zhou et al. 2021), Bi-Mask 2:4 77.4 (Zhang et al. 2023), SR-STE 1:16
about 71.5. A small MLP on Fashion-MNIST is a much easier task: differences between methods
are expected to be small, and the seed noise is shown so that they can be judged.

"""


@dataclass(frozen=True)
class Case:
    optimizer: str  # "sgd" or "adamw"
    method: str  # a row name: a registered method, "transposable" or "dense"
    pattern: str
    seed: int


def load(train_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    files = find_files(DEFAULT_DIR)
    train_x, train_y = _load_split(files["train_images"], files["train_labels"])
    test_x, test_y = _load_split(files["test_images"], files["test_labels"])
    subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1234))
    subset = subset[:train_size]

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255 - MEAN) / STD).reshape(len(x), -1)

    return prepare(train_x[subset]), train_y[subset], prepare(test_x), test_y


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def sparsify(model: nn.Module, case: Case, total_steps: int):
    if case.method == "dense":
        return None
    pattern = case.pattern
    options: dict = {}
    method = case.method
    if method == "transposable":
        method, pattern = "srste", f"transposable:{case.pattern}"
    elif method == "decaying":
        options = {"steps": total_steps // 2, "schedule": "step", "drops": 4,
                   "where": "weights"}
    elif method == "gradual":
        options = {"steps": total_steps // 3, "inner": "srste"}
    return nmsparse.sparsify(model, {"0": (pattern, nmsparse.make_method(method, **options)),
                                     "2": (pattern, nmsparse.make_method(method, **options))})


def run(case: Case, data, epochs: int, batch: int) -> tuple[float, float, int | None]:
    """Test accuracy (%), CPU seconds, and STEP's switch step (None for other methods)."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(case.seed)
    model = mlp()
    steps_per_epoch = len(train_x) // batch
    total = steps_per_epoch * epochs
    handle = sparsify(model, case, total)
    if case.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    order = torch.Generator().manual_seed(case.seed)
    started = time.process_time()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_x), generator=order)
        for k in range(steps_per_epoch):
            index = perm[k * batch:(k + 1) * batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    switched = None
    if handle is not None:
        switched = next((state.get("switched_at") for state in handle.method_states.values()
                         if "switched_at" in state), None)
        nmsparse.finalize(model)  # evaluate exactly the N:M model a user would deploy
        assert_sparse(model, case)
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return 100 * accuracy, time.process_time() - started, switched


def assert_sparse(model: nn.Module, case: Case) -> None:
    spec = f"transposable:{case.pattern}" if case.method == "transposable" else case.pattern
    pattern = nmsparse.parse_pattern(spec)
    for index in (0, 2):
        found = pattern.violations(model[index].weight.detach())
        if not found.ok:
            raise RuntimeError(f"{case}: layer {index} breaks {spec} after finalize")


def cases(quick: bool) -> list[Case]:
    seeds = SEEDS[:1] if quick else SEEDS
    out = [Case("sgd", "dense", "dense", s) for s in seeds]
    out += [Case("sgd", m, p, s) for p in PATTERNS for m in SGD_METHODS for s in seeds]
    out += [Case("adamw", "dense", "dense", s) for s in seeds]
    out += [Case("adamw", m, p, s) for p in ADAM_PATTERNS for m in ADAM_METHODS for s in seeds]
    return out


def welch(values: list[float], reference: list[float]) -> str:
    from scipy.stats import ttest_ind

    if len(values) < 2 or len(reference) < 2:
        return "n/a"
    if statistics.pstdev(values) == 0 and statistics.pstdev(reference) == 0:
        return "same (no spread)" if values[0] == reference[0] else "n/a (no spread)"
    p = float(ttest_ind(values, reference, equal_var=False).pvalue)
    if p < 0.05:
        return ("better" if statistics.mean(values) > statistics.mean(reference)
                else "worse") + f" (p={p:.3f})"
    return f"same (p={p:.2f})"


def report(results: dict[Case, tuple[float, float, int | None]], settings: str) -> str:
    groups: dict[tuple[str, str, str], list[float]] = {}
    seconds: dict[tuple[str, str, str], list[float]] = {}
    switches: dict[tuple[str, str, str], list[int]] = {}
    for case, (accuracy, cpu, switched) in results.items():
        key = (case.optimizer, case.pattern, case.method)
        groups.setdefault(key, []).append(accuracy)
        seconds.setdefault(key, []).append(cpu)
        if switched is not None:
            switches.setdefault(key, []).append(switched)
    lines = ["| optimizer | pattern | method | test accuracy % (mean +- std, 3 seeds) | seeds | "
             "vs srste (Welch t-test) | CPU s/run | note |", "|---|---|---|---|---|---|---|---|"]
    for (optimizer, pattern, method), values in groups.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        reference = groups.get((optimizer, pattern, "srste"))
        verdict = ("-" if method in ("srste", "dense") or reference is None
                   else welch(values, reference))
        lines.append(f"| {optimizer} | {pattern} | {method} | {mean:.2f} +- {std:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} | {verdict} | "
                     f"{statistics.mean(seconds[(optimizer, pattern, method)]):.0f} | "
                     + (f"AutoSwitch at step {', '.join(map(str, switches[key]))} |"
                        if (key := (optimizer, pattern, method)) in switches else " |"))
    return settings + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/methods.md"))
    parser.add_argument("--train-size", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="one seed (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load(args.train_size)
    results = {}
    todo = cases(args.quick)
    wall = time.time()
    for i, case in enumerate(todo, 1):
        results[case] = run(case, data, args.epochs, args.batch)
        print(f"[{i}/{len(todo)}] {case.optimizer} {case.pattern} {case.method} seed "
              f"{case.seed}: {results[case][0]:.2f}% ({results[case][1]:.1f} CPU s)",
              flush=True)
    settings = (f"Measured by `python -m benchmarks.methods_compare` "
                f"(train subset {args.train_size} images, {args.epochs} epochs, batch "
                f"{args.batch}, {len(todo)} runs, {time.time() - wall:.0f} s wall on one "
                f"thread, torch {torch.__version__}).\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    notes = ""
    if args.out.is_file():
        old = args.out.read_text(encoding="utf-8")
        notes = old.split(NOTES_MARK, 1)[1] if NOTES_MARK in old else ""
    tmp.write_text(HEADER + report(results, settings) + "\n" + NOTES_MARK + notes,
                   encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
