"""S-STE (Hu et al., NeurIPS 2024, "S-STE: Continuous Pruning Function for Efficient 2:4
Sparse Pre-training"): a continuous pruning function instead of a hard top-N.

Each group of M keeps its N largest ``|w|`` shrunk by the group's threshold ``t`` (the
(N+1)-th largest ``|w|``) with their sign: ``S(w) = sign(w) * max(|w| - t, 0)``, zero for the
rest. Forward uses ``scale * S(W)``: the value is continuous in ``W`` (an entry leaving the top
N has already shrunk to 0), which removes the jumps that SR-STE's term has to fight. The
per-tensor ``scale`` restores the magnitude the shrinking loses; as in the paper it is computed
once, at ``sparsify`` time, as the least-squares fit ``<W, S(W)> / <S(W), S(W)>``, and then kept
(saved per weight in the handle state). The dense weight gets the upstream gradient straight
through, as in STE.

The mask (``w.mask``) is the top N of ``|w|`` per group as usual; ``finalize`` writes
``scale * S(W)`` into the weight, so the finalized model computes what training evaluated.
Needs an N:M-style pattern with ``n`` and ``m`` grouped along the input dimension (``"2:4"``,
``"flat:2:4"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import NM
from ..patterns.grouping import from_groups, to_groups
from ._nm import nm_geometry
from .base import Method, value_straight_through

SCALE = "sste_scale"


def soft_threshold(weight: torch.Tensor, n: int, m: int, layout: str) -> torch.Tensor:
    """``sign(w) * max(|w| - t, 0)`` with ``t`` the (n+1)-th largest ``|w|`` of each group."""
    groups = to_groups(weight, m, layout)
    threshold = groups.abs().topk(n + 1, dim=-1).values[..., n:]
    shrunk = torch.sign(groups) * torch.clamp(groups.abs() - threshold, min=0)
    return from_groups(shrunk, weight.shape, layout)


def fitted_scale(weight: torch.Tensor, soft: torch.Tensor) -> float:
    """The least-squares ``scale`` of ``weight ~ scale * soft`` (1 for an all-zero ``soft``)."""
    weight, soft = weight.double(), soft.double()
    energy = float((soft * soft).sum())
    return float((weight * soft).sum()) / energy if energy > 0 else 1.0


@dataclass(frozen=True)
class SSTE(Method):
    """Soft-thresholding per group times a per-tensor scale frozen at ``sparsify`` time."""

    name: ClassVar[str] = "sste"
    patterns: ClassVar[tuple] = (NM,)

    def _geometry(self, w) -> tuple[int, int, str]:
        return nm_geometry(w, self.name)

    def initial_mask(self, w) -> torch.Tensor:
        n, m, layout = self._geometry(w)
        dense = w.dense.detach()
        w.state[SCALE] = fitted_scale(dense, soft_threshold(dense, n, m, layout))
        return super().initial_mask(w)

    def forward_value(self, w) -> torch.Tensor:
        """``scale * S(W)``: the weight this method computes with."""
        n, m, layout = self._geometry(w)
        with torch.no_grad():
            soft = soft_threshold(w.dense.detach(), n, m, layout)
            return soft.mul_(w.state.get(SCALE, 1.0)).to(w.dense.dtype)

    def masked_weight(self, w) -> torch.Tensor:
        return value_straight_through(w.dense, self.forward_value(w))

    def deployed_weight(self, w) -> torch.Tensor:
        return self.forward_value(w)
