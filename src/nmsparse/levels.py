"""Working with nested multi-level N:M weights (:mod:`nmsparse.methods.nested`): switch the
level a model computes with, get every level's masks, and validate the nesting.

``set_level(model, "1:4")`` (or a level index, ``-1`` the densest) makes every nested weight
of ``model`` compute with that level; the weights themselves are untouched, so switching back
and forth is exact. ``check_nesting`` reports, per weight and level, whether the level keeps
exactly its ``N`` of every ``M`` and lies inside the next denser level, and whether the live
mask is the live level's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine.handle import SparsityHandle
from .engine.sparse_module import sparse_states
from .engine.sparse_weight import SparseWeight
from .methods.nested import Nested
from .patterns import NM, parse_pattern
from .tables import format_table


def nested_weights(model_or_handle: nn.Module | SparsityHandle) -> list[SparseWeight]:
    """The sparse weights trained with the nested method, in model order."""
    if isinstance(model_or_handle, SparsityHandle):
        weights = list(model_or_handle)
    elif isinstance(model_or_handle, nn.Module):
        weights = [w for module in model_or_handle.modules()
                   for w in sparse_states(module).values()]
    else:
        raise ValueError(f"expected a model or a sparsity handle, got "
                         f"{type(model_or_handle).__name__}")
    return [w for w in weights if isinstance(w.method, Nested)]


def _level_index(w: SparseWeight, level: int | str) -> int:
    levels = w.method.levels_of(w)
    if isinstance(level, str):
        wanted = parse_pattern(level)
        if wanted not in levels:
            raise ValueError(f"{w.name}: no level {level!r}; its levels are "
                             f"{', '.join(map(str, levels))}")
        return levels.index(wanted)
    if isinstance(level, bool) or not isinstance(level, int) \
            or not -len(levels) <= level < len(levels):
        raise ValueError(f"{w.name}: level must be an index in [{-len(levels)}, {len(levels)}) "
                         f"or one of {', '.join(map(str, levels))}, got {level!r}")
    return level % len(levels)


def set_level(model_or_handle: nn.Module | SparsityHandle, level: int | str) -> None:
    """Make every nested weight compute with ``level`` (an index or a spec such as ``"1:4"``);
    every weight is checked before any is switched."""
    weights = nested_weights(model_or_handle)
    if not weights:
        raise ValueError("the model has no nested weights (sparsify it with method='nested')")
    chosen = [_level_index(w, level) for w in weights]
    for w, index in zip(weights, chosen, strict=True):
        w.state["level"] = index
        w.refresh()


def level_masks(w: SparseWeight) -> list[torch.Tensor]:
    """Every level's bool mask of one nested weight, sparsest first."""
    ranks = w.method.ranks(w)
    return [ranks <= k for k in range(len(w.method.levels_of(w)))]


def nesting_problems(masks: Sequence[torch.Tensor], levels: Sequence[NM]) -> list[str]:
    """What is wrong with ``masks`` as nested ``levels`` (empty: nothing): each must keep
    exactly its N of every M and lie inside the next one."""
    problems = []
    for k, (mask, level) in enumerate(zip(masks, levels, strict=True)):
        kept = level.kept_per_group(mask)
        wrong = int((kept != level.n).sum())
        if wrong:
            problems.append(f"level {level}: {wrong} of {kept.numel()} groups do not keep "
                            f"exactly {level.n}")
        if k + 1 < len(masks) and bool((mask & ~masks[k + 1]).any()):
            problems.append(f"level {level} is not inside level {levels[k + 1]}")
    return problems


@dataclass
class NestingReport:
    """Per nested weight: its levels, the live level and the problems found."""

    rows: list[tuple[str, str, str, list[str]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not problems for *_, problems in self.rows)

    def __str__(self) -> str:
        table = [[name, levels, live, "; ".join(problems) or "ok"]
                 for name, levels, live, problems in self.rows]
        return format_table(["weight", "levels", "live level", "nesting"], table)


def check_nesting(model_or_handle: nn.Module | SparsityHandle) -> NestingReport:
    """Validate every nested weight's levels (see :func:`nesting_problems`) and that its live
    mask is the live level's mask."""
    weights = nested_weights(model_or_handle)
    if not weights:
        raise ValueError("the model has no nested weights (sparsify it with method='nested')")
    report = NestingReport()
    for w in weights:
        levels = w.method.levels_of(w)
        masks = level_masks(w)
        problems = nesting_problems(masks, levels)
        live = w.method.live_level(w)
        w.ensure_fresh()
        if not torch.equal(w.mask, masks[live]):
            problems.append(f"the live mask is not level {levels[live]}'s mask")
        report.rows.append((w.name, ",".join(map(str, levels)), str(levels[live]), problems))
    return report
