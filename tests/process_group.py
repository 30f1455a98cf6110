"""Run a test's body in ``world`` gloo processes on the CPU.

Each worker frees what its body built (DDP's reducer and FSDP's mesh hold the process group,
often inside reference cycles) and destroys the process group while the interpreter is still
whole, through the teardown ``nmsparse train`` uses under torchrun. Left to the
interpreter's teardown, gloo's threads can outlive what they use and abort the process
("terminate called without an active exception") after a run that passed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nmsparse.app.train.distributed import World, teardown


def _entry(rank: int, body, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    body(rank, world, out_dir)
    # the body's frame is gone: the run's own teardown collects its cycles, then leaves
    teardown(World(rank=rank, size=world))


def spawn(body, tmp_path, world: int = 2) -> None:
    """``body(rank, world, out_dir)`` in ``world`` processes; raises if any of them fails."""
    mp.spawn(_entry, args=(body, world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
             join=True)
