"""The study's grid: presets expanded into runs, each a TrainConfig override dict + a stable id.

A run id is a short hash of the *resolved* configuration (defaults < overrides, ``out``
left out), so the same settings always land in the same folder and any change of a setting,
default included, gives a new folder instead of silently reusing an old result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from nmsparse.app.train.config import TrainConfig, resolve

# Fields that do not change the result (where it is written, whether plots are drawn).
NOT_HASHED = ("out", "plots", "tensorboard", "num_workers")

FASHION = "/usr/share/datasets/fashion-mnist"
PAPER_PATTERNS = ("2:4", "4:8", "1:4", "2:8", "1:8", "1:16")
DECAY_SWEEP = (0.0, 2e-5, 2e-4, 2e-3, 2e-2)

# The paper's ImageNet schedule (paper.md): 120 epochs of 1.28M images at batch 256, lr 0.1,
# 5 warm-up epochs then cosine to 0; lambda_w 2e-4, effectively 1.6e-3 (8 GPUs summed).
PAPER_STEPS_PER_EPOCH = 1_281_167 // 256
PAPER_STEPS = 120 * PAPER_STEPS_PER_EPOCH
PAPER_WARMUP = 5 * PAPER_STEPS_PER_EPOCH
PAPER_SUM_LR = 0.1 * (PAPER_WARMUP / 2 + (PAPER_STEPS - PAPER_WARMUP) / 2)  # mean of cosine
PAPER_DECAY, PAPER_DECAY_EFFECTIVE = 2e-4, 1.6e-3
PAPER_CUMULATIVE_DECAY = PAPER_SUM_LR * PAPER_DECAY  # sum_t lr_t * decay, ~6.0


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: which table it belongs to, and its TrainConfig overrides."""

    group: str  # "main", "decay", "layout", "extra" or "lm"
    overrides: dict[str, Any] = field(hash=False)
    label: str = ""  # the row's name in the report when the method alone does not say it

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
        extra = f"-{self.label}" if self.label else ""
        if self.group == "decay":
            extra = f"-decay{cfg.make_method().decay:g}"
        elif self.group == "layout":
            extra = f"-{cfg.layout}"
        elif self.group == "extra" and cfg.method_options:
            extra += "-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.method_options.items()))
        return f"{cfg.data}-{cfg.model}-{what}{extra}-s{cfg.seed}-{self.run_id}"


def run_id(config: TrainConfig) -> str:
    values = {k: v for k, v in config.to_dict().items() if k not in NOT_HASHED}
    # the method as resolved: a default given explicitly is the same run
    values["method_options"] = config.make_method().options()
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
    # Seeds of the decay sweep, layout and extra rows (None: the main table's seeds).
    other_seeds: tuple[int, ...] | None = None
    # ASP at the *same* budget as the one-phase methods: epochs // 2 dense + epochs // 2
    # retrained (the main table's ASP rows spend 2x), for these patterns.
    asp_equal: tuple[str, ...] = ()
    # SR-STE at decay_pattern with the decay that makes sum_t lr_t * decay equal the paper's
    # (PAPER_CUMULATIVE_DECAY): this preset's train-set size, to count its steps.
    decay_matched_train_size: int | None = None
    # Further method rows: (method, pattern, method_options), own table in the report; a new
    # registered method is studied by listing it here.
    extra: tuple[tuple[str, str, dict[str, Any]], ...] = ()


# The paper's recipe shape: SGD momentum 0.9, warm-up then cosine per step, weight decay 5e-5
# on everything; sparse from step 0; the final fc stays dense (as in the paper's tables).
_RECIPE = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5,
           "exclude": ["fc"], "layout": "in", "log_every": 10}

