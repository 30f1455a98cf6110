"""GaP: scheduled grow-and-prune (Ma et al., ICLR 2022).

The sparse layers a GaP method drives are split into ``parts`` contiguous partitions (in model
order; one per layer if there are fewer layers). Training runs ``parts * cycles`` grow phases
of ``phase_steps`` optimizer steps each: in a phase one partition is dense (its mask all kept;
the weights grown back start at exactly 0 with fresh optimizer state) while the others train
with their fixed masks; at the end of the phase that partition is pruned back to its pattern
by magnitude (any pattern: N:M, unstructured, block) and the next one grows. The order of the
partitions is ``"cyclic"`` (0, 1, ..., K-1, 0, ...) or ``"random"`` (a new seeded permutation
every cycle). After the last grow phase every partition is sparse and training continues with
the masks fixed (the final fine-tuning phase). Pruned weights are exactly 0 and get no
gradient, as with ``fixed``.

During its dense phase a partition's masks keep everything, so ``check`` reports its layers as
breaking the pattern until it is pruned back; a run must end after the grow phases
(``parts * cycles * phase_steps`` steps) for the result to be sparse everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.optim_state import reset_optimizer_state
from .base import Method, Step, kept_gradient_only
from .prune_grow import _seeded

ORDERS = ("cyclic", "random")


@dataclass(frozen=True)
class GaP(Method):
    """Grow one partition dense per phase, prune it back, then fine-tune with fixed masks."""

    name: ClassVar[str] = "gap"
    gradient: ClassVar[str] = "kept"
    masks_beyond_pattern: ClassVar[bool] = True  # a partition's dense phase
    parts: int = 4
    phase_steps: int = 1000
    cycles: int = 1
    order: str = "cyclic"
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("parts", "phase_steps", "cycles"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gap: {field} must be an integer >= 1, got {value!r}")
        if self.order not in ORDERS:
            raise ValueError(f"gap: order must be one of {ORDERS}, got {self.order!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"gap: seed must be an integer, got {self.seed!r}")

    def grow_phases(self, parts: int) -> int:
        return parts * self.cycles

    def dense_part(self, phase: int, parts: int | None = None) -> int | None:
        """The partition grown in grow phase ``phase`` (``None``: the final fixed phase) when
        there are ``parts`` partitions (default ``self.parts``; fewer when fewer layers)."""
        parts = self.parts if parts is None else parts
        if phase >= self.grow_phases(parts):
            return None
        cycle, slot = divmod(phase, parts)
        if self.order == "cyclic":
            return slot
        return int(torch.randperm(parts, generator=_seeded(self.seed, "gap", cycle))[slot])

    @staticmethod
    def partition(weights, parts: int) -> dict[str, int]:
        """``{weight name: partition}``: contiguous runs of the weights in model order."""
        def position(w):
            order = list(w.handle.weights) if w.handle is not None else []
            return (order.index(w.name) if w.name in order else len(order), w.name)

        ordered = sorted(weights, key=position)
        count = min(parts, len(ordered))
        return {w.name: i * count // len(ordered) for i, w in enumerate(ordered)}

    # -- masks ---------------------------------------------------------------------------------
    def refresh(self, w):
        return w.enforce_mask()

    def masked_weight(self, w):
        return kept_gradient_only(w)

    def before_step(self, weights, step: Step) -> None:
        index = step.index
        count = min(self.parts, len(weights))
        if index % self.phase_steps == 0 and index // self.phase_steps <= self.grow_phases(count):
            phase = index // self.phase_steps
            parts = self.partition(weights, self.parts)
            previous = self.dense_part(phase - 1, count) if phase else None
            current = self.dense_part(phase, count)
            for w in weights:
                part = parts[w.name]
                if part == previous and part != current:
                    self._prune_back(w, step)
                elif part == current and part != previous:
                    self._grow_dense(w, step)
            step.state["phase"] = phase
        for w in weights:  # gradients computed before a prune must not move pruned weights
            if w.dense.grad is not None:
                w.dense.grad.masked_fill_(~w.mask, 0)

    def _grow_dense(self, w, step: Step) -> None:
        grown = ~w.mask
        with torch.no_grad():
            w.dense.masked_fill_(grown, 0)
            w.mask.fill_(True)  # dense for this phase: beyond the pattern on purpose
        reset_optimizer_state(step.optimizer, w.dense, grown)
        w.refresh()

    def _prune_back(self, w, step: Step) -> None:
        mask = w.pattern.mask(w.dense.detach().abs())
        w.set_mask(mask)
        reset_optimizer_state(step.optimizer, w.dense, ~mask)
        w.refresh()
