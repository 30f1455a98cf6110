"""make_loader: deterministic in (seed, epoch), resumable mid-epoch, worker-count independent,
sharded like DistributedSampler, with the get_batch fast path and the per-sample fallback."""

import pytest
import torch
from torch.utils.data import Dataset, Subset

from nmsparse.app.data import BatchLoader, DataError, make_loader
from nmsparse.app.data.tensors import ImageDataset
from nmsparse.app.data.transforms import CropFlip, Normalize


def images(n=37, augment=True) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.arange(n) % 5,
        Normalize((0.5,), (0.25,)),
        CropFlip(padding=2) if augment else None,
    )


class PerSample(Dataset):
    """No get_batch: random per-sample 'augmentation' with torch's global RNG."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.rand(3) + i, i


class BatchNoGenerator(Dataset):
    """A get_batch that does not take a generator: randomness from the global RNG."""

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 20

    def __getitem__(self, i):
        raise AssertionError("the fast path should be used")

    def get_batch(self, indices):
        self.calls += 1
        return torch.rand(len(indices)) + indices, indices


def collect(batches):
    return [tuple(t.clone() for t in b) for b in batches]


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def test_epoch_covers_every_sample_once_in_a_seeded_order():
    loader = make_loader(images(), 8, shuffle=True, seed=3)
    assert isinstance(loader, BatchLoader) and len(loader) == 5  # 37 = 4 x 8 + 5
    orders = [loader.order(e) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(37))
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(make_loader(images(), 8, shuffle=True, seed=3).order(1), orders[1])
    assert not torch.equal(make_loader(images(), 8, shuffle=True, seed=4).order(1), orders[1])
    assert make_loader(images(), 8, shuffle=False, seed=3).order(2).tolist() == list(range(37))
    sizes = [len(y) for _, y in loader]
    assert sizes == [8, 8, 8, 8, 5]
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(labels, torch.arange(37)[orders[0]] % 5)


def test_same_seed_and_epoch_same_batches_whatever_the_global_rng():
    torch.manual_seed(1)
    a = make_loader(images(), 8, shuffle=True, seed=0)
    a.set_epoch(2)
    first = collect(a)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    b = make_loader(images(), 8, shuffle=True, seed=0)
    b.set_epoch(2)
    assert same(first, collect(b))
    assert torch.equal(torch.get_rng_state(), state)  # the loader neither reads nor moves it
    b.set_epoch(3)
    assert not same(first, collect(b))
    x, _ = first[0]
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32


def test_resume_mid_epoch_replays_the_exact_batches():
    full = collect(make_loader(images(), 6, shuffle=True, seed=7).iter_from(4))
    torch.manual_seed(12345)  # a restarted process: other global RNG state
    fresh = make_loader(images(), 6, shuffle=True, seed=7)
    assert same(collect(fresh.iter_from(4, 3)), full[3:])
    assert same([fresh.get(4, 5)], [full[5]])
    assert collect(fresh.iter_from(4, len(fresh))) == []
    assert torch.equal(fresh.batch_indices(4, 1), fresh.order(4)[6:12])


def test_num_workers_changes_nothing_but_speed():
    serial = collect(make_loader(images(), 8, shuffle=True, seed=1, num_workers=0).iter_from(1, 1))
    parallel = make_loader(images(), 8, shuffle=True, seed=1, num_workers=2)
    assert same(serial, collect(parallel.iter_from(1, 1)))


def test_distributed_shards_each_global_batch():
    n, batch, world = 103, 4, 3
    loaders = [make_loader(images(n), batch, shuffle=True, seed=5, distributed=(r, world))
               for r in range(world)]
    assert {len(ld) for ld in loaders} == {9} and {ld.num_samples for ld in loaders} == {35}
    reference = make_loader(images(n), batch * world, shuffle=True, seed=5).order(2)
    seen = []
    for b in range(9):
        shards = [ld.batch_indices(2, b) for ld in loaders]
        union = torch.cat(shards)
        seen += union.tolist()
        if b < 8:  # full global batches: disjoint shards of the unsharded global batch
            assert len(set(union.tolist())) == batch * world
            assert sorted(union.tolist()) == sorted(reference[b * 12 : (b + 1) * 12].tolist())
    assert set(seen) == set(range(n)) and len(seen) == 105  # 2 wrapped-around repeats
    x, _ = loaders[1].get(2, 0)
    assert x.shape == (4, 1, 8, 8)
    dropped = make_loader(images(n), batch, shuffle=True, seed=5, drop_last=True,
                          distributed=(2, world))
    assert dropped.num_samples == 34 and len(dropped) == 8
    assert all(len(y) == batch for _, y in dropped)


def test_per_sample_fallback_is_deterministic():
    loader = make_loader(PerSample(), 5, shuffle=True, seed=0)
    torch.manual_seed(0)
    a = collect(loader)
    torch.manual_seed(1)
    b = collect(make_loader(PerSample(), 5, shuffle=True, seed=0))
    assert same(a, b)
    x, y = a[0]
    assert x.shape == (5, 3) and y.dtype == torch.int64
    assert torch.equal(x.floor().long()[:, 0], y)


def test_get_batch_without_generator_parameter_is_seeded_per_batch():
    ds = BatchNoGenerator()
    a = collect(make_loader(ds, 6, shuffle=True, seed=0))
    assert ds.calls == 4
    torch.manual_seed(42)
    assert same(a, collect(make_loader(BatchNoGenerator(), 6, shuffle=True, seed=0)))


def test_subset_uses_the_fast_path_with_mapped_indices():
    base = images(augment=False)
    picked = [30, 2, 17, 4, 9, 11, 25]
    loader = make_loader(Subset(Subset(base, list(range(36, -1, -1))), [36 - p for p in picked]),
                         3, shuffle=False, seed=0)
    x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    assert torch.equal(y, base.labels[picked])
    assert torch.equal(x, torch.stack([base[p][0] for p in picked]))


def test_text_bundle_through_the_loader(tmp_path):
    from nmsparse.app.data import load_dataset

    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(32, 127)) * 50)
    data = load_dataset("text", text_file=path, seq_len=32)
    x, y = next(iter(make_loader(data.train, 4, shuffle=True, seed=0)))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"distributed": (3, 3)}, r"rank must be in 0..2 for world size 3, got 3"),
        ({"distributed": (0, 0)}, "world size must be an integer >= 1"),
        ({"distributed": 2}, r"distributed must be \(rank, world_size\) or None"),
        ({"batch_size": 64, "drop_last": True}, "drop_last with batch_size 64 leaves no batch"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"batch_size": 4, "shuffle": True, "seed": 0} | kwargs
    with pytest.raises(DataError, match=message):
        make_loader(images(), **args)


def test_bad_positions():
    loader = make_loader(images(), 8, shuffle=True, seed=0)
    with pytest.raises(DataError, match=r"batch index must be in 0..5 \(5 batches\), got 6"):
        loader.iter_from(0, 6)
    with pytest.raises(DataError, match=r"batch index must be in 0..4 \(5 batches\), got 5"):
        loader.get(0, 5)
    with pytest.raises(DataError, match="epoch must be an integer >= 0, got -1"):
        loader.set_epoch(-1)
    with pytest.raises(DataError, match="the dataset is empty"):
        make_loader(Subset(images(), []), 4, shuffle=False, seed=0)
