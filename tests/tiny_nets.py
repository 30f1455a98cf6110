"""Tiny MLPs and a seeded random-data training loop shared by the method tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Linear layers ``a``, ``b``, ... of the given widths, ReLU between them."""

    def __init__(self, *widths: int):
        super().__init__()
        widths = widths or (16, 32, 4)
        self.names = [chr(ord("a") + i) for i in range(len(widths) - 1)]
        for name, (n_in, n_out) in zip(self.names, zip(widths, widths[1:], strict=False),
                                       strict=True):
            setattr(self, name, nn.Linear(n_in, n_out))

    def forward(self, x):
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            x = x.relu() if i + 1 < len(self.names) else x
        return x


def train_steps(model: TinyMLP, optimizer, count: int, seed: int = 0) -> None:
    """``count`` optimizer steps on seeded random batches of 8 (classes: the last width)."""
    first, last = getattr(model, model.names[0]), getattr(model, model.names[-1])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(8, first.in_features, generator=generator)
        y = torch.randint(0, last.out_features, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
