"""Masks by magnitude, the functional API: ``nm_mask(weight, n, m)`` and friends.

Each group keeps its N largest ``|w|``; ties go to the lower index, so a mask is the same on
every device. The geometry of the groups lives in :mod:`nmsparse.grouping`, the pattern
object in :mod:`nmsparse.patterns`.
"""

from __future__ import annotations

import torch

from .grouping import LAYOUTS, check_layout, grouping_error, kept_per_group
from .patterns import NM

__all__ = ["LAYOUTS", "check_layout", "compute_mask", "kept_per_group", "nm_mask",
           "nonfinite_error"]


def compute_mask(weight: torch.Tensor, pattern: NM, layout: str | None = None) -> torch.Tensor:
    """Magnitude mask of ``weight`` with no finiteness check (callers check once for many
    layers). ``layout`` overrides the pattern's grouping when given."""
    if layout is not None and layout != pattern.layout:
        pattern = NM(pattern.n, pattern.m, layout)
    return pattern.mask(weight.detach().abs())


def nonfinite_error(name: str | None) -> ValueError:
    where = f"layer {name!r}" if name else "the weight"
    return ValueError(f"{where} contains NaN or Inf, so no N:M mask can be computed "
                      "(a diverged run: check the learning rate or the AMP loss scaling)")


def nm_mask(weight: torch.Tensor, n: int, m: int, layout: str = "in") -> torch.Tensor:
    """Bool mask of ``weight``'s shape keeping the N largest ``|w|`` of every M-group.

    Raises ``ValueError`` for an invalid pattern, a grouped dimension not divisible by M,
    a weight that is not 2-D to 5-D or not floating point, or a NaN/Inf weight.
    """
    pattern = NM(n, m, layout)
    if not torch.is_floating_point(weight):
        raise ValueError(f"nm_mask needs a floating-point weight, got dtype {weight.dtype}")
    error = grouping_error(tuple(weight.shape), pattern.m, layout)
    if error:
        raise ValueError(error)
    if not bool(torch.isfinite(weight).all()):
        raise nonfinite_error(None)
    return compute_mask(weight, pattern)
