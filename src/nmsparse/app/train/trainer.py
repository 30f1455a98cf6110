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

from ... import drive, finalize, sparsify
from ...atomic import atomic_open
from ...methods import Method
from ...sad import SADTracker
from ...summary import summary
from ..data import DataBundle, DataError, load_dataset
from ..data.loader import make_loader
from ..models import create_model
from ..models.trust import require_trusted
from . import checkpoint, distributed, metrics_log, plots
from . import run_dir as run_folders
from .config import TrainConfig, from_dict, write_json
from .init import load_init
from .progress import Progress
from .schedule import warmup_cosine

LANGUAGE_MODEL = "language_model"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the message says where and what to change."""


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
            Phase("retrain" if index else method.name, method.phase_method(kind))
            for index, kind in enumerate(kinds)]


@dataclass(frozen=True)
class DataInfo:
    """What a model is built for, recorded in every checkpoint: enough to rebuild, summarise
    and export a run without its data set."""

    input_shape: tuple[int, ...]
    num_classes: int
    task: str
    input_dtype: str = "float32"

    @classmethod
    def of(cls, data: DataBundle) -> DataInfo:
        example = data.test[0][0]
        return cls(tuple(data.input_shape), data.num_classes, data.task,
                   str(example.dtype).removeprefix("torch."))

    @classmethod
    def from_payload(cls, info: dict[str, Any]) -> DataInfo:
        return cls(tuple(int(d) for d in info["input_shape"]), int(info["num_classes"]),
                   str(info["task"]), str(info.get("input_dtype", "float32")))

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "task": self.task, "input_dtype": self.input_dtype}

    def example(self) -> torch.Tensor:
        """One all-zero input (batch of 1): enough to count parameters and MACs."""
        dtype = getattr(torch, self.input_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"the run records an unknown input dtype {self.input_dtype!r}")
        return torch.zeros(1, *self.input_shape, dtype=dtype)


def load_data(config: TrainConfig, saved_run: bool = False) -> DataBundle:
    """The data of ``config``; for a ``saved_run`` a failure says how to point at data that
    moved since training."""
    try:
        return load_dataset(config.data, data_dir=config.data_dir,
                            text_file=config.text_file, seq_len=config.seq_len,
                            seed=config.seed)
    except DataError as error:
        if not saved_run or config.data == "digits":
            raise
        option = "--text-file" if config.data == "text" else "--data-dir"
        raise DataError(f"{error} (if the data moved since training, give {option} with "
                        "its new place)") from None


def build_model(config: TrainConfig, info: DataInfo, trusted_models=(),
                source: str | None = None) -> nn.Module:
    """The freshly initialised model of ``config`` for data ``info``. A ``module:factory``
    model named by a file (``source``) is imported only if trusted (see
    :mod:`nmsparse.app.models.trust`)."""
    if source is not None:
        require_trusted(config.model, trusted_models, source)
    torch.manual_seed(config.seed)
    return create_model(config.model, input_shape=info.input_shape,
                        num_classes=info.num_classes, task=info.task,
                        **config.model_options)


def build(config: TrainConfig, trusted_models=(), source: str | None = None,
          saved_run: bool = False) -> tuple[DataBundle, nn.Module]:
    """The data and the freshly initialised model a configuration describes (``saved_run``:
    the configuration comes from a run being resumed)."""
    if source is not None:  # refuse an untrusted factory before touching the data
        require_trusted(config.model, trusted_models, source)
    data = load_data(config, saved_run)
    return data, build_model(config, DataInfo.of(data), trusted_models, source)


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


def auxiliary_loss(model: nn.Module) -> torch.Tensor | float:
    """A model's own training term (SPViT's token-ratio loss, a frequency gate's loss), added
    to the task loss: ``model.auxiliary_loss()`` after the forward pass, when it has one."""
    extra = getattr(model, "auxiliary_loss", None)
    return extra() if callable(extra) else 0.0


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

    def __init__(self, config: TrainConfig, world: distributed.World, *, console=None,
                 trusted_models=(), source: str | None = None, resuming: bool = False) -> None:
        """``source``: the file ``config`` was read from (a checkpoint, a recipe), if its
        model name came from one; ``trusted_models``: factories the user trusts."""
        self.config, self.world = config, world
        self.run_dir: Path | None = None
        self.console = console or (lambda message: None)
        self.data, self.model = build(config, trusted_models, source, resuming)
        self.data_info = DataInfo.of(self.data)
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
        self.model_handle = self._drive_model_methods()
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

    def _drive_model_methods(self):
        """The configuration's model-level methods (e.g. CHEX), on a handle of their own
        that runs them at every optimizer step and holds their state; traced on one
        training batch."""
        example = next(iter(self.train_loader))[0][:2].to(self.world.device)
        methods = self.config.make_model_methods(
            self.model, example, self.config.epochs * self.steps_per_epoch())
        if not methods:
            return None
        handle = drive(self.model, methods[0])
        for method in methods[1:]:
            handle.add(method)
        return handle

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
        if self.handle is not None:  # sparse after sparse: the new masks start from these
            finalize(self.model)
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
            "model_methods": (self.model_handle.state_dict() if self.model_handle is not None
                              else None),
        }

    def restore(self, payload: dict[str, Any], source: str = "the checkpoint") -> None:
        """Continue from ``payload``; a checkpoint that does not fit this run (other weight
        shapes, a damaged training state) is a one-line CheckpointError naming ``source``."""
        try:
            self._restore(payload, source)
        except checkpoint.CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            raise checkpoint.CheckpointError(
                f"{source}: the saved training state does not fit the run its configuration "
                f"builds: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
            ) from None

    def _restore(self, payload: dict[str, Any], source: str) -> None:
        while self.phase_index < payload["phase"]:
            self._next_phase()
        checkpoint.load_weights(self.model, payload["model"], source)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        if self.handle and payload["trackers"]:
            self.step_tracker.load_state_dict(payload["trackers"][0])
            self.epoch_tracker.load_state_dict(payload["trackers"][1])
        if self.handle and payload.get("sparsity"):
            self.handle.load_state_dict(payload["sparsity"])
        if self.model_handle is not None and payload.get("model_methods"):
            self.model_handle.load_state_dict(payload["model_methods"])
        elif self.model_handle is not None and payload.get("chex"):  # saved before 0.2
            self.model_handle.steps = int(payload["chex"]["step"])
            self.model_handle.model_methods[0].load_state_dict(payload["chex"])
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
        payload = {**self.state(), "data_info": self.data_info.to_dict()}
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
            loss = loss + auxiliary_loss(self.model)
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
                raise TrainingDiverged(self._divergence(loss_value))
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

    def _divergence(self, loss: float) -> str:
        phase = self.phases[self.phase_index].name
        advice = "lower --lr or set --grad-clip"
        if self.config.amp == "fp16":
            advice += ", or use --amp bf16 instead of fp16"
        saved = (f"; the last checkpoint (epoch {self.epoch}) is in {self.run_dir}"
                 if self.run_dir is not None and self.epoch else "")
        return (f"training diverged: the loss became {loss} at step {self.step} (epoch "
                f"{self.epoch + 1}, {phase} phase); {advice}{saved}")

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
        for method in self.model_handle.model_methods if self.model_handle is not None else ():
            report = method.report(example)  # e.g. CHEX: the exported slim model's size
            if report is not None:
                result[method.name] = report
                self.console(f"{method.name}: " + ", ".join(
                    f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
                    for key, value in report.items() if key != "summary"))
        self.summary_table = table
        self.log.write("final", self.step, **{k: v for k, v in final.items()})
        self.log.close()
        if self.run_dir is not None:
            with atomic_open(self.run_dir / "summary.json", "w", encoding="utf-8") as file:
                json.dump(result, file, indent=2)
            if config.plots:
                self._plot(table)
        return result

    def _plot(self, table) -> None:
        """Plots are a bonus: a missing matplotlib or a drawing failure is a one-line note,
        never an error after the training has succeeded."""
        densities = {row.name: row.density for row in table.rows if row.macs_dense}
        history = self.step_tracker.to_dict() if self.handle else {}
        try:
            plots.plot_run(self.run_dir, metrics_log.read(self.run_dir / metrics_log.METRICS),
                           history, densities, self.config.log_every)
        except plots.PlotsUnavailable as error:
            self.console(f"note: no plots: {error}")
        except Exception as error:  # noqa: BLE001  (a drawing failure must not lose the run)
            self.console(f"note: no plots: drawing failed: {type(error).__name__}: "
                         f"{' '.join(str(error).split())}")


def prepare_run_dir(config: TrainConfig, resume: bool) -> run_folders.ClaimedFolder:
    """Claim the run folder for this process (:func:`nmsparse.app.train.run_dir.claim`: it must
    hold a run to resume, and must not hold one otherwise). Release it when the run ends."""
    claimed = run_folders.claim(config.out, "run", resume=resume)
    if not resume:  # an earlier attempt that never reached a checkpoint: start clean
        try:
            (claimed.path / metrics_log.METRICS).unlink(missing_ok=True)
        except BaseException:
            claimed.release()
            raise
    return claimed


def save_config(config: TrainConfig, run_dir: Path) -> None:
    write_json(config, run_dir / "config.json")


def load_trained(path: str | Path, device: torch.device | str = "cpu", *,
                 data_dir: str | None = None, text_file: str | None = None,
                 trusted_models=(), with_data: bool = True):
    """Rebuild a trained model from a run folder or checkpoint: ``(config, data, model,
    payload)``, with the model sparsified as it was when the checkpoint was written.

    ``data`` is the :class:`DataBundle` (its files read from ``data_dir`` / ``text_file`` when
    given: the data may have moved since training), or with ``with_data=False`` only the
    run's :class:`DataInfo` (input shape, classes, task), which needs no data at all for a
    checkpoint that records it. A ``module:factory`` model is imported only if listed in
    ``trusted_models`` or configured as trusted (:mod:`nmsparse.app.models.trust`): never because
    the checkpoint names it.
    """
    payload = checkpoint.load(path)
    source = f"the run {str(path)!r}"
    config = from_dict(payload["config"], source=source)
    if data_dir is not None:
        config.data_dir = data_dir
    if text_file is not None:
        config.text_file = text_file
    require_trusted(config.model, trusted_models, source)
    phases = phases_of(config)
    if not isinstance(payload["phase"], int) or not 0 <= payload["phase"] < len(phases):
        raise checkpoint.CheckpointError(f"{source}: phase {payload['phase']!r} does not fit "
                                         f"its configuration")
    if with_data or not checkpoint.describes_data(payload):
        data = load_data(config, saved_run=True)
        info = DataInfo.of(data)
    else:
        info = DataInfo.from_payload(payload["data_info"])
        data = info
    model = build_model(config, info, trusted_models, source)
    apply_sparsity(model, config, phases[payload["phase"]].method)
    checkpoint.load_weights(model, payload["model"], source)
    return config, data, model.to(device), payload
