"""2:4 verification for the semi-structured kernels: PyTorch's compression does not check
the pattern (a group of 4 with 3 non-zeros is silently compressed into garbage), so every
weight is checked first with :meth:`NM.violations <nmsparse.patterns.NM.violations>`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import NM


@dataclass(frozen=True)
class PatternCheck:
    """Result of :func:`verify_2to4` on one weight."""

    groups: int
    violating: int
    max_nonzeros: int
    first: tuple[int, int] | None = None  # (row, first column) of the first bad group

    @property
    def ok(self) -> bool:
        return self.violating == 0

    def __bool__(self) -> bool:
        return self.ok

    def describe(self) -> str:
        if self.ok:
            return f"2:4 along the input dim ({self.groups} groups of 4)"
        row, col = self.first or (0, 0)
        return (f"not 2:4 along the input dim: {self.violating} of {self.groups} groups of 4 "
                f"hold more than 2 non-zeros (up to {self.max_nonzeros}), the first at row "
                f"{row}, columns {col}..{col + 3}")


TWO_FOUR = NM(2, 4)


def verify_2to4(weight: torch.Tensor) -> PatternCheck:
    """Count the groups of 4 consecutive entries along dim 1 of a 2-D ``weight`` that hold more
    than 2 non-zeros (NaN counts as non-zero). Works on any device."""
    if weight.dim() != 2:
        raise ValueError(f"verify_2to4 takes a 2-D (out, in) weight, got shape "
                         f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"input dim {cols} of weight shape {tuple(weight.shape)} is not a "
                         "multiple of 4: it has no 2:4 groups")
    if weight.numel() == 0:
        return PatternCheck(0, 0, 0)
    found = TWO_FOUR.violations(weight.detach())  # the one definition of "is this N:M"
    first = None
    if not found.ok:  # where, for the message: the first group of 4 with more than 2
        row, group = (TWO_FOUR.kept_per_group(weight.detach()) > 2).nonzero()[0].tolist()
        first = (row, 4 * group)
    return PatternCheck(found.groups, found.violating, found.max_kept, first)
