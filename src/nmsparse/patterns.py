"""N:M patterns: the one place where "N:M" is parsed and validated.

nmsparse reads "N:M" as *keep N of every M* consecutive weights along the grouping axis:
2:4 keeps half (50 % sparse), 1:4 keeps a quarter (75 % sparse). Some other tools count the
pruned weights instead; nmsparse never does.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

_SPEC = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", re.ASCII)

ACCEPTED = "'N:M' with integers 1 <= N < M (keep N of every M), e.g. '2:4', '1:8', '4:16'"


@dataclass(frozen=True)
class NM:
    """An N:M pattern: keep ``n`` of every ``m`` consecutive weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for field, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"N and M must be integers, got {self.n!r}:{self.m!r}; "
                                 f"accepted: {ACCEPTED}")
            object.__setattr__(self, field, int(value))  # numpy integers become plain ints
        if not 1 <= self.n < self.m:
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}; accepted: {ACCEPTED}")

    @property
    def density(self) -> float:
        """Fraction of weights kept."""
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(spec: str | NM | tuple[int, int]) -> NM:
    """Turn ``"2:4"``, ``(2, 4)`` or an :class:`NM` into an :class:`NM`.

    Anything else (``"4:2"``, ``"0:4"``, ``"2/4"``, ``"a:b"``, ``"2:4:8"``) raises ``ValueError``.
    """
    if isinstance(spec, NM):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return NM(*spec)
    if isinstance(spec, str):
        match = _SPEC.fullmatch(spec)
        if match is None:
            raise ValueError(f"cannot parse pattern {spec!r}; accepted: {ACCEPTED}")
        return NM(int(match.group(1)), int(match.group(2)))
    raise ValueError(f"cannot parse pattern {spec!r} of type {type(spec).__name__}; "
                     f"accepted: {ACCEPTED}")
