"""Data-parallel runs through PyTorch's own machinery: ``torchrun`` sets the environment,
``torch.distributed`` (gloo on CPU, nccl on GPUs) and ``DistributedDataParallel`` do the rest.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Only the main process writes logs, checkpoints and plots."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}; accepted: auto, cpu, cuda, "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    return device


def setup(device_name: str) -> World:
    """Join the process group when launched by torchrun; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if size == 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, device=device)


def teardown(world: World) -> None:
    """Leave the process group. Call it once the run's models are dropped: DDP keeps the group
    in reference cycles, and a group freed only in the interpreter's teardown can take gloo's
    threads down with it ("terminate called without an active exception")."""
    if world.distributed and dist.is_initialized():
        gc.collect()  # no barrier: after a failure on one rank it would hang the others
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()
