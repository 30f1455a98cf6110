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
# Opt-in parts, never in the default run (the caps above fill the budget); run one alone with
# --only: the accuracy study's gpu preset (docs/results.md), packed into one bundle file.
OPTIONAL_PARTS = [Part("study", 470, "accuracy study, gpu preset (benchmarks/study): runs "
                       "packed into the result, merged into docs/results.md", True)]
SELECTABLE_NAMES = PART_NAMES + [part.name for part in OPTIONAL_PARTS]
STUDY_DATA = ("/usr/share/datasets/fashion-mnist", "gpu-data/fashion-mnist")  # else carried


def study_command(python: str, work: Path, dry_run: bool) -> list[str]:
    """The study's gpu preset, all runs under ``work``, its bundle as the part's result; the
    dry run lists the grid and writes an empty bundle (no run needs a GPU to be listed)."""
    from benchmarks.study.grid import GPU_JOBS

    command = [python, "-m", "benchmarks.study", "--preset", "gpu", "--root",
               str(work / "study-runs"), "--bundle", str(work / "study.json"), "--no-report"]
    found = [path for path in STUDY_DATA if Path(path).is_dir()]
    if found and found[0] != STUDY_DATA[0]:
        command += ["--data-dir", str(Path(found[0]).resolve())]
    if dry_run:
        return command + ["--list"]
    return command + ["--jobs", str(GPU_JOBS), "--threads", "2"]


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
    for part in PARTS + OPTIONAL_PARTS:
        if (part.name not in only) if only is not None else part in OPTIONAL_PARTS:
            continue
        if part.name == "study":
            chosen.append(Step(part, study_command(python, work, dry_run),
                               result=work / "study.json",
                               note="dry run: the grid listed, nothing trained" if dry_run
                               else ""))
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
