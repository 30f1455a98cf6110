"""Which weights a one-shot pruner works on, and how each reads as an ``(out, in)`` matrix.

A :class:`Target` is one weight :func:`nmsparse.engine.selection.select` chose (Linear,
Conv1d/2d/3d, the input projections of MultiheadAttention, and Hugging Face's GPT-2
``Conv1D``, whose weight is stored transposed, ``(in, out)``). ``matrix()`` gives the weight
as ``(out, in)`` in both cases, so the N:M groups (consecutive input features) are
consecutive columns; ``write`` puts a pruned matrix back.

Calibrated methods (Wanda, SparseGPT) need the layer's input as rows of ``in`` features; that
is defined here for Linear and ``Conv1D`` (``calibratable``). Convolutions and attention
input projections take the magnitude pruner only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.selection import Choice


@dataclass
class Target:
    """One prunable weight."""

    name: str  # qualified weight name, e.g. "blocks.0.mlp.fc.weight"
    module_name: str
    module: nn.Module
    param: str
    transposed: bool  # HF Conv1D: the Parameter is (in, out)

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.param]

    @property
    def calibratable(self) -> bool:
        """Whether the layer's input rows are its matrix's columns (Linear, HF Conv1D)."""
        return self.transposed or isinstance(self.module, nn.Linear)

    @property
    def shape(self) -> tuple[int, int] | tuple[int, ...]:
        """The shape the pattern is checked against: ``(out, in)`` for HF Conv1D, the
        Parameter's own shape otherwise."""
        shape = tuple(self.weight.shape)
        return shape[::-1] if self.transposed else shape

    def matrix(self) -> torch.Tensor:
        """A float32 copy of the weight in the pattern's orientation."""
        weight = self.weight.detach()
        return (weight.t() if self.transposed else weight).float().clone()

    def write(self, matrix: torch.Tensor) -> None:
        """Copy ``matrix`` (pattern orientation) into the Parameter."""
        value = matrix.t() if self.transposed else matrix
        with torch.no_grad():
            self.weight.copy_(value.to(self.weight.dtype))

    @classmethod
    def of(cls, choice: Choice) -> Target:
        return cls(choice.name, choice.module_name, choice.module, choice.param,
                   transposed=choice.transposed)

    def to_parameter_layout(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask in the pattern's orientation, as the Parameter is stored."""
        return (mask.t() if self.transposed else mask).contiguous()
