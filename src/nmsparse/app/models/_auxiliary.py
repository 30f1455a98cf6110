"""Attach a model's own loss term (a token-ratio or gate loss) to its output's gradient.

``with_auxiliary(output, term)`` returns ``output`` unchanged in value; a backward pass
through it also backpropagates ``term`` (scalar) with weight 1, whatever loss is computed
from the output. So the term trains the model in any loop with no extra call, and nothing
holding the autograd graph is kept on the module (a graph stored on a module can hold, through
a sparse weight's autograd node, a reference back to it that gc cannot see). Backward through
the output more than once adds the term's gradient each time.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _WithAuxiliary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: Tensor, term: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


def with_auxiliary(output: Tensor, term: Tensor) -> Tensor:
    """``output``, with ``term``'s gradient added to any backward pass through it."""
    if not (torch.is_grad_enabled() and term.requires_grad):
        return output
    return _WithAuxiliary.apply(output, term)
