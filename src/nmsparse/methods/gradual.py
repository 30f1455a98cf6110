"""Gradual N:M: the number of weights each group keeps follows a schedule over training, from
``counts[0]`` (default M: dense) down to the layer's own N (Kao et al. 2022 call this
"sparse structure decay"; e.g. 8:8 -> 4:8 -> 2:8).

``Gradual`` wraps a mask-recomputing method (``inner``: ``"srste"`` by default, ``"ste"`` or
``"decaying"``, with ``inner_options``). The ``counts`` stages (e.g. ``[8, 4]`` for a 2:8
layer, default: M, M/2, M/4, ... while above N) each last ``steps / len(counts)`` optimizer
steps; after ``steps`` steps every group keeps the layer's N and the run is plain ``inner``.

During a stage keeping ``k > N`` per group, the training forward is ``inner``'s forward with
the ``k`` largest scores of every group kept (the layer's pattern with ``n = k``; all of them
when ``k >= M``). The mask buffer ``w.mask`` always holds the layer's own pattern (the top N),
so checkpoints, ``check`` and ``finalize`` see a valid N:M model at every step, and evaluation
mode computes with it. ``inner``'s step hooks (SR-STE's term) see that mask too: from the
first step they pull the weights the final pattern prunes towards 0.

The layer's pattern must have ``n`` and ``m`` (``"N:M"``, ``"flat:N:M"``,
``"transposable:N:M"``). The step count is the handle's, saved with its state.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ._progress import check_count, steps_taken, training
from .base import METHODS, Method, Step, make_method

INNER = ("srste", "ste", "decaying")


class _Scheduled:
    """A sparse weight as ``inner`` sees it in a stage keeping more than N: the scheduled mask
    and ``W * mask`` in place of the layer's own; everything else is the weight's."""

    def __init__(self, weight: Any, mask: torch.Tensor) -> None:
        self._weight, self.mask = weight, mask
        self.masked = torch.where(mask, weight.dense.detach(), 0.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._weight, name)


@dataclass(frozen=True)
class Gradual(Method):
    """Kept count per group scheduled from ``counts[0]`` down to the layer's N over ``steps``."""

    name: ClassVar[str] = "gradual"
    masks_beyond_pattern: ClassVar[bool] = True  # keeps more than N per group until the end
    steps: int = 1000
    counts: tuple[int, ...] | None = None
    inner: str = "srste"
    inner_options: Any = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_count("steps", self.steps, 1))
        if self.counts is not None:
            if isinstance(self.counts, (str, bytes)) or not hasattr(self.counts, "__iter__") \
                    or not list(self.counts):
                raise ValueError(f"counts must be a list of kept counts such as [8, 4], got "
                                 f"{self.counts!r}")
            counts = tuple(check_count("each of counts", c, 1) for c in self.counts)
            if any(a < b for a, b in zip(counts, counts[1:], strict=False)):
                raise ValueError(f"counts must not increase, got {list(counts)}")
            object.__setattr__(self, "counts", counts)
        if self.inner not in INNER:
            raise ValueError(f"inner must be one of {', '.join(map(repr, INNER))} (methods "
                             f"whose mask follows the scores), got {self.inner!r}")
        options = self.inner_options
        if isinstance(options, dict):
            options = tuple(sorted(options.items()))
        if not isinstance(options, tuple) or not all(
                isinstance(pair, tuple) and len(pair) == 2 for pair in options):
            raise ValueError(f"inner_options must be a dict of {self.inner!r}'s options, got "
                             f"{self.inner_options!r}")
        object.__setattr__(self, "inner_options", options)
        self.inner_method  # its options are checked now, not at the first step  # noqa: B018

    @functools.cached_property
    def inner_method(self) -> Method:
        return make_method(METHODS.get(self.inner), **dict(self.inner_options))

    def options(self) -> dict[str, Any]:
        options = super().options()
        options["inner_options"] = dict(self.inner_options)
        if self.counts is not None:
            options["counts"] = list(self.counts)
        return options

    # -- the schedule ------------------------------------------------------------------------------
    def stages(self, n: int, m: int) -> tuple[int, ...]:
        """The kept counts before the layer's ``n`` (default M, M/2, ... while above n)."""
        if self.counts is not None:
            return tuple(c for c in self.counts if c > n)
        stages, k = [], m
        while k > n:
            stages.append(k)
            k //= 2
        return tuple(stages)

    def kept(self, step: int, n: int, m: int) -> int:
        """How many entries per group the training forward keeps during step ``step``."""
        stages = self.stages(n, m)
        if step >= self.steps or not stages:
            return n
        return stages[step * len(stages) // self.steps]

    def _geometry(self, w) -> tuple[int, int]:
        n, m = getattr(w.pattern, "n", None), getattr(w.pattern, "m", None)
        if not isinstance(n, int) or not isinstance(m, int):
            raise ValueError(f"{w.name}: method 'gradual' needs a pattern with N and M "
                             f"('2:4', 'flat:2:4', 'transposable:2:4'), got {w.pattern}")
        return n, m

    def scheduled_mask(self, w, kept: int) -> torch.Tensor:
        """The mask of a stage keeping ``kept`` per group."""
        n, m = self._geometry(w)
        if kept >= m:
            return torch.ones_like(w.mask)
        if kept == n:
            return w.mask
        return dataclasses.replace(w.pattern, n=kept).mask(self.inner_method.score(w))

    # -- the method hooks: inner's, with the scheduled mask in forward ----------------------------
    def score(self, w) -> torch.Tensor:
        return self.inner_method.score(w)

    def initial_mask(self, w) -> torch.Tensor:
        self._geometry(w)
        return self.inner_method.initial_mask(w)

    def refresh(self, w) -> torch.Tensor:
        return self.inner_method.refresh(w)

    def masked_weight(self, w) -> torch.Tensor:
        inner = self.inner_method
        n, m = self._geometry(w)
        kept = self.kept(steps_taken(w), n, m) if training(w) else n
        if kept == n:
            return inner.masked_weight(w)
        return inner.masked_weight(_Scheduled(w, self.scheduled_mask(w, kept)))

    def before_step(self, weights, step: Step) -> None:
        self.inner_method.before_step(weights, step)

    def after_step(self, weights, step: Step) -> None:
        self.inner_method.after_step(weights, step)

    def steps_matter(self) -> bool:
        return self.inner_method.steps_matter()
