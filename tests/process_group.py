"""Run a test's body in ``world`` gloo processes on the CPU.

Each worker frees what its body built (DDP's reducer and FSDP's mesh hold the process group,
often inside reference cycles) and destroys the process group while the interpreter is still
whole. Left to the interpreter's teardown, gloo's threads can outlive what they use and abort
the process ("terminate called without an active exception") after a run that passed.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, body, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    body(rank, world, out_dir)
    gc.collect()  # the body's frame is gone; its cycles go now, with the group's last users
    dist.barrier()
    dist.destroy_process_group()


def spawn(body, tmp_path, world: int = 2) -> None:
    """``body(rank, world, out_dir)`` in ``world`` processes; raises if any of them fails."""
    mp.spawn(_entry, args=(body, world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
             join=True)
