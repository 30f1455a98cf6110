"""What the GPU check runs, in order, each part with its own time cap.

The caps add up to :data:`BUDGET_S` (8 minutes), so the whole check fits one device call
with time left to rerun it. A part that reaches its cap is killed with its whole process
group and the next part starts; a part is also never given more than what is left of the
budget. Parts marked ``gpu`` are skipped when the ``machine`` part finds no usable CUDA GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BUDGET_S = 480.0
MIN_START_S = 5.0  # a part is not started with less than this left of the budget


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float
    title: str
    gpu: bool  # needs a working CUDA GPU


PARTS = [
    Part("install", 35, "pip install --no-deps --no-build-isolation -e . (no network)", False),
    Part("machine", 30, "GPU, driver and library versions; a matmul on the GPU", False),
    Part("tests", 95, "pytest -m 'cuda or timm': every CUDA test, and timm's", True),
    Part("correctness", 50, "Triton N:M kernels at model sizes (native bf16 tl.dot) and "
         "accelerate / swap_linear_layers on a GPT, against dense", True),
    Part("kernels", 100, "kernel benchmark on docs/kernels.md's shapes and batches "
         "(5 warm-up, 20 timed runs)", True),
    Part("decode", 70, "gpt_1b greedy decode, batch 1: dense vs 2:4 vs 2:8 tokens/s", True),
    Part("overhead-eager", 40, "SR-STE 2:4 training-step overhead, eager mask refresh", True),
    Part("overhead-compiled", 50, "SR-STE 2:4 training-step overhead, compiled mask refresh",
         True),
]
PART_NAMES = [part.name for part in PARTS]
assert sum(part.cap_s for part in PARTS) <= BUDGET_S


@dataclass
class Step:
    """One part made concrete: the command, its environment and where its result lands."""

    part: Part
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    result: Path | None = None  # the part's JSON (Python parts); None for commands
    note: str = ""  # how the dry run differs


def steps(python: str, work: Path, dry_run: bool, only: list[str] | None = None,
          ) -> list[Step]:
    """The plan: a :class:`Step` per part (``only``: those parts, in plan order)."""
    chosen = []
    for part in PARTS:
        if only is not None and part.name not in only:
            continue
        if part.name == "install":
            if dry_run:
                chosen.append(Step(part, [python, "-m", "pip", "--version"],
                                   note="dry run: pip --version only, nothing installed"))
            else:
                # --no-index, no version check: nothing may wait on a network there is not
                chosen.append(Step(part, [python, "-m", "pip", "install", "--no-deps",
                                          "--no-build-isolation", "--no-index", "--no-input",
                                          "--disable-pip-version-check", "-e", "."]))
        elif part.name == "tests":
            base = [python, "-m", "pytest", "-m", "cuda or timm", "-p", "no:cacheprovider", "tests"]
            if dry_run:
                chosen.append(Step(part, base + ["-q", "--collect-only"],
                                   note="dry run: CUDA tests collected, not run"))
            else:  # -v: one line per test, so a run killed at its cap still says how far
                chosen.append(Step(part, base + ["-v", "--continue-on-collection-errors",
                                                 "--junitxml", str(work / "junit.xml")]))
        else:
            result = work / f"{part.name}.json"
            command = [python, "-m", "benchmarks.gpu_check.parts", part.name, "--json",
                       str(result)]
            if dry_run:
                command.append("--fixture")
            chosen.append(Step(part, command, result=result,
                               note="dry run: fixture numbers, no GPU" if dry_run else ""))
    return chosen
