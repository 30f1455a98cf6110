"""The geometry of prune-and-grow: where a pattern lets a dropped weight be replaced, and one
drop/grow exchange computed on that geometry.

A pattern's masks are seen as *units* (rows of a 2-D view), each with a fixed budget of kept
entries: an N:M group (one unit per group), the whole tensor (unstructured), the tile grid
(block: one entry per tile), or the concatenation of several tensors (a ``"global:D"`` budget
shared by layers). An exchange that drops ``d`` kept entries of a unit and grows ``d`` of its
pruned ones keeps every budget, so the pattern holds after every mutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..patterns import NM, Block, GlobalUnstructured, OnTranspose, Pattern, Unstructured
from ..patterns.grouping import from_groups, to_groups

ACCEPTED = ("N:M ('2:4', 'flat:2:4'), 'unstructured:D', 'global:D' or 'block:RxC:D' (also on a "
            "weight stored transposed)")


@dataclass(frozen=True)
class Units:
    """How tensors of given shapes map to the units of a pattern."""

    pattern: Pattern
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, pattern: Pattern, shapes: Sequence[torch.Size]) -> Units:
        if isinstance(pattern, OnTranspose):  # a weight stored (in, out): its transpose
            return _Transposed(cls.of(pattern.inner, [torch.Size(s)[::-1] for s in shapes]))
        if not isinstance(pattern, (NM, Unstructured, Block)):
            raise ValueError(f"prune-and-grow supports the patterns {ACCEPTED}, got {pattern}")
        if len(shapes) > 1 and not isinstance(pattern, GlobalUnstructured):
            raise ValueError("only a 'global:D' pattern shares one budget between tensors")
        return cls(pattern, tuple(torch.Size(s) for s in shapes))

    def view(self, tensors: Sequence[torch.Tensor], reduce: str = "sum") -> torch.Tensor:
        """``tensors`` as ``(units, unit size)``; for block patterns one entry per tile, the
        tile's ``reduce`` ("sum" of scores, "any" of a mask)."""
        pattern = self.pattern
        if isinstance(pattern, NM):
            (tensor,) = tensors
            return to_groups(tensor, pattern.m, pattern.layout).reshape(-1, pattern.m)
        if isinstance(pattern, Block):
            (tensor,) = tensors
            tiles = pattern.tiles(tensor).flatten(-2)
            merged = tiles.any(-1) if reduce == "any" else tiles.sum(-1)
            return merged.reshape(1, -1)
        return torch.cat([t.reshape(-1) for t in tensors]).reshape(1, -1)

    def unview(self, units: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`view` for bool masks: one tensor per shape."""
        pattern = self.pattern
        if isinstance(pattern, NM):
            (shape,) = self.shapes
            grouped = to_groups(torch.empty(shape, device="meta"), pattern.m, pattern.layout)
            return [from_groups(units.reshape(grouped.shape), shape, pattern.layout)]
        if isinstance(pattern, Block):
            (shape,) = self.shapes
            rows = shape[0] // pattern.rows
            return [pattern.expand(units.reshape(rows, -1), shape)]
        out, start = [], 0
        for shape in self.shapes:
            size = shape.numel()
            out.append(units.reshape(-1)[start:start + size].reshape(shape).contiguous())
            start += size
        return out


@dataclass(frozen=True)
class _Transposed:
    """The units of the inner pattern of :class:`OnTranspose`, on transposed 2-D tensors."""

    inner: Units

    def view(self, tensors: Sequence[torch.Tensor], reduce: str = "sum") -> torch.Tensor:
        return self.inner.view([t.t() for t in tensors], reduce)

    def unview(self, units: torch.Tensor) -> list[torch.Tensor]:
        return [t.t().contiguous() for t in self.inner.unview(units)]


def ranks_in_rows(keys: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of every entry inside its row (0 = first), stable: ties go to the lower index."""
    order = torch.sort(keys, dim=-1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(keys.shape[-1], device=keys.device).expand_as(order))
    return ranks


def drop_plan(active: torch.Tensor, drop_score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool ``(units, size)``: the ``count`` active entries with the lowest ``drop_score``
    (ties: lower unit, then lower index), at most as many per unit as it has pruned entries
    (so each can be replaced inside its unit)."""
    free = (~active).sum(-1, keepdim=True)
    cap = torch.minimum(active.sum(-1, keepdim=True), free)
    inf = torch.tensor(float("inf"), dtype=drop_score.dtype, device=drop_score.device)
    keys = torch.where(active, drop_score, inf)
    eligible = active & (ranks_in_rows(keys, descending=False) < cap)
    flat = torch.where(eligible, drop_score, inf).reshape(-1)
    count = min(count, int(eligible.sum()))
    chosen = torch.sort(flat, stable=True).indices[:count]
    return torch.zeros(flat.shape, dtype=torch.bool, device=flat.device).scatter_(
        0, chosen, True).reshape(active.shape)


def grow_plan(active: torch.Tensor, grow_score: torch.Tensor,
              per_unit: torch.Tensor) -> torch.Tensor:
    """Bool ``(units, size)``: in every unit the ``per_unit`` pruned entries with the highest
    ``grow_score`` (ties: lower index)."""
    keys = torch.where(active, torch.tensor(float("-inf"), dtype=grow_score.dtype,
                                            device=grow_score.device), grow_score)
    return ~active & (ranks_in_rows(keys, descending=True) < per_unit.reshape(-1, 1))


def exchange(active: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor,
             count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prune-and-grow exchange on ``(units, size)`` tensors: drop ``count`` entries
    (:func:`drop_plan`), grow as many in the same units among the entries that were pruned
    before the drop. Returns ``(new mask, dropped, grown)``."""
    dropped = drop_plan(active, drop_score, count)
    grown = grow_plan(active, grow_score, dropped.sum(-1))
    return (active & ~dropped) | grown, dropped, grown
