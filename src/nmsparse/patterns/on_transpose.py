"""A pattern applied to the transpose of a 2-D weight stored ``(in, out)``.

Hugging Face's ``Conv1D`` (GPT-2 and relatives) stores its weight as ``(in, out)``; its input
dimension is dim 0. Wrapping the layer's pattern in :class:`OnTranspose` groups it along that
input dimension like every ``nn.Linear``, while masks keep the weight's own shape. It prints
as the pattern it wraps; it is a per-layer adapter, not a pattern kind of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, Violations


@dataclass(frozen=True)
class OnTranspose(Pattern):
    """``inner`` applied to ``weight.T`` of a 2-D weight."""

    inner: Pattern

    @property
    def density(self) -> float:
        return self.inner.density

    def __str__(self) -> str:
        return str(self.inner)

    @classmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> Pattern:
        raise ValueError("OnTranspose is built per layer, never parsed")

    def why_not(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2:
            return f"weight of shape {tuple(shape)} is not 2-D (in, out)"
        error = self.inner.why_not((shape[1], shape[0]))
        return None if error is None else f"{error} (weight stored (in, out), grouped along in)"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return self.inner.mask(scores.t()).t().contiguous()

    def violations(self, tensor: torch.Tensor) -> Violations:
        return self.inner.violations(tensor.t())
