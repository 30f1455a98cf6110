"""DDP (gloo, 2 processes on the CPU): identical masks on every rank, and the update equals a
single-process run on the same global batch (so the SR-STE term is not scaled by world size)."""

import torch
from process_group import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import nmsparse

STEPS, DECAY, GLOBAL_BATCH = 4, 0.05, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 4, 8, generator=gen),
             torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)) for _ in range(STEPS)]


def train(model, data, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in data:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()


def worker(rank, world, out_dir):
    model = make_model()
    if rank == 1:  # a different start on rank 1: DDP's broadcast must win, masks must follow
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    ddp = DistributedDataParallel(model)
    train(ddp, batches(), rank, world)
    torch.save({"state": model.state_dict(), "masks": handle.masks()},
               f"{out_dir}/rank{rank}.pt")


def test_ddp_matches_single_process(tmp_path):
    world = 2
    spawn(worker, tmp_path, world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name

    single = make_model()
    handle = nmsparse.sparsify(single, "2:4", decay=DECAY)
    train(single, batches())
    for key, value in single.state_dict().items():
        for rank in ranks:
            if value.dtype == torch.bool:
                assert torch.equal(rank["state"][key], value), key
            else:
                torch.testing.assert_close(rank["state"][key], value, rtol=1e-5, atol=1e-6)
    assert set(handle.masks()) == set(ranks[0]["masks"])
