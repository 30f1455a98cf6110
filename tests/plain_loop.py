"""The reference the framework tests compare against: a 2:4 SR-STE MLP trained by a plain
PyTorch loop (gradient accumulation and bf16 autocast done by hand)."""

from __future__ import annotations

import torch
from torch import nn

import nmsparse

LR, DECAY, BATCH = 0.1, 0.05, 8


def network() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    nmsparse.sparsify(model, "2:4", decay=DECAY)
    return model


def data(batches: int):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batches * BATCH, 16, generator=generator),
            torch.randint(0, 4, (batches * BATCH,), generator=generator))


def plain_loop(steps: int, accumulate: int, bf16: bool) -> nn.Module:
    x, y = data(steps * accumulate)
    model = network()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            index = slice((step * accumulate + micro) * BATCH,
                          (step * accumulate + micro + 1) * BATCH)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
            (loss / accumulate).backward()
        opt.step()
    return model
