"""Image augmentation and normalisation on uint8 tensors, a whole batch at a time.

There is no torchvision here, and there is no need for it: the standard small-image
augmentation (random crop from a zero-padded image, random horizontal flip) is one gather per
batch. Images stay uint8 in memory (4x smaller than float) and are converted and normalised
per batch, which costs far less than a forward pass: about 1 ms for 256 Fashion-MNIST images
and 2 ms for 256 CIFAR images on one CPU thread.

Randomness comes from an explicit ``torch.Generator`` when one is given (the loader derives
one per batch, so a resumed run replays the same crops), else from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropFlip:
    """Random crop of the original size from an image zero-padded by ``padding`` pixels on each
    side, then a horizontal flip with probability 1/2 when ``flip`` is true.

    Padding is with black (pixel value 0, before normalisation), as torchvision's
    ``RandomCrop(size, padding)`` does.
    """

    padding: int
    flip: bool = True

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return crop_flip(images, padding=self.padding, flip=self.flip, generator=generator)


def crop_flip(
    images: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a batch ``(B, C, H, W)`` of any dtype; returns a new tensor of the same shape
    and dtype. Each image gets its own crop offset and flip."""
    if images.dim() != 4:
        raise ValueError(f"crop_flip expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = int(padding)
    hp, wp = h + 2 * p, w + 2 * p
    if p > 0:
        padded = images.new_zeros(b, c, hp, wp)
        padded[:, :, p : p + h, p : p + w] = images
    else:
        padded = images
    oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    rows = oy[:, None] + torch.arange(h)
    cols = ox[:, None] + torch.arange(w)
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    # One flat gather does crop and flip together: measured 2-4x faster than advanced indexing
    # or two gathers (rows then columns).
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


class Normalize:
    """uint8 ``(..., C, H, W)`` in 0..255 -> float32 ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Folded into one subtract and one multiply on the raw 0..255 values.
        self._shift = torch.tensor([m * 255.0 for m in self.mean]).view(-1, 1, 1)
        self._scale = torch.tensor([1.0 / (s * 255.0) for s in self.std]).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32).sub_(self._shift).mul_(self._scale)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"
