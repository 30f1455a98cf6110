"""The two per-step tensor operations of sparse training, written into existing buffers.

* :func:`refresh_` rebuilds a layer's mask (or, for a fixed mask, re-zeroes the pruned
  weights) and the cached masked weight that forward passes use.
* :func:`add_decay_` adds the SR-STE refinement ``decay * (1 - mask) * W`` to a gradient.

Both write in place: on the CPU, allocating fresh weight-sized tensors every step costs more
than the arithmetic (page faults), so the buffers live as long as the layer.
"""

from __future__ import annotations

import torch

from .masks import compute_mask
from .patterns import NM


def refresh_(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, pattern: NM,
             layout: str, recompute: bool) -> torch.Tensor:
    """Update ``mask`` (if ``recompute``) and ``masked = W * mask``; returns "all finite".

    With ``recompute=False`` the mask is authoritative and pruned weights are set to 0.
    The returned 0-d bool tensor lets callers check many layers with one host sync.
    """
    with torch.no_grad():
        finite = torch.isfinite(weight).all()
        if recompute:
            mask.copy_(compute_mask(weight, pattern, layout))
        else:
            weight.masked_fill_(mask.logical_not(), 0)
        torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device),
                    out=masked)
    return finite


def add_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
               decay: float) -> None:
    """``grad += decay * (1 - mask) * weight``, in place."""
    with torch.no_grad():
        pruned_weight = torch.where(mask, torch.zeros((), dtype=weight.dtype,
                                                      device=weight.device), weight)
        grad.add_(pruned_weight.to(grad.dtype), alpha=decay)
