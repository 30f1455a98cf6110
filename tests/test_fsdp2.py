"""FSDP2 (``fully_shard``, gloo, 2 processes on the CPU): sparsify before or after sharding
trains exactly like a single process on the same global batch (masks equal, dense weights
equal up to the order of the gradient reduction), the SR-STE term lands once per step on
the reduced gradient, ``check`` and ``finalize`` work on the sharded model, and a sharding
that splits the N:M groups is refused."""


import pytest
import torch
from process_group import spawn
from torch import nn

import nmsparse

STEPS, DECAY, LR, GLOBAL_BATCH = 3, 0.05, 0.2, 8
# Exactness: each rank's loss is the mean over its half of the batch and FSDP averages the
# two halves' gradients, so the update is the single-process one up to float rounding of
# the reduction (a sum of two partial sums instead of one sum over the batch).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 5 outputs over 2 ranks: uneven shards (3 and 2 rows)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 5))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=gen),
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)) for _ in range(STEPS)]


def train(model, rank=0, world=1, momentum=0.9):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    for x, y in batches():
        half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[half]), y[half]).backward()
        opt.step()
    return opt


def full_state(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in model.state_dict().items()}


def sharded(model, mesh, per_layer=False):
    from torch.distributed.fsdp import fully_shard

    if per_layer:  # the sparse Linear modules become FSDP modules themselves
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def srste_step_is_exact(mesh, rank, world):
    """One plain-SGD step: W1 = W0 - lr * (G + decay * (1 - M0) * W0), G the reduced gradient."""
    model = sharded(make_model(), mesh)
    handle = nmsparse.sparsify(model, "2:4", decay=0.5)  # large: a missing or doubled term shows
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = batches()[0]
    half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    nn.functional.cross_entropy(model(x[half]), y[half]).backward()
    before = {w.name: (w.dense.to_local().clone(), w.mask.to_local().clone(),
                       w.dense.grad.to_local().clone()) for w in handle}
    opt.step()
    for w in handle:
        w0, m0, grad = before[w.name]
        expected = w0 - LR * (grad + 0.5 * (~m0) * w0)
        torch.testing.assert_close(w.dense.to_local(), expected, rtol=1e-6, atol=1e-7)


def refuses_grouped_dim_sharding(mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = make_model()
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda param: Shard(param.dim() - 1))
    with pytest.raises(ValueError, match="sharded along dim 1, which splits the groups"):
        nmsparse.sparsify(model, "2:4")
    # nothing was changed: no mask buffer, no generated class
    assert all(not hasattr(layer, "weight_mask") and not hasattr(type(layer), "_nmsparse_base")
               for layer in model)


def refuses_dtensor_forward_without_fsdp(mesh):
    """A DTensor weight FSDP does not gather would reach forward dense: an error instead."""
    from torch.distributed.tensor import Shard, distribute_tensor

    layer = nn.Linear(8, 4)
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
    nmsparse.sparsify(layer, "2:4")
    with pytest.raises(RuntimeError, match="reached forward as a DTensor"):
        layer(torch.randn(2, 8))


def worker(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    mesh = init_device_mesh("cpu", (world,))
    results = {}

    # sparsify, then shard every Linear and the root
    before = make_model()
    handle = nmsparse.sparsify(before, "2:4", decay=DECAY)
    sharded(before, mesh, per_layer=True)
    train(before, rank, world)
    assert nmsparse.check(before, "2:4").ok
    results["before"] = full_state(before)
    assert all(isinstance(w.mask, type(w.dense)) for w in handle)  # mask sharded like W

    # shard the root, then sparsify
    after = sharded(make_model(), mesh)
    nmsparse.sparsify(after, "2:4", decay=DECAY)
    train(after, rank, world)
    results["after"] = full_state(after)
    report = nmsparse.check(after, "2:4")
    assert report.ok and [row.status for row in report.rows] == ["ok"] * 3
    assert nmsparse.check(after.state_dict(), "2:4").ok

    # a fixed mask: pruned weights stay 0, the gathered mask drives the forward and backward
    fixed = make_model()
    nmsparse.sparsify(fixed, "2:4", method="fixed")
    train(sharded(fixed, mesh), rank, world)
    results["fixed"] = full_state(fixed)

    # check reads the sharded values: a dense sharded model violates 2:4
    assert not nmsparse.check(sharded(make_model(), mesh), "2:4").ok

    srste_step_is_exact(mesh, rank, world)
    refuses_grouped_dim_sharding(mesh)
    refuses_dtensor_forward_without_fsdp(mesh)

    # finalize on the sharded model: FSDP's classes stay, outputs do not change
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = before(x)
        nmsparse.finalize(before)
        assert torch.equal(before(x), expected)
    assert isinstance(before[0], FSDPModule) and isinstance(before[0], nn.Linear)
    assert not hasattr(type(before[0]), "_nmsparse_base")
    assert nmsparse.check(before, "2:4").ok and not hasattr(before[0], "weight_mask")

    if rank == 0:
        torch.save(results, f"{out_dir}/results.pt")


def single_process(method="srste") -> dict:
    model = make_model()
    nmsparse.sparsify(model, "2:4", method=method,
                      **({"decay": DECAY} if method == "srste" else {}))
    train(model)
    return model.state_dict()


def test_fsdp2_matches_single_process(tmp_path):
    world = 2
    spawn(worker, tmp_path, world)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    references = {"before": single_process(), "fixed": single_process("fixed")}
    references["after"] = references["before"]
    for run, state in results.items():
        reference = references[run]
        assert set(state) == set(reference), run
        for key, value in reference.items():
            if value.dtype == torch.bool:
                assert torch.equal(state[key], value), (run, key)
            else:
                torch.testing.assert_close(state[key], value, **TOLERANCE, msg=f"{run} {key}")
    pruned = ~references["fixed"]["0.weight_mask"]
    assert torch.all(results["fixed"]["0.weight"][pruned] == 0)
