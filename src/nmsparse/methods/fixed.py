"""Fixed masks: prune once, then train with the mask held (NVIDIA ASP's recipe).

``Fixed`` computes the mask at ``sparsify`` time by magnitude, sets the pruned weights to 0
and keeps them exactly 0 whatever the optimizer does (momentum, weight decay, Adam): their
gradient is zeroed and every refresh re-zeroes them. ``ASP`` is the whole recipe: a dense
training phase, then the one-shot magnitude prune and retraining with the fixed mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method, kept_gradient_only


@dataclass(frozen=True)
class Fixed(Method):
    """Mask fixed at sparsify time; pruned weights stay exactly zero."""

    name: ClassVar[str] = "fixed"
    gradient: ClassVar[str] = "kept"

    def refresh(self, w):
        return w.enforce_mask()

    def masked_weight(self, w):
        return kept_gradient_only(w)


@dataclass(frozen=True)
class ASP(Fixed):
    """Train dense, prune once by magnitude, retrain with the fixed mask (same budget)."""

    name: ClassVar[str] = "asp"

    def phases(self) -> tuple[str, ...]:
        return ("dense", "sparse")
