"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

The score of ``W[i, j]`` is ``|W[i, j]| * ||X[:, j]||_2`` over all calibration rows ``X`` of
the layer's input; weights are compared within each output row (per N:M group, or per row
for an unstructured density). Kept weights are not changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Pruner, per_row_mask
from .statistics import InputNorms


@dataclass(frozen=True)
class Wanda(Pruner):
    name: ClassVar[str] = "wanda"
    statistic: ClassVar[type] = InputNorms

    def prune(self, matrix, statistic, pattern):
        scores = matrix.abs() * statistic.norms().to(matrix.device).unsqueeze(0)
        mask = per_row_mask(scores, pattern)
        return matrix * mask, mask
