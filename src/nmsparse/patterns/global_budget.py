"""Global unstructured density: one keep budget shared by every layer that carries the pattern.

``"global:D"`` keeps the fraction ``D`` of all the weights of the layers given this pattern
together; each layer's own density may differ (large layers usually end up sparser). One layer
alone cannot tell whether the model meets the budget, so per tensor this pattern only rules
out a weight that keeps everything, and it ranks one layer as ``"unstructured:D"`` does (the
starting point before anything global is known). The budget across layers is met by:

* :func:`global_masks` - one threshold over the scores of many layers (e.g. global magnitude
  pruning, the usual lottery-ticket setting); pass the result to ``sparsify(masks=...)``;
* the prune-and-grow methods (:mod:`nmsparse.methods.prune_grow`), which drop and grow across
  all the layers they drive with this pattern, keeping the total kept count fixed;
* :func:`global_violations` - the check across layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Violations
from .unstructured import Unstructured

_ACCEPTED = "'global:D' with a keep density 0 < D < 1 over all its layers, e.g. 'global:0.1'"


@dataclass(frozen=True)
class GlobalUnstructured(Unstructured):
    """Keep ``keep`` of the weights of all the layers with this pattern, taken together."""

    kind: ClassVar[str] = "global"
    syntax: ClassVar[str] = "'global:D'"

    def __str__(self) -> str:
        return f"global:{self.keep:g}"

    @classmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> GlobalUnstructured:
        try:
            return cls(float(arguments))
        except ValueError:
            raise ValueError(f"cannot parse pattern 'global:{arguments}'; accepted: "
                             f"{_ACCEPTED}") from None

    def violations(self, tensor: torch.Tensor) -> Violations:
        if tensor.numel() == 0:
            return Violations(0, 0, 0)
        nonzero = int(torch.count_nonzero(tensor))
        return Violations(1, int(nonzero == tensor.numel()), nonzero)


def global_masks(scores: Mapping[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Bool masks keeping the ``round(keep * total)`` highest scores over all tensors together
    (one threshold); ties go to the earlier tensor in ``scores``' order, then the lower index."""
    GlobalUnstructured(keep)  # validates keep
    if not scores:
        raise ValueError("global_masks needs at least one score tensor")
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    kept = int(round(keep * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:kept]
    chosen = torch.zeros(flat.shape, dtype=torch.bool).scatter_(0, order, True)
    masks, start = {}, 0
    for name, tensor in scores.items():
        size = tensor.numel()
        masks[name] = chosen[start:start + size].reshape(tensor.shape).to(tensor.device)
        start += size
    return masks


def global_violations(tensors: Mapping[str, torch.Tensor], keep: float) -> Violations:
    """Whether ``tensors`` (non-zero = kept) together keep at most ``round(keep * total)``."""
    total = sum(t.numel() for t in tensors.values())
    used = sum(int(torch.count_nonzero(t)) for t in tensors.values())
    return Violations(1, int(used > int(round(keep * total))), used)
