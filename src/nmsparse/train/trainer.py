"""One plain training loop for every recipe: dense, or any registered sparse training method.

A run is a list of phases of ``config.epochs`` epochs each: the method says which
(:meth:`nmsparse.Method.phases`): one sparse phase for SR-STE, STE and fixed masks; for ASP a
dense phase, then the one-shot magnitude prune to the pattern and retraining with that fixed
mask for the same budget. The sparsity handle's state (step count, method state) is saved in
every checkpoint. A checkpoint is written atomically at
the end of every epoch; resuming restarts the interrupted epoch from its beginning with the
same data order, augmentation and RNG state, so it ends with the same weights as a run that
was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import sparsify
from .._atomic import atomic_open
from ..data import DataBundle, load_dataset
from ..data.loader import make_loader
from ..methods import Method
from ..models import create_model
from ..sad import SADTracker
from ..summary import summary
from . import checkpoint, distributed, metrics_log, plots
from .config import TrainConfig, from_dict, write_json
from .init import load_init
from .progress import Progress
from .schedule import warmup_cosine

LANGUAGE_MODEL = "language_model"


@dataclass
class Phase:
    name: str
    method: Method | None  # None: dense


def phases_of(config: TrainConfig) -> list[Phase]:
    if config.dense:
        return [Phase("dense", None)]
    method = config.make_method()
    kinds = method.phases()
    return [Phase("dense", None) if kind == "dense" else
            Phase("retrain" if index else method.name, method)
            for index, kind in enumerate(kinds)]


def build(config: TrainConfig) -> tuple[DataBundle, nn.Module]:
    """The data and the freshly initialised model a configuration describes."""
    data = load_dataset(config.data, data_dir=config.data_dir, text_file=config.text_file,
                        seq_len=config.seq_len, seed=config.seed)
    torch.manual_seed(config.seed)
    model = create_model(config.model, input_shape=data.input_shape,
                         num_classes=data.num_classes, task=data.task,
                         **config.model_options)
    return data, model


def apply_sparsity(model: nn.Module, config: TrainConfig, method: Method | None,
                   masks: dict[str, torch.Tensor] | None = None):
    """Sparsify ``model`` for a phase (starting from ``masks`` if given); returns the handle,
    or None for a dense phase."""
    if method is None:
        return None
    return sparsify(model, config.pattern, method, include=config.include,
                    exclude=config.exclude or None, layout=config.layout, masks=masks)


def loss_and_correct(logits: torch.Tensor, target: torch.Tensor,
                     label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and the number of correct predictions (per token for language models)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    target = target.reshape(-1)
    loss = nn.functional.cross_entropy(logits, target, label_smoothing=label_smoothing)
    return loss, (logits.argmax(-1) == target).sum()


def autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def evaluate(model: nn.Module, loader, config: TrainConfig, world: distributed.World,
             task: str, limit: int | None = None) -> dict[str, float]:
    """Test loss and accuracy (and bits per byte for language models) on the whole test
    split. Every rank evaluates all of it: exact (a sharded split would be padded with
    repeats) and free of communication."""
    was_training = model.training
    model.eval()
    total_loss = correct = count = 0.0
    with torch.no_grad():
        for index, (x, y) in enumerate(loader):
            if limit is not None and index >= limit:
                break
            x, y = x.to(world.device), y.to(world.device)
            with autocast(config, world.device):
                logits = model(x)
            loss, right = loss_and_correct(logits, y)
            items = y.numel()
            total_loss += loss.item() * items
            correct += right.item()
            count += items
    model.train(was_training)
    result = {"test_loss": total_loss / max(count, 1), "test_acc": correct / max(count, 1)}
    if task == LANGUAGE_MODEL:
        result["test_bpb"] = result["test_loss"] / math.log(2)  # nats per byte -> bits
    return result


class Run:
    """Everything one training run holds; ``fit()`` runs it to the end."""

    def __init__(self, config: TrainConfig, world: distributed.World, *, console=None) -> None:
        self.config, self.world = config, world
        self.run_dir: Path | None = None
        self.console = console or (lambda message: None)
        self.data, self.model = build(config)
        self.model.to(world.device)
        self.phases = phases_of(config)
        self.phase_index = 0
        masks = load_init(self.model, config.init) if config.init else None
        self.handle = apply_sparsity(self.model, config, self.phases[0].method, masks)
        self.epoch = self.step = 0
        self.elapsed = 0.0
        self.best_score: float | None = None
        self.train_loader = make_loader(self.data.train, config.batch_size, shuffle=True,
                                        seed=config.seed, drop_last=True,
                                        num_workers=config.num_workers,
                                        distributed=self._shard())
        self.test_loader = make_loader(self.data.test, config.batch_size, shuffle=False,
                                       seed=config.seed, num_workers=config.num_workers)
        self._start_phase()
        self.log = metrics_log.MetricsLog(None)

    def use_run_dir(self, run_dir: Path) -> None:
        """Write logs and checkpoints here (the main process only); called once all the
        set-up has succeeded, so bad input leaves no half-made run behind."""
        if self.world.main:
            self.run_dir = run_dir
            self.log = metrics_log.MetricsLog(run_dir, tensorboard=self.config.tensorboard)

    # -- set-up -----------------------------------------------------------------------------
    def _shard(self):
        return (self.world.rank, self.world.size) if self.world.distributed else None

    def steps_per_epoch(self) -> int:
        batches = len(self.train_loader)
        if self.config.limit_train_batches is not None:
            batches = min(batches, self.config.limit_train_batches)
        return batches

    def _start_phase(self) -> None:
        """Fresh optimizer, schedule and SAD tracker for the current phase."""
        config = self.config
        params = self.model.parameters()
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr,
                                               weight_decay=config.weight_decay)
        total = config.epochs * self.steps_per_epoch()
        warmup = min(total, round(config.warmup_epochs * self.steps_per_epoch()))
        self.scheduler = warmup_cosine(self.optimizer, warmup, total)
        self.scaler = torch.amp.GradScaler(self.world.device.type,
                                           enabled=config.amp == "fp16")
        # SAD at a regular interval: every log_every steps, and epoch to epoch (the paper's).
        self.step_tracker = SADTracker(self.handle.masks) if self.handle else None
        self.epoch_tracker = SADTracker(self.handle.masks) if self.handle else None
        self.trained = (DistributedDataParallel(self.model) if self.world.distributed
                        else self.model)

    def _next_phase(self) -> None:
        self.phase_index += 1
        phase = self.phases[self.phase_index]
        what = (f"{self.config.pattern} masks from the trained weights, then {phase.method!r}"
                if phase.method is not None else "dense")
        self.console(f"phase {self.phase_index + 1}/{len(self.phases)}: {phase.name} ({what})")
        self.handle = apply_sparsity(self.model, self.config, phase.method)
        self.best_score = None
        self._start_phase()

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "phase": self.phase_index,
            "epoch": self.epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "best_score": self.best_score,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trackers": ([self.step_tracker.state_dict(), self.epoch_tracker.state_dict()]
                         if self.handle else None),
            "sparsity": self.handle.state_dict() if self.handle else None,
            "rng": checkpoint.rng_state(),
        }

    def restore(self, payload: dict[str, Any]) -> None:
        while self.phase_index < payload["phase"]:
            self._next_phase()
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        if self.handle and payload["trackers"]:
            self.step_tracker.load_state_dict(payload["trackers"][0])
            self.epoch_tracker.load_state_dict(payload["trackers"][1])
        if self.handle and payload.get("sparsity"):
            self.handle.load_state_dict(payload["sparsity"])
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.elapsed, self.best_score = payload["elapsed"], payload["best_score"]
        checkpoint.set_rng_state(payload["rng"])
        self.log.truncate_after(self.step)

    def _save(self, score: float) -> None:
        # For ASP only the sparse phase can give the best model.
        final_phase = self.phase_index == len(self.phases) - 1
        improved = final_phase and (self.best_score is None or score >= self.best_score)
        if improved:
            self.best_score = score
        if self.run_dir is None:
            return
        payload = self.state()
        checkpoint.save(self.run_dir / checkpoint.LATEST, payload)
        if improved:
            checkpoint.save(self.run_dir / checkpoint.BEST, payload)
        if self.handle:
            self.step_tracker.to_csv(self.run_dir / "sad.csv")
            self.epoch_tracker.to_csv(self.run_dir / "sad_epochs.csv")

    # -- the loop ---------------------------------------------------------------------------
    def total_epochs(self) -> int:
        return self.config.epochs * len(self.phases)

    def fit(self) -> dict[str, Any]:
        while self.epoch < self.total_epochs():
            if self.epoch // self.config.epochs > self.phase_index:
                self._next_phase()
            self._train_epoch()
        return self.finish()

    def _train_epoch(self) -> None:
        config, world = self.config, self.world
        started = time.perf_counter()
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        batches = self.steps_per_epoch()
        bar = Progress(batches, f"epoch {self.epoch + 1}/{self.total_epochs()}",
                       enabled=world.main)
        loss_sum = correct = seen = 0.0
        for index, (x, y) in enumerate(self.train_loader):
            if index >= batches:
                break
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            with autocast(config, world.device):
                logits = self.trained(x)
            loss, right = loss_and_correct(logits, y, config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.scaler.step(self.optimizer)  # SR-STE term + mask refresh happen in here
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the loss became {loss_value} at step {self.step}; "
                                         "lower --lr or use --amp bf16 instead of fp16")
            items = y.numel()
            loss_sum += loss_value * items
            correct += right.item()
            seen += items
            bar.update(index + 1, (index + 1) * len(x) * world.size, loss=loss_value,
                       acc=correct / seen)
            if self.step % config.log_every == 0:
                self._log_step(loss_value, right.item() / items)
        bar.close()
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], world)
        duration = time.perf_counter() - started
        self.elapsed += duration
        self.epoch += 1
        metrics = {"epoch": self.epoch, "phase": self.phases[self.phase_index].name,
                   "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                   **evaluate(self.model, self.test_loader, config, world, self.data.task,
                              config.limit_test_batches),
                   "lr": self.scheduler.get_last_lr()[0], "epoch_seconds": duration,
                   "samples_per_second": seen / duration}
        if self.handle:
            row = self.epoch_tracker.record(self.step, epoch=self.epoch)
            metrics.update({k: v for k, v in row.items() if k.startswith("sad")})
        self.log.write("epoch", self.step, **metrics)
        self.console(self._epoch_line(metrics))
        self._save(self._score(metrics))

    def _log_step(self, loss: float, accuracy: float) -> None:
        values = {"loss": loss, "acc": accuracy, "lr": self.scheduler.get_last_lr()[0]}
        if self.handle:
            row = self.step_tracker.record(self.step, epoch=self.epoch)
            values.update({k: v for k, v in row.items() if k.startswith("sad")})
        self.log.write("step", self.step, **values)

    def _score(self, metrics: dict[str, float]) -> float:
        if "test_bpb" in metrics:
            return -metrics["test_bpb"]
        return metrics["test_acc"]

    def _epoch_line(self, m: dict[str, Any]) -> str:
        line = (f"epoch {m['epoch']:3d}/{self.total_epochs()}  train loss {m['train_loss']:.4f} "
                f"acc {m['train_acc']:.4f}  test loss {m['test_loss']:.4f} "
                f"acc {m['test_acc']:.4f}")
        if "test_bpb" in m:
            line += f" bpb {m['test_bpb']:.3f}"
        if "sad_prev_total" in m:
            line += f"  SAD {m['sad_prev_total']} (vs initial {m['sad_init_frac']:.3f})"
        return line + f"  {m['samples_per_second']:,.0f} samples/s"

    # -- the end ----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        config, world = self.config, self.world
        final = evaluate(self.model, self.test_loader, config, world, self.data.task,
                         config.limit_test_batches)
        example = self.data.test[0][0].unsqueeze(0).to(world.device)
        table = summary(self.model, example)
        result = {
            "data": config.data, "model": config.model,
            "pattern": "dense" if config.dense else config.pattern,
            "method": "dense" if config.dense else config.method,
            **final, "best_score": self.best_score, "epochs": self.epoch, "steps": self.step,
            "wall_seconds": self.elapsed, "params_dense": table.total.params_dense,
            "params_kept": table.total.params_kept, "macs_dense": table.total.macs_dense,
            "macs_sparse": table.total.macs_sparse, "summary": table.to_dict(),
            "world_size": world.size, "device": str(world.device),
            "torch": torch.__version__,
        }
        self.summary_table = table
        self.log.write("final", self.step, **{k: v for k, v in final.items()})
        self.log.close()
        if self.run_dir is not None:
            with atomic_open(self.run_dir / "summary.json", "w", encoding="utf-8") as file:
                json.dump(result, file, indent=2)
            if config.plots:
                densities = {row.name: row.density for row in table.rows if row.macs_dense}
                history = self.step_tracker.to_dict() if self.handle else {}
                plots.plot_run(self.run_dir, metrics_log.read(self.run_dir /
                                                              metrics_log.METRICS),
                               history, densities, config.log_every)
        return result


def prepare_run_dir(config: TrainConfig, resume: bool) -> Path:
    """The run folder: must hold a run to resume, and must not hold one otherwise."""
    run_dir = Path(config.out)
    has_run = (run_dir / checkpoint.LATEST).is_file()
    if resume and not has_run:
        raise checkpoint.CheckpointError(f"--resume {str(run_dir)!r}: the folder holds no run "
                                         f"(no {checkpoint.LATEST})")
    if not resume and has_run:
        raise checkpoint.CheckpointError(f"{str(run_dir)!r} already holds a run; continue it "
                                         "with --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_config(config: TrainConfig, run_dir: Path) -> None:
    write_json(config, run_dir / "config.json")


def load_trained(path: str | Path, device: torch.device | str = "cpu", *,
                 data_dir: str | None = None):
    """Rebuild a trained model from a run folder or checkpoint: ``(config, data, model,
    payload)``, with the model sparsified as it was when the checkpoint was written."""
    payload = checkpoint.load(path)
    config = from_dict(payload["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    data, model = build(config)
    apply_sparsity(model, config, phases_of(config)[payload["phase"]].method)
    model.load_state_dict(payload["model"])
    return config, data, model.to(device), payload
