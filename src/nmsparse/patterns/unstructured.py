"""Unstructured: keep a fixed fraction of each weight tensor, anywhere in it.

``"unstructured:0.5"`` keeps ``round(density * numel)`` entries of every weight (per layer,
not across the model): the highest scores win, and among equal scores the lower flat
(row-major) index, so a mask is the same on every device. A tensor complies when it has at
most that many non-zeros. There is no hardware speed-up for this pattern; it is the reference
point one-shot pruning papers compare N:M against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, Violations, is_density

_ACCEPTED = "'unstructured:D' with a keep density 0 < D < 1, e.g. 'unstructured:0.5'"


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Keep ``keep`` (a fraction in (0, 1)) of every weight, highest scores first."""

    kind: ClassVar[str] = "unstructured"
    syntax: ClassVar[str] = "'unstructured:D'"
    keep: float

    def __post_init__(self) -> None:
        if not is_density(self.keep):
            raise ValueError(f"invalid unstructured density {self.keep!r}; accepted: "
                             f"{_ACCEPTED}")
        object.__setattr__(self, "keep", float(self.keep))

    @property
    def density(self) -> float:
        return self.keep

    def __str__(self) -> str:
        return f"unstructured:{self.keep:g}"

    @classmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> Unstructured:
        try:
            keep = float(arguments)
        except ValueError:
            raise ValueError(f"cannot parse pattern 'unstructured:{arguments}'; accepted: "
                             f"{_ACCEPTED}") from None
        return cls(keep)

    def kept(self, numel: int) -> int:
        """How many of ``numel`` entries the pattern keeps."""
        return int(round(self.keep * numel))

    def why_not(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2:
            return (f"weight of shape {tuple(shape)} is {len(shape)}-D; unstructured pruning "
                    "needs a 2-D or larger weight")
        return None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.detach().reshape(-1)
        # a stable descending sort keeps equal scores in index order: lower index first
        order = torch.sort(flat, descending=True, stable=True).indices[: self.kept(flat.numel())]
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        return mask.scatter_(0, order, True).reshape(scores.shape)

    def violations(self, tensor: torch.Tensor) -> Violations:
        if tensor.numel() == 0:
            return Violations(0, 0, 0)
        nonzero = int(torch.count_nonzero(tensor))
        return Violations(1, int(nonzero > self.kept(tensor.numel())), nonzero)
