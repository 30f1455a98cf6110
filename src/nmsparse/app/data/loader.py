"""A deterministic, resumable batch loader.

``make_loader(dataset, batch_size, shuffle=..., seed=...)`` returns a :class:`BatchLoader`, an
iterable of ``(x, y)`` batches whose content is a pure function of (seed, epoch, batch index,
rank): the sample order of an epoch comes from a generator seeded with (seed, epoch), and each
batch's augmentation from a generator seeded with (seed, epoch, batch, rank), never from the
global RNG state left behind by whatever ran before. So:

* ``loader.set_epoch(e)`` then ``for x, y in loader`` gives epoch ``e``'s batches (call
  ``set_epoch`` every epoch, as with ``DistributedSampler``; the loader never advances by
  itself);
* ``loader.iter_from(e, b)`` gives the same batches from batch ``b`` on: a trainer killed
  after ``b`` optimizer steps of epoch ``e`` continues with exactly the batch it would have
  seen, same samples and same augmentation;
* ``num_workers`` changes only speed, never content. Worker processes pay off only for
  datasets that are slow per batch (decoding, Python per-sample transforms); the built-in
  ones build a batch in well under a millisecond (Fashion-MNIST, 128 augmented images: 0.4 ms
  on one thread, 2300 batches/s), faster than a worker can ship it back, so keep 0 for them.

Fast path: when the dataset (or the dataset under a ``torch.utils.data.Subset``) has
``get_batch(indices, generator=None)``, as every nmsparse dataset does, a batch is one call
with the batch's own generator. Otherwise samples are fetched one by one with
``dataset[i]``, stacked with torch's ``default_collate``, under torch's global RNG forked and
seeded for that batch (and restored after), so per-sample augmentation that uses
``torch.rand...`` is deterministic too (Python's ``random`` and numpy's global RNG are not
seeded).

Distributed (``distributed=(rank, world)``): ``batch_size`` is per rank, as with
``DistributedSampler`` + ``DataLoader``, so a global batch holds ``batch_size * world``
samples. Every rank draws the same epoch order; rank ``r`` takes positions ``r, r + world, ...``
of it (``DistributedSampler``'s striding), so batch ``b`` on every rank is a disjoint shard of
global batch ``b`` = order[b * batch_size * world : (b + 1) * batch_size * world]. To give all
ranks the same number of samples, the order is padded by wrapping around to a multiple of
``world`` (a few samples repeat: evaluate on one rank if exact counts matter), or, with
``drop_last``, truncated to one. ``drop_last`` also drops the final incomplete batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ._base import DataError

Batch = tuple[Any, ...]
_ORDER, _AUGMENT = 0, 1  # independent seed streams


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixing ``seed`` and ``keys`` (numpy's SeedSequence hash: nearby inputs
    give unrelated streams, unlike ``seed + epoch``, where seed 0 epoch 1 = seed 1 epoch 0)."""
    state = np.random.SeedSequence([seed % 2**64, *keys]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def _positive_int(value: object, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _resolve(dataset: Dataset) -> tuple[Any, torch.Tensor | None]:
    """The dataset under any ``Subset`` wrappers and the composed index map (or None)."""
    index_map: torch.Tensor | None = None
    base: Any = dataset
    while isinstance(base, Subset):
        here = torch.as_tensor(base.indices, dtype=torch.long)
        index_map = here if index_map is None else here[index_map]
        base = base.dataset
    return base, index_map


def _accepts_generator(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


class _Fetcher:
    """Builds batch ``(epoch, b)`` from its indices: picklable, so DataLoader workers can run
    it, and stateless between calls, so any process builds the same batch."""

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.seed, self.rank = seed, rank
        base, self.index_map = _resolve(dataset)
        get_batch = getattr(base, "get_batch", None)
        self.base = base if callable(get_batch) else None
        self.with_generator = self.base is not None and _accepts_generator(get_batch)

    def __call__(self, epoch: int, batch: int, indices: torch.Tensor) -> Batch:
        seed = derive_seed(self.seed, _AUGMENT, epoch, batch, self.rank)
        if self.base is not None:
            idx = indices if self.index_map is None else self.index_map[indices]
            if self.with_generator:
                generator = torch.Generator().manual_seed(seed)
                return tuple(self.base.get_batch(idx, generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return tuple(self.base.get_batch(idx))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return tuple(default_collate([self.dataset[i] for i in indices.tolist()]))


class _EpochBatches(Dataset):
    """One epoch's batches as a map-style dataset, for DataLoader workers."""

    def __init__(self, fetch: _Fetcher, order: torch.Tensor, batch_size: int, epoch: int) -> None:
        self.fetch, self.order, self.batch_size, self.epoch = fetch, order, batch_size, epoch

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, batch: int) -> Batch:
        start = batch * self.batch_size
        return self.fetch(self.epoch, batch, self.order[start : start + self.batch_size])


def _as_is(batch: Batch) -> Batch:
    return batch


class BatchLoader:
    """Iterable of ``(x, y)`` batches; see the module docstring for the exact semantics.

    Attributes: ``epoch`` (set by :meth:`set_epoch`), ``num_samples`` (samples per epoch on this
    rank, padding included), ``len(loader)`` (batches per epoch on this rank, equal on all
    ranks).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        num_workers: int = 0,
        distributed: tuple[int, int] | None = None,
    ) -> None:
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.num_workers = _positive_int(num_workers, "num_workers", minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise DataError(f"seed must be an integer, got {seed!r}")
        if distributed is None:
            rank, world = 0, 1
        else:
            try:
                rank, world = distributed
            except (TypeError, ValueError):
                raise DataError(
                    f"distributed must be (rank, world_size) or None, got {distributed!r}"
                ) from None
            world = _positive_int(world, "world size")
            rank = _positive_int(rank, "rank", minimum=0)
            if rank >= world:
                raise DataError(
                    f"rank must be in 0..{world - 1} for world size {world}, got {rank}"
                )
        try:
            self.dataset_size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise DataError("the dataset must have a length (a map-style Dataset)") from None
        if self.dataset_size == 0:
            raise DataError("the dataset is empty; expected at least one sample")
        self.dataset = dataset
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world = rank, world
        n = self.dataset_size
        self.num_samples = n // world if self.drop_last else math.ceil(n / world)
        if self.num_samples == 0:
            raise DataError(
                f"drop_last with {n} samples and world size {world} leaves no sample per rank"
            )
        if self.drop_last:
            self._num_batches = self.num_samples // self.batch_size
        else:
            self._num_batches = math.ceil(self.num_samples / self.batch_size)
        if self._num_batches == 0:
            raise DataError(
                f"drop_last with batch_size {self.batch_size} leaves no batch: only "
                f"{self.num_samples} samples per rank; use a smaller batch_size or drop_last=False"
            )
        self._fetch = _Fetcher(dataset, self.seed, rank)
        self.epoch = 0

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _positive_int(epoch, "epoch", minimum=0)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's dataset indices for ``epoch``, in the order they are served."""
        epoch = _positive_int(epoch, "epoch", minimum=0)
        n, total = self.dataset_size, self.num_samples * self.world
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER, epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        if total > n:  # pad by wrapping around, as DistributedSampler does
            perm = torch.cat([perm, perm.repeat(math.ceil((total - n) / n))[: total - n]])
        return perm[self.rank : total : self.world]

    def batch_indices(self, epoch: int, batch: int) -> torch.Tensor:
        """The dataset indices of batch ``batch`` of ``epoch`` on this rank."""
        batch = self._check_batch(batch, allow_end=False)
        start = batch * self.batch_size
        return self.order(epoch)[start : start + self.batch_size]

    def get(self, epoch: int, batch: int) -> Batch:
        """Batch ``batch`` of ``epoch``: exactly what iterating that epoch yields there."""
        return self._fetch(epoch, batch, self.batch_indices(epoch, batch))

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Epoch ``epoch``'s batches from ``start_batch`` (``0 .. len(self)``) to its end."""
        order = self.order(epoch)[: self._num_batches * self.batch_size]
        start = self._check_batch(start_batch, allow_end=True)
        batches = _EpochBatches(self._fetch, order, self.batch_size, epoch)
        if self.num_workers == 0:
            return (batches[b] for b in range(start, self._num_batches))
        return iter(
            DataLoader(
                batches,
                batch_size=None,  # items are whole batches already
                sampler=range(start, self._num_batches),
                num_workers=self.num_workers,
                collate_fn=_as_is,
            )
        )

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.epoch, 0)

    def _check_batch(self, batch: int, *, allow_end: bool) -> int:
        batch = _positive_int(batch, "batch index", minimum=0)
        last = self._num_batches if allow_end else self._num_batches - 1
        if batch > last:
            raise DataError(f"batch index must be in 0..{last} ({len(self)} batches), got {batch}")
        return batch

    def __repr__(self) -> str:
        where = f", rank {self.rank}/{self.world}" if self.world > 1 else ""
        return (
            f"BatchLoader({self.dataset_size} samples, batch_size={self.batch_size}, "
            f"{len(self)} batches, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self.epoch}{where})"
        )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
    distributed: tuple[int, int] | None = None,
) -> BatchLoader:
    """A deterministic, resumable loader over ``dataset``; see :class:`BatchLoader`."""
    return BatchLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        num_workers=num_workers,
        distributed=distributed,
    )
