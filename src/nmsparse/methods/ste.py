"""Straight-through estimators: STE and SR-STE (Zhou et al., ICLR 2021).

Both recompute the mask from ``|w|`` after every update and pass the gradient of the masked
weight straight through to every dense entry, so pruned weights can grow back. SR-STE adds
the sparse-refined term ``decay * (1 - mask) * W`` to the dense weight's gradient once per
optimizer step, on the final gradient (after DDP averaging, gradient accumulation, weight
reuse and GradScaler unscaling), which the official code gets wrong in all four cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import Method, Step


@dataclass(frozen=True)
class STE(Method):
    """Plain straight-through estimator: SR-STE without the refinement term."""

    name: ClassVar[str] = "ste"


@dataclass(frozen=True)
class SRSTE(STE):
    """Sparse-refined straight-through estimator with refinement strength ``decay``."""

    name: ClassVar[str] = "srste"
    decay: float = 2e-4

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)):
            raise ValueError(f"decay must be a number >= 0, got {self.decay!r}")
        if not math.isfinite(self.decay) or self.decay < 0:
            raise ValueError(f"decay must be a finite number >= 0, got {self.decay!r}")

    def before_step(self, weights, step: Step) -> None:
        if self.decay:
            for w in weights:
                w.add_pruned_to_grad(self.decay)
