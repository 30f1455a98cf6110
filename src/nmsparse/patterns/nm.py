"""N:M: keep N of every M consecutive weights along the grouping axis.

nmsparse reads "N:M" as *keep N of every M*: 2:4 keeps half (50 % sparse), 1:4 keeps a
quarter (75 % sparse). Some other tools count the pruned weights instead; nmsparse never does.

The grouping axis is part of the pattern (``layout``, see :mod:`.grouping`): ``"in"``
(the default and the hardware layout: M consecutive input channels) or ``"flat"`` (M
contiguous weights of an output row in memory order, the grouping behind the SR-STE paper's
conv numbers). Specs: ``"2:4"`` (or the caller's default layout), ``"flat:2:4"``.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, Violations, accepted
from .grouping import (
    check_layout,
    from_groups,
    grouping_error,
    keep_largest,
    kept_per_group,
    to_groups,
)

_SHORT = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", re.ASCII)


@dataclass(frozen=True)
class NM(Pattern):
    """An N:M pattern: keep ``n`` of every ``m`` consecutive weights along ``layout``."""

    kind: ClassVar[str] = "flat"  # "N:M" needs no kind; "flat:N:M" is the memory-order one
    syntax: ClassVar[str] = "N:M ('2:4', 'flat:2:4')"
    n: int
    m: int
    layout: str = "in"

    def __post_init__(self) -> None:
        for field, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"N and M must be integers, got {self.n!r}:{self.m!r}; "
                                 f"accepted: {accepted()}")
            object.__setattr__(self, field, int(value))  # numpy integers become plain ints
        if not 1 <= self.n < self.m:
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}; accepted: {accepted()}")
        check_layout(self.layout)

    @property
    def density(self) -> float:
        """Fraction of weights kept."""
        return self.n / self.m

    def __str__(self) -> str:
        text = f"{self.n}:{self.m}"
        return text if self.layout == "in" else f"{self.layout}:{text}"

    @classmethod
    def parse_short(cls, text: str, *, layout: str = "in") -> NM | None:
        """``"N:M"`` as a pattern grouped by ``layout``; ``None`` if ``text`` is not of that form
        (a malformed pair such as ``"4:2"`` raises)."""
        match = _SHORT.fullmatch(text)
        return None if match is None else cls(int(match.group(1)), int(match.group(2)), layout)

    @classmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> NM:
        pattern = cls.parse_short(arguments, layout=cls.kind)
        if pattern is None:
            raise ValueError(f"cannot parse pattern 'flat:{arguments}'; accepted: 'flat:N:M' "
                             "with integers 1 <= N < M, e.g. 'flat:2:4'")
        return pattern

    def why_not(self, shape: tuple[int, ...]) -> str | None:
        return grouping_error(tuple(shape), self.m, self.layout)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        groups = to_groups(scores.detach(), self.m, self.layout)
        return from_groups(keep_largest(groups, self.n), scores.shape, self.layout)

    def kept_per_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """Non-zero entries of every group, shaped ``(..., groups)``."""
        return kept_per_group(tensor, self.m, self.layout)

    def violations(self, tensor: torch.Tensor) -> Violations:
        kept = self.kept_per_group(tensor)
        if kept.numel() == 0:
            return Violations(0, 0, 0)
        bad, worst = torch.stack([(kept > self.n).sum(), kept.max()]).tolist()
        return Violations(kept.numel(), int(bad), int(worst))

