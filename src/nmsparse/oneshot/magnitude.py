"""Magnitude pruning: keep the largest ``|w|`` the pattern allows; no calibration data.

For an unstructured pattern the comparison is across the whole layer; N:M compares within
each group. Kept weights are not changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Pruner


@dataclass(frozen=True)
class Magnitude(Pruner):
    name: ClassVar[str] = "magnitude"

    def prune(self, matrix, statistic, pattern):
        mask = pattern.mask(matrix.abs())
        return matrix * mask, mask