FULL = Preset(
    name="full",
    vision={**_RECIPE, "data": "fashion-mnist", "data_dir": FASHION, "model": "resnet20",
            "model_options": {"width": 1.0}, "epochs": 30, "batch_size": 128,
            "warmup_epochs": 2.0, "device": "auto"},
    lm={"data": "text", "model": "gpt_tiny", "seq_len": 256, "optimizer": "sgd", "lr": 0.1,
        "momentum": 0.9, "weight_decay": 5e-5, "epochs": 4, "batch_size": 32,
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
        "momentum": 0.9, "weight_decay": 5e-5, "epochs": 1, "batch_size": 16,
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

# Chosen by a pilot on this machine (2 shared cores, 5 other sessions busy; OMP_NUM_THREADS=1,
# two runs side by side), MLP 784-128-128-10 on the full Fashion-MNIST, SGD lr 0.1 momentum
# 0.9, 0.5 warm-up epochs, batch 128, fc kept dense, seed 0 unless said (top-1, wall s):
#   5 epochs: dense 85.62 (22 s), SR-STE 1:16 83.59 (39 s), STE 1:16 83.25 (88 s, busy) and
#   seed 1 82.81 (105 s), STE 1:8 84.16 (87 s), SR-STE 1:8 84.75 (100 s);
#   4 epochs: SR-STE 1:8 84.37 (73 s, busy); gpt_tiny 2 layers d_model 64, 300 steps of
#   16 x 64 bytes: 3.70 bits/byte (52 s).
# So a narrow MLP opens a 2-2.8 point dense-vs-1:16 gap and a 0.3-0.6 point SR-STE-vs-STE gap
# on one seed, at 25-40 s per run on a quiet core (70-100 s when the machine is busy).
_CPU_WHY = (
    "2 shared CPU cores, one thread per run, two runs side by side, whole preset in ~80 min: "
    "MLP 784-128-128-10 (hidden [128,128]; classifier kept dense) on the full Fashion-MNIST, "
    "4 epochs, batch 256 (940 steps), lr 0.1 with 0.5 warm-up epochs; 5 seeds for the main "
    "table, 3 for the decay sweep (at 1:8, plus the decay matching the paper's cumulative "
    "6.0) and the LM (gpt_tiny, 2 layers, d_model 64, 200 steps of 16 x 64 bytes); no "
    "layout rows, since for Linear layers the in and flat groupings are the same groups (the "
    "gpu preset compares them on a conv net). Pilot "
    "(same recipe, 5 epochs, seed 0, `nmsparse train --threads 1 --model mlp --model-option "
    "hidden=[128,128] --data fashion-mnist --epochs 5 --batch-size 128 --exclude classifier "
    "...`): dense 85.62, SR-STE 1:16 83.59, STE 1:16 83.25 (seed 1: 82.81), SR-STE 1:8 84.75, "
    "STE 1:8 84.16; 4 epochs SR-STE 1:8 84.37; 22-40 s per run on a quiet core, 70-105 s "
    "while the machine was busy; the LM at that size 3.70 bits/byte in 52 s. A first start "
    "at batch 128 ran its sparse runs in 86-139 s each (load average 9 on the 2 cores), "
    "too slow for the time box: batch 256 halves the steps, which dominate at this size; "
    "at batch 256 the machine stayed as busy (sparse runs 110-145 s), so the LM went from 300 "
    "to 200 steps and the layout rows were dropped.")

CPU = Preset(
    name="cpu",
    vision={**_RECIPE, "exclude": ["classifier"], "data": "fashion-mnist", "data_dir": FASHION,
            "model": "mlp", "model_options": {"hidden": [128, 128]}, "epochs": 4,
            "batch_size": 256, "warmup_epochs": 0.5, "device": "cpu", "plots": False,
            "log_every": 20},
    lm={"data": "text", "model": "gpt_tiny", "seq_len": 64,
        "model_options": {"n_layer": 2, "n_head": 2, "d_model": 64}, "optimizer": "sgd",
        "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5, "epochs": 1,
        "batch_size": 16, "limit_train_batches": 200, "limit_test_batches": 10,
        "warmup_epochs": 0.1, "log_every": 10, "device": "cpu", "plots": False},
    main=(("dense", "dense"), ("ste", "2:4"), ("srste", "2:4"), ("srste", "4:8"),
          ("srste", "1:4"), ("srste", "2:8"), ("ste", "1:8"), ("srste", "1:8"),
          ("ste", "1:16"), ("srste", "1:16"), ("asp", "2:4")),
    seeds=(0, 1, 2, 3, 4),
    other_seeds=(0, 1, 2),
    asp_equal=("2:4",),
    decay_sweep=DECAY_SWEEP,
    decay_pattern="1:8",
    decay_matched_train_size=60_000,
    lm_runs=(("dense", "dense"), ("ste", "2:4"), ("srste", "2:4")),
    lm_seeds=(0, 1, 2),
    # The methods of the methods issue at 1:8 against SR-STE on the same seeds; the schedules
    # of decaying and gradual span the first third of the 940 steps.
    extra=(("decaying", "1:8", {"steps": 313}), ("gradual", "1:8", {"steps": 313}),
           ("sste", "1:8", {}), ("srste", "transposable:1:8", {})),
    why=_CPU_WHY,
)

# One lent H200 (15 min of device time, of which ~8 for this): resnet20 at width 1.0 on
# Fashion-MNIST (the conv net, where the "in" and "flat" layouts differ), 4 epochs, 3 seeds,
# four runs at once on the one GPU (each process alone leaves it mostly idle at batch 128).
GPU = Preset(
    name="gpu",
    vision={**_RECIPE, "data": "fashion-mnist", "data_dir": FASHION, "model": "resnet20",
            "model_options": {"width": 1.0}, "epochs": 4, "batch_size": 128,
            "warmup_epochs": 0.5, "device": "cuda", "plots": False},
    lm={},
    main=(("dense", "dense"), ("ste", "2:4"), ("srste", "2:4"), ("srste", "4:8"),
          ("ste", "1:8"), ("srste", "1:8")),
    seeds=(0, 1, 2),
    layout_patterns=("2:4",),
    why="one H200, under 8 minutes with 4 runs at once: resnet20 width 1.0, 4 epochs, batch "
        "128, 3 seeds; dense, STE and SR-STE at 2:4 and 1:8, SR-STE 4:8, the flat layout at "
        "2:4. Sized from the CPU timing (0.09 s/step at width 0.5 on 2 CPU cores), not yet "
        "measured on the GPU.",
)
GPU_JOBS = 4

PRESETS = {p.name: p for p in (QUICK, FULL, CPU, GPU)}


def sum_lr(vision: dict[str, Any], train_size: int) -> float:
    """sum_t lr_t of one phase of a vision run, stepping the trainer's own schedule."""
    import torch

    from nmsparse.app.train.schedule import warmup_cosine

    cfg = resolve(None, dict(vision))
    # Counts the last partial batch, which the trainer drops (drop_last): 235 steps per epoch
    # here where the runs take 234, so the matched row lands at ~5.97, not 6.0; the report
    # shows the value summed from each run's logged lr, and the ids of the runs made with
    # this count stay as they are.
    per_epoch = -(-train_size // cfg.batch_size)
    if cfg.limit_train_batches is not None:
        per_epoch = min(per_epoch, cfg.limit_train_batches)
    total = cfg.epochs * per_epoch
    warmup = min(total, round(cfg.warmup_epochs * per_epoch))  # as the trainer rounds it
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = warmup_cosine(optimizer, warmup, total)
    out = 0.0
    for _ in range(total):
        out += optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    return out


def matched_decay(preset: Preset) -> float:
    """The SR-STE decay whose sum_t lr_t * decay over this preset's run is the paper's."""
    assert preset.decay_matched_train_size is not None
    return round(PAPER_CUMULATIVE_DECAY / sum_lr(preset.vision,
                                                 preset.decay_matched_train_size), 6)


def _method(method: str, pattern: str) -> dict[str, Any]:
    if pattern == "dense":
        return {"pattern": "dense", "method": "srste"}  # method unused by dense runs
    return {"pattern": pattern, "method": method}


def expand(preset: Preset | str, data_dir: str | None = None) -> list[RunSpec]:
    """All runs of a preset, seed by seed (``data_dir``: the vision data set's folder when
    it is not at the preset's path, e.g. a copy carried to a GPU machine)."""
    if isinstance(preset, str):
        preset = PRESETS[preset]
    if data_dir is not None:
        preset = dataclasses.replace(preset, vision={**preset.vision, "data_dir": data_dir})
    other_seeds = preset.seeds if preset.other_seeds is None else preset.other_seeds
    decays = list(preset.decay_sweep)
    if preset.decay_matched_train_size is not None:
        decays.append(matched_decay(preset))
    runs: list[RunSpec] = []
    # Seed by seed, so a study cut short still has every table at its first seeds.
    for seed in sorted({*preset.seeds, *other_seeds, *preset.lm_seeds}):
        if seed in preset.seeds:
            for method, pattern in preset.main:
                runs.append(RunSpec("main", {**preset.vision, **_method(method, pattern),
                                             "seed": seed}))
            for pattern in preset.asp_equal:
                epochs = preset.vision["epochs"] // 2
                runs.append(RunSpec("main", {**preset.vision, "pattern": pattern,
                                             "method": "asp", "epochs": epochs,
                                             "seed": seed}, label=f"equal{epochs}ep"))
        if seed in other_seeds:
            for decay in decays:
                runs.append(RunSpec("decay", {**preset.vision,
                                              "pattern": preset.decay_pattern,
                                              "method": "srste",
                                              "method_options": {"decay": decay},
                                              "seed": seed}))
            for pattern in preset.layout_patterns:
                runs.append(RunSpec("layout", {**preset.vision, "pattern": pattern,
                                               "method": "srste", "layout": "flat",
                                               "seed": seed}))
            for method, pattern, options in preset.extra:
                runs.append(RunSpec("extra", {**preset.vision, **_method(method, pattern),
                                              "method_options": dict(options),
                                              "seed": seed}))
        if seed in preset.lm_seeds:
            for method, pattern in preset.lm_runs:
                runs.append(RunSpec("lm", {**preset.lm, **_method(method, pattern),
                                           "seed": seed}))
    # The sweep repeats the main table's 1:8 SR-STE at 2e-4 and the layout table the "in"
    # runs: the same resolved config is the same run, so keep only its first occurrence.
    unique: dict[str, RunSpec] = {}
    for spec in runs:
        unique.setdefault(spec.run_id, spec)
    return list(unique.values())
