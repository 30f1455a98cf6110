"""RIA, relative importance and activations (Zhang et al., 2024, "Plug-and-Play").

The score of ``W[i, j]`` (``(out, in)``) is its magnitude relative to both its row and its
column, times the input activation norm to a power ``a``::

    RI[i, j] = |W[i, j]| / sum_k |W[i, k]|  +  |W[i, j]| / sum_k |W[k, j]|
    score[i, j] = RI[i, j] * ||X[:, j]||_2 ** a          (a = power, 0.5 by default)

so a weight that is large for its output row *or* for its input channel survives, which keeps
every channel from being emptied (Wanda's per-row comparison alone can prune a whole input
channel). Weights are compared within each output row, as in Wanda (per N:M group, or per row
for an unstructured density); kept weights are not changed. The paper's channel permutation
is ``nmsparse.prune(..., permute=True)`` (:mod:`nmsparse.channels.permute`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pruner, per_row_mask
from .statistics import InputNorms


def relative_importance(matrix: torch.Tensor) -> torch.Tensor:
    """``|W|`` over its row sums plus ``|W|`` over its column sums (an all-zero row or
    column scores zero, not NaN)."""
    magnitude = matrix.abs()
    tiny = torch.finfo(magnitude.dtype).tiny
    rows = magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
    columns = magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
    return magnitude / rows + magnitude / columns


@dataclass(frozen=True)
class RIA(Pruner):
    name: ClassVar[str] = "ria"
    statistic: ClassVar[type] = InputNorms
    power: float = 0.5  # the exponent "a" of the activation norm

    def __post_init__(self) -> None:
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) \
                or not 0 <= self.power < math.inf:
            raise ValueError(f"ria power must be a finite number >= 0, got {self.power!r}")

    def prune(self, matrix, statistic, pattern):
        norms = statistic.norms().to(matrix.device)
        scores = relative_importance(matrix) * norms.pow(self.power).unsqueeze(0)
        mask = per_row_mask(scores, pattern)
        return matrix * mask, mask
