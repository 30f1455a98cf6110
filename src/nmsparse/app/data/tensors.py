"""In-memory datasets with a vectorised ``get_batch`` fast path.

Every built-in dataset is small enough to hold in memory (Fashion-MNIST is 47 MB as uint8,
CIFAR 150 MB), so each one is a tensor plus a cheap per-batch transform. Two ways to read:

* ``dataset[i] -> (x, y)``: one sample, augmented with torch's global RNG, for a plain
  ``torch.utils.data.DataLoader`` (whose workers seed that RNG per worker).
* ``dataset.get_batch(indices, generator=None) -> (x, y)``: a whole batch in a few tensor ops,
  augmented with ``generator`` when given (else torch's global RNG). This is what
  :func:`nmsparse.app.data.make_loader` calls, with a generator derived from (seed, epoch, batch),
  so a resumed run replays exactly the same augmentation.

Labels come back as int64; a sample's label is a 0-d tensor, a batch's a ``(B,)`` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .transforms import CropFlip, Normalize

Indices = torch.Tensor | Sequence[int]


def _as_index(indices: Indices) -> torch.Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"get_batch expects 1-D indices, got shape {tuple(idx.shape)}")
    return idx


class ImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``, normalised (and optionally
    augmented) per batch into float32 ``(C, H, W)`` samples."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        normalize: Normalize,
        augment: CropFlip | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.long)
        self.normalize = normalize
        self.augment = augment
        self.classes = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].unsqueeze(0)
        if self.augment is not None:
            image = self.augment(image)
        return self.normalize(image)[0], self.labels[index]

    def get_batch(
        self, indices: Indices, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _as_index(indices)
        images = self.images[idx]
        if self.augment is not None:
            images = self.augment(images, generator)
        return self.normalize(images), self.labels[idx]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset({n} x {c}x{h}x{w}, augment={self.augment}, {self.normalize})"


class FeatureDataset(Dataset):
    """Float32 feature vectors ``(N, D)`` and int64 labels, already normalised; no augmentation."""

    def __init__(
        self, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None
    ) -> None:
        if features.dim() != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"features (N, D) and labels (N,) expected, got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.features = features.to(torch.float32)
        self.labels = labels.to(torch.long)
        self.classes = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def get_batch(
        self, indices: Indices, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        del generator  # nothing random here; accepted for the common signature
        idx = _as_index(indices)
        return self.features[idx], self.labels[idx]

    def __repr__(self) -> str:
        return f"FeatureDataset({self.features.shape[0]} x {self.features.shape[1]})"


class ByteSequenceDataset(Dataset):
    """Next-byte prediction windows over a uint8 corpus.

    Sample ``i`` starts at offset ``i * seq_len``: ``x = data[o : o + seq_len]`` and
    ``y = data[o + 1 : o + seq_len + 1]``, both int64 ``(seq_len,)``. There are
    ``(len(data) - 1) // seq_len`` such non-overlapping windows. With ``jitter=True`` (the
    training split's augmentation) each window start moves forward by a random
    ``0 .. seq_len - 1`` bytes (clamped at the end of the corpus), so over epochs the model sees
    every offset rather than the same fixed cut points.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, jitter: bool = False) -> None:
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(
                f"data must be a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}"
            )
        if seq_len < 1 or data.numel() < seq_len + 1:
            raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} bytes, got {data.numel()}")
        self.data = data
        self.seq_len = int(seq_len)
        self.jitter = bool(jitter)
        self._max_offset = data.numel() - self.seq_len - 1
        self._window = torch.arange(self.seq_len + 1)

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def _offsets(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n = len(self)
        if ((idx < -n) | (idx >= n)).any():
            raise IndexError(f"window index out of range for {n} windows")
        offsets = (idx % n) * self.seq_len
        if self.jitter:
            shift = torch.randint(0, self.seq_len, idx.shape, generator=generator)
            offsets = (offsets + shift).clamp_(max=self._max_offset)
        return offsets

    def _windows(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.data[offsets[:, None] + self._window].to(torch.long)
        # contiguous so that a trainer may .view(-1) the targets
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._windows(self._offsets(torch.tensor([int(index)]), None))
        return x[0], y[0]

    def get_batch(
        self, indices: Indices, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self._offsets(_as_index(indices), generator))

    def __repr__(self) -> str:
        return (
            f"ByteSequenceDataset({self.data.numel()} bytes, seq_len={self.seq_len}, "
            f"{len(self)} windows, jitter={self.jitter})"
        )
