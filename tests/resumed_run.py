"""A trainer run done straight and the same run interrupted after its first epoch and resumed
from its checkpoint: the two final checkpoints, for tests that resuming changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import torch

from nmsparse.app.train import checkpoint, distributed
from nmsparse.app.train.config import TrainConfig
from nmsparse.app.train.trainer import Run


def straight_and_resumed(config: Callable[[str], TrainConfig], tmp_path) -> tuple[dict, dict]:
    """``config(out)`` builds the run's validated config; returns (straight, resumed)."""
    world = distributed.World(rank=0, size=1, device=torch.device("cpu"))
    folders = tmp_path / "straight", tmp_path / "resumed"
    for folder in folders:
        folder.mkdir()
    straight = Run(config(str(folders[0])), world)
    straight.use_run_dir(folders[0])
    straight.fit()
    interrupted = Run(config(str(folders[1])), world)
    interrupted.use_run_dir(folders[1])
    interrupted._train_epoch()  # writes the checkpoint of epoch 1, then the process "dies"
    del interrupted
    resumed = Run(config(str(folders[1])), world)
    resumed.use_run_dir(folders[1])
    resumed.restore(checkpoint.load(folders[1]))
    resumed.fit()
    return checkpoint.load(folders[0]), checkpoint.load(folders[1])
