"""The study's grid: presets expanded into runs, each a TrainConfig override dict + a stable id.

A run id is a short hash of the *resolved* configuration (defaults < overrides, ``out``
left out), so the same settings always land in the same folder and any change of a setting,
default included, gives a new folder instead of silently reusing an old result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from nmsparse.train.config import TrainConfig, resolve

# Fields that do not change the result (where it is written, whether plots are drawn).
NOT_HASHED = ("out", "plots", "tensorboard", "num_workers")

FASHION = "/usr/share/datasets/fashion-mnist"
PAPER_PATTERNS = ("2:4", "4:8", "1:4", "2:8", "1:8", "1:16")
DECAY_SWEEP = (0.0, 2e-5, 2e-4, 2e-3, 2e-2)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: which table it belongs to, and its TrainConfig overrides."""

    group: str  # "main", "decay", "layout" or "lm"
    overrides: dict[str, Any] = field(hash=False)

    def config(self) -> TrainConfig:
        return resolve(None, dict(self.overrides))

    @property
    def run_id(self) -> str:
        return run_id(self.config())

    @property
    def name(self) -> str:
        """Readable folder name: what the run is, then its id."""
        cfg = self.config()
        what = "dense" if cfg.dense else f"{cfg.pattern.replace(':', 'of')}-{cfg.method}"
        extra = ""
        if self.group == "decay":
            extra = f"-decay{cfg.decay:g}"
        elif self.group == "layout":
            extra = f"-{cfg.layout}"
        return f"{cfg.data}-{cfg.model}-{what}{extra}-s{cfg.seed}-{self.run_id}"


def run_id(config: TrainConfig) -> str:
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_HASHED}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Preset:
    name: str
    vision: dict[str, Any]  # shared overrides of the vision runs
    lm: dict[str, Any]  # shared overrides of the language-model runs
    main: tuple[tuple[str, str], ...]  # (method, pattern); pattern "dense" for dense
    seeds: tuple[int, ...]
    decay_sweep: tuple[float, ...] = ()
    decay_pattern: str = "1:8"
    layout_patterns: tuple[str, ...] = ()
    lm_runs: tuple[tuple[str, str], ...] = ()
    lm_seeds: tuple[int, ...] = (0,)
    why: str = ""  # how the sizes were chosen


# The paper's recipe shape: SGD momentum 0.9, warm-up then cosine per step, weight decay 5e-5
# on everything; sparse from step 0; the final fc stays dense (as in the paper's tables).
_RECIPE = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5,
           "decay": 2e-4, "exclude": ["fc"], "layout": "in", "log_every": 10}

FULL = Preset(
    name="full",
    vision={**_RECIPE, "data": "fashion-mnist", "data_dir": FASHION, "model": "resnet20",
            "model_options": {"width": 1.0}, "epochs": 30, "batch_size": 128,
            "warmup_epochs": 2.0, "device": "auto"},
    lm={"data": "text", "model": "gpt_tiny", "seq_len": 256, "optimizer": "sgd", "lr": 0.1,
        "momentum": 0.9, "weight_decay": 5e-5, "decay": 2e-4, "epochs": 4, "batch_size": 32,
        "limit_train_batches": 2000, "limit_test_batches": 100, "warmup_epochs": 0.25,
        "log_every": 10, "device": "auto"},
    main=(("dense", "dense"),
          *((m, p) for m in ("ste", "srste") for p in PAPER_PATTERNS),
          ("asp", "2:4"), ("asp", "4:8"), ("asp", "1:4")),
    seeds=(0, 1, 2),
    decay_sweep=DECAY_SWEEP,
    layout_patterns=("2:4", "1:4"),
    lm_runs=(("dense", "dense"), *((m, p) for m in ("ste", "srste")
                                   for p in ("2:4", "1:4", "2:8"))),
    why="GPU-sized (device auto): resnet20 at width 1.0 (16/32/64 channels, 0.27M params), "
        "30 epochs per phase (asp: 30 dense + 30 fixed-mask = 2x the budget), batch 128; "
        "every run is its own resumable piece, so it also runs on CPU in slices.",
)

