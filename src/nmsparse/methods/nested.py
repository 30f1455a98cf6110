"""Nested multi-level N:M: one weight holding several N:M levels of the same M, each sparser
level's kept weights a subset of the next denser level's, with the same values.

``levels="1:4,2:4"`` (same M, N strictly increasing; the layer's pattern given to ``sparsify``
must be the densest level). Every weight has a *rank* per entry: the first level that keeps it
(``len(levels)``: none). Within an M-group the ranks are filled level by level: entries
frozen by an earlier level keep their rank, the others are ranked by ``|w|`` (ties: lower
index). Level ``k``'s mask is ``rank <= k``, so level ``k`` keeps exactly ``N_k`` of every
``M`` and contains every sparser level; the values are the one dense weight's, so they are
identical across levels.

The live mask (what forward uses) is one level, ``w.state["level"]``, and the layer's live
pattern is that level's ``N_k:M``. Training (``training``):

* ``"progressive"`` - sparsest first: ``level_steps`` optimizer steps per level, the last level
  until the end. While level ``k`` trains, the weights of the levels below are frozen (no
  gradient, and any update the optimizer still makes, e.g. weight decay or momentum, is undone
  after the step); level ``k``'s own new weights follow ``|w|`` with a straight-through
  gradient, and are frozen when level ``k + 1`` starts;
* ``"joint"`` - every step trains one level in turn (step ``t`` trains level ``t mod L``), all
  weights learning, the ranks following ``|w|``.

At inference :func:`nmsparse.levels.set_level` switches every nested weight to a level;
:func:`nmsparse.levels.check_nesting` validates the nesting; :mod:`nmsparse.export.nested`
stores the densest level once plus the nesting, in no more bytes than the densest level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import NM, parse_pattern
from ..patterns.grouping import from_groups, to_groups
from .base import Method, Step, straight_through

TRAINING = ("progressive", "joint")
UNFROZEN = 255  # rank value of an entry no finished level holds
_SAVED = "_nested_frozen_values"


def parse_levels(text: str) -> tuple[NM, ...]:
    """``"1:4,2:4"`` as N:M patterns: same M, N strictly increasing."""
    accepted = "comma-separated N:M levels with the same M and N increasing, e.g. '1:4,2:4'"
    try:
        levels = tuple(parse_pattern(part.strip()) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"nested: cannot parse levels {text!r}; accepted: {accepted}") from None
    if (not all(isinstance(lv, NM) and lv.layout == "in" for lv in levels)
            or len({lv.m for lv in levels}) != 1
            or any(a.n >= b.n for a, b in zip(levels, levels[1:], strict=False))):
        raise ValueError(f"nested: invalid levels {text!r}; accepted: {accepted}")
    return levels


def priority(scores: torch.Tensor, frozen: torch.Tensor | None, levels: int) -> torch.Tensor:
    """Scores that put frozen entries first, lower ranks before higher, then the others by
    ``scores`` (``frozen``: uint8 ranks, :data:`UNFROZEN` where not frozen)."""
    scores = scores.detach().float()
    if frozen is None:
        return scores
    top = scores.max() + 1 if scores.numel() else scores.new_tensor(1.0)
    return torch.where(frozen != UNFROZEN, top * (levels + 1 - frozen.float()), scores)


def ranks_from_priority(key: torch.Tensor, counts: list[int], m: int,
                        layout: str) -> torch.Tensor:
    """uint8 rank of every entry: in each M-group the ``counts[0]`` highest ``key`` get 0, the
    next up to ``counts[1]`` get 1, ...; the rest ``len(counts)`` (ties: lower index first)."""
    groups = to_groups(key, m, layout)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    position = torch.empty_like(order).scatter_(
        -1, order, torch.arange(m, device=order.device).expand_as(order))
    limits = torch.tensor(counts, device=position.device)
    level = (position.unsqueeze(-1) >= limits).sum(-1).to(torch.uint8)
    return from_groups(level, key.shape, layout)


@dataclass(frozen=True)
class Nested(Method):
    """Several nested N:M levels in one weight (see the module docstring)."""

    name: ClassVar[str] = "nested"
    patterns: ClassVar[tuple] = (NM,)
    masks_beyond_pattern: ClassVar[bool] = True  # the live level may be denser than w.pattern
    levels: str = "auto"
    training: str = "progressive"
    level_steps: int = 1000

    def __post_init__(self) -> None:
        if self.levels != "auto":
            parse_levels(self.levels)
        if self.training not in TRAINING:
            raise ValueError(f"nested: training must be one of {TRAINING}, got "
                             f"{self.training!r}")
        if isinstance(self.level_steps, bool) or not isinstance(self.level_steps, int) \
                or self.level_steps < 1:
            raise ValueError(f"nested: level_steps must be an integer >= 1, got "
                             f"{self.level_steps!r}")

    def levels_of(self, w) -> tuple[NM, ...]:
        """The levels of ``w``: the ``levels`` option, or for ``"auto"`` ``N/2:M`` inside the
        layer's ``N:M`` (only ``N:M`` itself when ``N`` is 1 or odd)."""
        if "densest" not in w.state:  # first sight: the layer's pattern is the densest level
            w.state["densest"] = str(w.pattern)
        densest = parse_pattern(w.state["densest"])
        if self.levels == "auto":
            if not isinstance(densest, NM):
                raise ValueError(f"{w.name}: nested levels need an N:M pattern, got {densest}")
            n = densest.n
            return (NM(n // 2, densest.m, densest.layout), densest) if n % 2 == 0 else (densest,)
        levels = parse_levels(self.levels)
        if densest != levels[-1]:
            raise ValueError(f"{w.name}: nested levels {self.levels} need the layer's pattern "
                             f"to be the densest level {levels[-1]}, got {densest}")
        return levels

    def level_at(self, index: int, count: int) -> int:
        """The level (of ``count``) trained at the step with this index."""
        if self.training == "joint":
            return index % count
        return min(index // self.level_steps, count - 1)

    def live_level(self, w) -> int:
        return int(w.state.get("level", self.level_at(0, len(self.levels_of(w)))))

    def score(self, w):
        return priority(w.dense.abs(), w.state.get("frozen"), len(self.levels_of(w)))

    def ranks(self, w) -> torch.Tensor:
        """uint8 rank of every entry of ``w`` (``len(levels)``: kept by no level)."""
        levels = self.levels_of(w)
        return ranks_from_priority(self.score(w), [lv.n for lv in levels], levels[-1].m,
                                   levels[-1].layout)

    def level_mask(self, w, level: int) -> torch.Tensor:
        return self.ranks(w) <= level

    # -- hooks ---------------------------------------------------------------------------------
    def initial_mask(self, w):
        levels = self.levels_of(w)
        return self.level_mask(w, self.level_at(0, len(levels)))

    def refresh(self, w):
        w.pattern = self.levels_of(w)[self.live_level(w)]
        return w.recompute_mask(self.score(w))

    def masked_weight(self, w):
        return straight_through(w)

    def before_step(self, weights, step: Step) -> None:
        for w in weights:
            frozen = w.state.get("frozen")
            if frozen is None:
                continue
            held = frozen != UNFROZEN
            if w.dense.grad is not None:
                w.dense.grad.masked_fill_(held, 0)
            w.state[_SAVED] = w.dense.detach()[held].clone()

    def after_step(self, weights, step: Step) -> None:
        for w in weights:
            following = self.level_at(step.index + 1, len(self.levels_of(w)))
            saved = w.state.pop(_SAVED, None)
            frozen = w.state.get("frozen")
            if saved is not None and frozen is not None:
                with torch.no_grad():
                    w.dense[frozen != UNFROZEN] = saved
            current = self.live_level(w)
            if self.training == "progressive" and following > current:
                ranks = self.ranks(w)
                w.state["frozen"] = torch.where(
                    ranks <= current, ranks, torch.full_like(ranks, UNFROZEN))
            w.state["level"] = following
            w.refresh()
