"""The pattern protocol: what a mask may look like, and the one grammar that names patterns.

A :class:`Pattern` is a frozen value that

* says why a weight shape cannot take it (:meth:`Pattern.why_not`, ``None`` if it can),
* turns a score tensor into a bool mask of the same shape (:meth:`Pattern.mask`: higher
  scores are kept; among equal scores the lower index wins, so masks are the same on every
  device),
* reports how far a tensor (a mask, or a weight whose non-zeros count as kept) is from
  complying (:meth:`Pattern.violations`).

``check``, ``summary``, packing, the kernels' eligibility checks and every training method
use these three and nothing else, so a new pattern kind works everywhere once it implements
them and registers.

Grammar (:mod:`.parse`): ``"N:M"`` is the N:M pattern along the input dimension (keep
N of every M); every other kind is written ``"KIND:ARGUMENTS"`` with a registered lower-case
``KIND`` (``"flat:2:4"`` is N:M grouped in memory order). ``str(pattern)`` gives back a spec
that parses to an equal pattern.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import Registry


@dataclass(frozen=True)
class Violations:
    """How a tensor fares against a pattern: ``groups`` units were checked (an N:M group, a
    block, a whole tensor), ``violating`` of them keep more than the pattern allows, and the
    fullest unit keeps ``max_kept`` entries."""

    groups: int
    violating: int
    max_kept: int

    @property
    def ok(self) -> bool:
        return self.violating == 0


class Pattern(abc.ABC):
    """Base class of every pattern kind. A subclass that sets ``kind`` in its body is
    registered under that name (a clash raises); one without is an abstract intermediate."""

    kind: ClassVar[str]
    # how the kind is written, for messages that say what is accepted
    syntax: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            PATTERN_KINDS.add(cls.kind, cls)

    @property
    @abc.abstractmethod
    def density(self) -> float:
        """Fraction of the weights kept (for a shape-independent pattern)."""

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @abc.abstractmethod
    def why_not(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of ``shape`` cannot take this pattern, or ``None`` if it can."""

    @abc.abstractmethod
    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool mask of ``scores``' shape keeping what the pattern allows, highest first."""

    @abc.abstractmethod
    def violations(self, tensor: torch.Tensor) -> Violations:
        """How ``tensor`` (non-zero = kept) breaks the pattern."""

    def complies(self, tensor: torch.Tensor) -> bool:
        return self.violations(tensor).ok

    @classmethod
    @abc.abstractmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> Pattern:
        """Build from the text after ``"KIND:"`` (``layout``: the caller's default grouping)."""

    def require(self, shape: tuple[int, ...], name: str = "the weight") -> None:
        """Raise ``ValueError`` if a weight of ``shape`` cannot take this pattern."""
        error = self.why_not(tuple(shape))
        if error:
            raise ValueError(f"{name}: {error}")


def is_density(value: object) -> bool:
    """Whether ``value`` is a keep fraction: a finite real number strictly between 0 and 1
    (a bool is not one)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value < 1)


PATTERN_KINDS: Registry[type[Pattern]] = Registry("pattern kind")

PatternLike = str | Pattern | tuple


def accepted() -> str:
    kinds = ", ".join(f"'{kind}:...'" for kind in PATTERN_KINDS.names())
    return ("'N:M' with integers 1 <= N < M (keep N of every M), e.g. '2:4', '1:8', '4:16'"
            + (f"; or one of the kinds {kinds}" if kinds else ""))
