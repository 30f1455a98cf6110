"""Decaying pruning mask (Kao et al. 2022, "Training Recipe for N:M Structured Sparsity with
Decaying Pruning Mask").

The mask follows ``|w|`` after every update, as in STE, but the pruned weights are not cut
off at once: during training they take part scaled by a factor ``beta`` that decays from 1
to 0 over ``steps`` optimizer steps, so the network moves gradually from dense to N:M.

* ``where="weights"`` (the paper's pruning-mask decay): forward uses
  ``W * (mask + beta * (1 - mask))``; the gradient is that product's own, so a pruned entry
  gets ``beta`` times its upstream gradient.
* ``where="gradients"``: forward uses the hard ``W * mask``; the gradient reaches the kept
  entries in full and the pruned ones scaled by ``beta`` (a straight-through estimator that
  fades out).

``schedule="step"`` lowers ``beta`` in ``drops`` equal steps (``1, 1 - 1/drops, ..., 0``, each
held ``steps / drops`` optimizer steps); ``"cosine"`` follows ``(1 + cos(pi * k / steps)) / 2``.
After ``steps`` steps ``beta`` is 0: the pruned weights get no gradient and no say in forward.
The step count is the handle's (saved with its state), so a resumed run continues the decay.
In evaluation mode forward uses ``W * mask``: what is evaluated is the N:M model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._progress import check_choice, check_count, steps_taken, training
from .base import Method, kept_gradient_only

SCHEDULES = ("step", "cosine")
WHERE = ("weights", "gradients")


@dataclass(frozen=True)
class Decaying(Method):
    """Pruned weights scaled by a factor decaying 1 -> 0 over ``steps`` optimizer steps."""

    name: ClassVar[str] = "decaying"
    steps: int = 1000
    schedule: str = "step"
    drops: int = 4
    where: str = "weights"

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_count("steps", self.steps, 1))
        object.__setattr__(self, "drops", check_count("drops", self.drops, 1))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("where", self.where, WHERE)

    def factor(self, step: int) -> float:
        """``beta`` during optimizer step ``step`` (0-based)."""
        if step >= self.steps:
            return 0.0
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return 1.0 - (step * self.drops // self.steps) / self.drops

    def masked_weight(self, w) -> torch.Tensor:
        beta = self.factor(steps_taken(w)) if training(w) else 0.0
        hard = kept_gradient_only(w)  # W * mask, gradient to the kept entries only
        if beta == 0.0:
            return hard
        pruned = torch.where(w.mask, 0.0, w.dense)
        if self.where == "weights":
            return hard + beta * pruned
        # zero in value, beta * upstream gradient for the pruned entries
        return hard + beta * (pruned - pruned.detach())
