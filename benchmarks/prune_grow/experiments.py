"""The runs of the small-scale reproductions, and how one is trained.

Every run trains nmsparse's MLP (784-256-256-10, all three Linear layers sparse) on a fixed
subset of Fashion-MNIST (``TRAIN_SUBSET`` training images, the full 10k test set), SGD with
momentum 0.9 at a constant learning rate, batch 128, one thread. The subset and the few epochs
are what keep the whole set inside ~30 CPU-minutes on a small machine; absolute accuracies are
therefore below full-data numbers, and only the comparisons inside one table mean anything.

Experiments (``EXPERIMENTS``): each run is ``(experiment, arm, seed)``.

* ``dst``: 90 % unstructured (``unstructured:0.1`` per layer): RigL, MEST, SET and a static
  random mask (``fixed`` from a random mask), all for the same number of steps, plus dense;
* ``gap``: GaP (3 partitions = the 3 layers, one cycle, then a fixed phase of the same length)
  against dense training + one-shot magnitude pruning + fixed-mask fine-tuning (half the steps
  each), at ``unstructured:0.1`` and ``1:8`` (90 % and 87.5 %);
* ``nested``: levels 1:8 < 2:8 < 4:8 trained progressively or jointly, each level evaluated,
  against each level trained alone with STE (the estimator nested training uses) for the same
  total steps;
* ``lth``: the lottery-ticket arms (:mod:`nmsparse.app.lottery`) at ``unstructured:0.1`` and
  ``1:8`` with a small (0.005) and a standard (0.1) learning rate, 3 IMP rounds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

import nmsparse
from nmsparse.app.data.idx import read_idx
from nmsparse.app.lottery import TicketSetting, run_setting
from nmsparse.app.lottery.harness import accuracy, random_masks, train
from nmsparse.app.models.mlp import mlp
from nmsparse.levels import set_level
from nmsparse.machine import cpu_model

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN_SUBSET = 20000
EPOCHS = 10  # dst, gap, nested
LTH_EPOCHS = 4  # per training of each lottery arm
LR = 0.05
SEEDS = (0, 1, 2)
BATCH = 128


def load_data() -> dict[str, torch.Tensor]:
    def images(name):
        x = torch.from_numpy(read_idx(DATA_DIR / f"{name}-images-idx3-ubyte.gz").copy())
        return ((x.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)

    def labels(name):
        return torch.from_numpy(read_idx(DATA_DIR / f"{name}-labels-idx1-ubyte.gz").copy()).long()

    x, y = images("train"), labels("train")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))[:TRAIN_SUBSET]
    return {"x_train": x[pick], "y_train": y[pick], "x_test": images("t10k"),
            "y_test": labels("t10k")}


def make_model() -> nn.Module:
    return mlp(input_shape=(1, 28, 28), num_classes=10)


def batches_for(data, seed: int) -> list:
    order = torch.randperm(len(data["x_train"]), generator=torch.Generator().manual_seed(seed))
    return [(data["x_train"][i], data["y_train"][i]) for i in order.split(BATCH)]


def steps_per_run(data) -> int:
    return EPOCHS * -(-len(data["x_train"]) // BATCH)


def _setting(lr: float = LR, epochs: int = EPOCHS) -> TicketSetting:
    return TicketSetting("unstructured:0.5", lr=lr, epochs=epochs, batch_size=BATCH)


def _sparse_run(data, seed, pattern, method, masks=None, epochs=EPOCHS, model=None):
    torch.manual_seed(seed)
    model = model or make_model()
    handle = nmsparse.sparsify(model, pattern, method, masks=masks)
    train(model, batches_for(data, seed), _setting(epochs=epochs))
    return model, handle


def run_dst(data, arm: str, seed: int) -> dict:
    total = steps_per_run(data)
    options = {"every": 50, "fraction": 0.3, "stop": int(0.75 * total)}
    pattern = "unstructured:0.1"
    if arm == "dense":
        torch.manual_seed(seed)
        model = make_model()
        train(model, batches_for(data, seed), _setting())
        return {"accuracy": accuracy(model, data["x_test"], data["y_test"])}
    if arm == "static":
        torch.manual_seed(seed)
        model = make_model()
        masks = random_masks(model, nmsparse.parse_pattern(pattern), seed + 777)
        model, _ = _sparse_run(data, seed, pattern, "fixed", masks=masks, model=model)
    else:
        method = nmsparse.make_method(arm, **options)
        model, handle = _sparse_run(data, seed, pattern, method)
        # the resolved options (defaults included), so the page says which rule ran
        return {"accuracy": accuracy(model, data["x_test"], data["y_test"]),
                "kept": _kept(model), "method_options": method.options(),
                "load_average": os.getloadavg()[0], "machine": cpu_model()}
    return {"accuracy": accuracy(model, data["x_test"], data["y_test"]),
            "kept": _kept(model)}


def _kept(model) -> float:
    handles = nmsparse.handles_of(model)
    masks = [w.mask for h in handles for w in h]
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def run_gap(data, arm: str, seed: int) -> dict:
    pattern = {"unstructured": "unstructured:0.1", "1of8": "1:8"}[arm.split("-")[1]]
    total = steps_per_run(data)
    if arm.startswith("gap"):
        method = nmsparse.make_method("gap", parts=3, phase_steps=total // 4, cycles=1)
        model, handle = _sparse_run(data, seed, pattern, method)
        assert all(nmsparse.parse_pattern(pattern).violations(w.mask).ok for w in handle)
    else:  # dense for half the steps, one-shot magnitude, fixed-mask fine-tuning
        torch.manual_seed(seed)
        model = make_model()
        train(model, batches_for(data, seed), _setting(epochs=EPOCHS // 2))
        nmsparse.sparsify(model, pattern, "fixed")
        train(model, batches_for(data, seed + 100), _setting(epochs=EPOCHS - EPOCHS // 2))
    return {"accuracy": accuracy(model, data["x_test"], data["y_test"]), "kept": _kept(model)}


NESTED_LEVELS = ("1:8", "2:8", "4:8")


def run_nested(data, arm: str, seed: int) -> dict:
    total = steps_per_run(data)
    if arm.startswith("alone"):
        level = arm.split("-")[1].replace("of", ":")
        model, _ = _sparse_run(data, seed, level, "ste")
        return {"accuracy": {level: accuracy(model, data["x_test"], data["y_test"])}}
    method = nmsparse.make_method("nested", levels=",".join(NESTED_LEVELS), training=arm,
                                  level_steps=-(-total // len(NESTED_LEVELS)))
    model, handle = _sparse_run(data, seed, NESTED_LEVELS[-1], method)
    from nmsparse.levels import check_nesting

    assert check_nesting(handle).ok
    result = {}
    for level in NESTED_LEVELS:
        set_level(model, level)
        result[level] = accuracy(model, data["x_test"], data["y_test"])
    return {"accuracy": result}


LTH_SETTINGS = {"unstructured-lr0.005": ("unstructured:0.1", 0.005),
                "unstructured-lr0.1": ("unstructured:0.1", 0.1),
                "1of8-lr0.005": ("1:8", 0.005), "1of8-lr0.1": ("1:8", 0.1)}


def run_lth(data, arm: str, seed: int) -> dict:
    pattern, lr = LTH_SETTINGS[arm]
    setting = TicketSetting(pattern, lr=lr, epochs=LTH_EPOCHS, rounds=3, batch_size=BATCH)
    return {"accuracy": run_setting(make_model, data, setting, seed)}


EXPERIMENTS = {
    "dst": (run_dst, ("dense", "static", "set", "rigl", "mest")),
    "gap": (run_gap, ("gap-unstructured", "oneshot-unstructured", "gap-1of8", "oneshot-1of8")),
    "nested": (run_nested, ("progressive", "joint", "alone-1of8", "alone-2of8", "alone-4of8")),
    "lth": (run_lth, tuple(LTH_SETTINGS)),
}


def timed(fn, *args) -> dict:
    start = time.process_time()
    result = fn(*args)
    result["cpu_seconds"] = round(time.process_time() - start, 1)
    return result
