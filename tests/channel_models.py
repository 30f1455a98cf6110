"""Small models that exercise the channel graph: a residual stream, a concatenation, a
depthwise (or grouped) conv; shared by tests/channels."""

from __future__ import annotations

import torch
from torch import nn


def randomise_norms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
                module.weight.normal_()
                module.bias.normal_()
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_()



class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        x = x + self.a(x)
        x = self.b(x).relu() + x
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.mix = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = self.bn(torch.cat([self.left(x), self.right(x)], dim=1)).relu()
        return self.head(self.mix(y).flatten(2).mean(-1))


class Depthwise(nn.Module):
    def __init__(self, groups=8):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.project(self.depthwise(self.expand(x)).relu()).mean((2, 3))