# Sizes measured on this machine (2 AMD EPYC cores, torch CPU) before fixing the preset:
# resnet20 width 0.5, batch 128, 2:4 SR-STE ran 40 steps in 3.7 s (0.09 s/step, ~1,400
# samples/s), so one full Fashion-MNIST epoch (468 steps) + test pass is ~50 s; gpt_tiny
# at batch 32 x 128 bytes took 0.6 s/step. 7 epoch-units of resnet (5 runs + asp's 2 phases)
# x 3 epochs ~ 18 min, plus 2 LM runs of 250 steps at batch 16 ~ 3 min, plus start-up:
# ~23 min, inside the ~35 min budget with room for the slower sparse steps.
QUICK = Preset(
    name="quick",
    vision={**_RECIPE, "data": "fashion-mnist", "data_dir": FASHION, "model": "resnet20",
            "model_options": {"width": 0.5}, "epochs": 3, "batch_size": 128,
            "warmup_epochs": 0.5, "device": "cpu"},
    lm={"data": "text", "model": "gpt_tiny", "seq_len": 128, "optimizer": "sgd", "lr": 0.1,
        "momentum": 0.9, "weight_decay": 5e-5, "decay": 2e-4, "epochs": 1, "batch_size": 16,
        "limit_train_batches": 250, "limit_test_batches": 40, "warmup_epochs": 0.1,
        "log_every": 10, "device": "cpu"},
    main=(("dense", "dense"), ("ste", "2:4"), ("srste", "2:4"), ("ste", "1:8"),
          ("srste", "1:8"), ("asp", "2:4")),
    seeds=(0,),
    lm_runs=(("dense", "dense"), ("srste", "2:4")),
    why="2 CPU cores, <= ~35 min for the whole preset: resnet20 at width 0.5 (8/16/32 "
        "channels), 3 epochs per phase on the full Fashion-MNIST (asp: 3 + 3), batch 128, one "
        "seed; gpt_tiny LM for 250 steps of 16 x 128 bytes. Measured 0.09 s/step for the "
        "resnet and 0.6 s/step for gpt_tiny at batch 32 on this machine.",
)

PRESETS = {p.name: p for p in (QUICK, FULL)}


def _method(method: str, pattern: str) -> dict[str, Any]:
    if pattern == "dense":
        return {"pattern": "dense", "method": "srste"}  # method unused by dense runs
    return {"pattern": pattern, "method": method}


def expand(preset: Preset | str) -> list[RunSpec]:
    """All runs of a preset, in the order they are run (main table first)."""
    if isinstance(preset, str):
        preset = PRESETS[preset]
    runs: list[RunSpec] = []
    for seed in preset.seeds:
        for method, pattern in preset.main:
            runs.append(RunSpec("main", {**preset.vision, **_method(method, pattern),
                                         "seed": seed}))
    for seed in preset.seeds:
        for decay in preset.decay_sweep:
            runs.append(RunSpec("decay", {**preset.vision, "pattern": preset.decay_pattern,
                                          "method": "srste", "decay": decay, "seed": seed}))
        for pattern in preset.layout_patterns:
            runs.append(RunSpec("layout", {**preset.vision, "pattern": pattern,
                                           "method": "srste", "layout": "flat",
                                           "seed": seed}))
    for seed in preset.lm_seeds:
        for method, pattern in preset.lm_runs:
            runs.append(RunSpec("lm", {**preset.lm, **_method(method, pattern),
                                       "seed": seed}))
    # The sweep repeats the main table's 1:8 SR-STE at 2e-4 and the layout table the "in"
    # runs: the same resolved config is the same run, so keep only its first occurrence.
    unique: dict[str, RunSpec] = {}
    for spec in runs:
        unique.setdefault(spec.run_id, spec)
    return list(unique.values())
