"""The one-shot pruner protocol and registry, and the mask choices the pruners share.

A :class:`Pruner` turns one weight matrix ``W`` (``(out, in)``, float32; N:M groups are
consecutive columns) and the calibration statistic it asked for (``statistic``: ``None``,
:class:`~nmsparse.oneshot.statistics.InputNorms` or
:class:`~nmsparse.oneshot.statistics.InputHessian`) into the pruned matrix and its bool mask
(True = kept). The mask must follow the pattern; the pruned matrix is zero where the mask is
False (SparseGPT also changes the kept weights).

Pruners register by subclassing with a ``name`` (see :data:`PRUNERS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import NM, Pattern, Unstructured
from ..registry import Registry
from .statistics import Statistic

PRUNERS: Registry[type[Pruner]] = Registry("one-shot pruning method")


@dataclass(frozen=True)
class Pruner:
    name: ClassVar[str]
    statistic: ClassVar[type[Statistic] | None] = None  # what calibration it needs

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            PRUNERS.add(cls.name, cls)

    def prune(self, matrix: torch.Tensor, statistic: Statistic | None,
              pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def top_count(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask keeping the ``count`` highest of ``scores`` (ties: lower flat index)."""
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:count]
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    return mask.scatter_(0, order, True).reshape(scores.shape)


def per_row_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The mask Wanda compares within: each output row on its own.

    N:M groups already lie within a row. For an unstructured density each row keeps
    ``floor(density * in)`` (so the layer never keeps more than the pattern allows); any other
    pattern kind is asked for its own mask of the whole matrix.
    """
    if isinstance(pattern, Unstructured):
        keep = math.floor(pattern.keep * scores.shape[1] + 1e-9)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    return pattern.mask(scores)


def nm_of(pattern: Pattern) -> NM | None:
    """The N:M pattern whose groups are consecutive columns of an ``(out, in)`` matrix."""
    return pattern if isinstance(pattern, NM) else None
