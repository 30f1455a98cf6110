"""Prune-and-grow (dynamic sparse) training: SET, RigL and MEST on one engine.

Every ``every`` optimizer steps (ΔT) the engine drops the weakest active weights and grows as
many pruned ones, so the sparsity stays fixed while the mask explores. Per exchange:

* how many: ``fraction`` (α) of the active weights of each budget unit
  (:mod:`nmsparse.methods.mutation`: an N:M group, a whole tensor, a block grid, or all layers
  sharing a ``"global:D"`` budget), rounded by ``rounding`` (``"half-up"``, or ``"floor"`` as
  RigL's reference code truncates), decayed by ``schedule``: ``"cosine"``
  (α_t = α/2 (1 + cos(π t / stop)), RigL) or ``"constant"`` (SET); no mutation after step
  ``stop`` (``stop=0``: never stops, and ``"cosine"`` then stays at α);
* what drops: the lowest ``|w| + gradient_weight * |g|`` (``gradient_weight=0``: magnitude);
  ``signed=True`` (SET's rule) drops α of the positive weights and α of the negative ones,
  each set ranked on its own (an active weight of exactly 0 counts as positive);
  ``rounding="sorted"`` (with ``signed``) takes the counts SET's reference code derives from
  indices into the sorted weights of the budget (n entries, ``p`` positive, ``q`` negative, the
  rest 0): ``q - int((1 - α) q)`` negatives and ``int(min(n - 1, n - p + α p)) - (n - p) + 1``
  positives (``int(α p) + 1`` but for float rounding and the cap at ``p``; one more than α p,
  since it keeps only the weights strictly above the one at that index), and every active
  weight of exactly 0 (neither above nor below the thresholds);
* what grows: ``grow="random"`` (seeded by ``seed``, the step and the layer name, so a resumed
  run grows the same weights), ``"gradient"`` (largest ``|g|`` of the dense gradient, RigL) or
  ``"momentum"`` (largest ``|EMA of g|`` with factor ``momentum``, sparse momentum);
* where it grows: among the weights pruned before the exchange, or with ``regrow=True`` (the
  RigL and MEST reference code) among every weight not kept after the drop, so a weight
  just dropped may be grown straight back; it then stays as it was (value and optimizer
  state), which is what the reference does;
* N:M: a weight dropped in a group is replaced inside the same group, so the pattern holds
  after every exchange;
* grown weights start at exactly 0 and their optimizer state (momentum buffer, Adam moments:
  every optimizer state tensor shaped like the weight) is reset, as is the state of the
  dropped ones.

Defaults per method follow the authors' code (docs/fidelity.md): RigL floors the count and
regrows; MEST drops by ``|w|`` alone (its run scripts never set the gradient weight) and
regrows; SET drops by sign. The engine's own defaults (half-up, no regrowth, one magnitude
ranking) are what the registered methods had before and stay available as options.

Between exchanges the mask is fixed: pruned weights stay exactly 0 and get no update (their
gradient is zeroed in ``before_step``). The forward passes the gradient straight through to
every entry so that ``before_step`` sees the dense gradient the growth criteria need.

``soft=True`` (MEST's soft memory bound, "grow first, prune later"): an exchange first only
grows; ``settle`` steps later (0: ``every // 2``) the same number of weights is dropped by the
drop score among all active ones, the new ones included. In between the layers keep more than
their pattern allows (``check`` reports it); the pattern holds again after the drop.

Papers: SET (Mocanu et al., Nature Communications 2018), RigL (Evci et al., ICML 2020), MEST
(Yuan et al., NeurIPS 2021). Step counts come from the handle (``Step.index``), so a resumed
run mutates at the same steps as one never stopped.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.optim_state import reset_optimizer_state
from ..patterns import NM, Block, GlobalUnstructured, Unstructured
from .base import Method, Step, straight_through
from .mutation import Units, drop_plan, grow_plan, ranks_in_rows

GROWTH = ("random", "gradient", "momentum")
SCHEDULES = ("cosine", "constant")
ROUNDINGS = ("half-up", "floor", "sorted")
_GRAD = "_prune_grow_grad"  # |g| kept from before_step to after_step of one step
_EMA = "grad_ema"


def _seeded(seed: int, *parts: object) -> torch.Generator:
    key = zlib.crc32(":".join(map(str, (seed, *parts))).encode())
    return torch.Generator().manual_seed(key)


@dataclass(frozen=True)
class PruneGrow(Method):
    """The prune-and-grow engine; the registered methods set its defaults."""

    # exchanges need a budget per unit (an N:M group, a row, a tile, the whole tensor)
    patterns: ClassVar[tuple] = (NM, Unstructured, Block)
    every: int = 100
    fraction: float = 0.3
    schedule: str = "cosine"
    stop: int = 0
    grow: str = "random"
    gradient_weight: float = 0.0
    momentum: float = 0.9
    init: str = "random"
    soft: bool = False
    settle: int = 0
    seed: int = 0
    rounding: str = "half-up"
    regrow: bool = False
    signed: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{self.name}: {what}")

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        need(integer(self.every) and self.every >= 1, f"every must be an integer >= 1, got "
             f"{self.every!r}")
        need(isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 1,
             f"fraction must be a number in [0, 1], got {self.fraction!r}")
        need(self.schedule in SCHEDULES,
             f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(integer(self.stop) and self.stop >= 0, f"stop must be an integer >= 0 (0: never), "
             f"got {self.stop!r}")
        need(self.grow in GROWTH, f"grow must be one of {GROWTH}, got {self.grow!r}")
        need(isinstance(self.gradient_weight, (int, float)) and self.gradient_weight >= 0,
             f"gradient_weight must be a number >= 0, got {self.gradient_weight!r}")
        need(isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1,
             f"momentum must be a number in [0, 1), got {self.momentum!r}")
        need(self.init in ("random", "magnitude"),
             f"init must be 'random' or 'magnitude', got {self.init!r}")
        need(isinstance(self.soft, bool), f"soft must be true or false, got {self.soft!r}")
        need(integer(self.settle) and 0 <= self.settle < self.every,
             f"settle must be an integer in [0, every) (0: every // 2), got {self.settle!r}")
        need(not self.soft or self.settle_steps >= 1, "soft needs every >= 2 (it grows, then "
             "prunes settle steps later)")
        need(integer(self.seed), f"seed must be an integer, got {self.seed!r}")
        need(self.rounding in ROUNDINGS,
             f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        need(isinstance(self.regrow, bool), f"regrow must be true or false, got {self.regrow!r}")
        need(isinstance(self.signed, bool), f"signed must be true or false, got {self.signed!r}")
        need(self.rounding != "sorted" or self.signed, "rounding='sorted' (SET's reference "
             "counts, one per sign) needs signed=true")

    # -- schedule ------------------------------------------------------------------------------
    def fraction_at(self, step: int) -> float:
        """The mutation fraction of an exchange after ``step`` optimizer steps (0 after
        ``stop``)."""
        if self.stop and step > self.stop:
            return 0.0
        if self.schedule == "cosine" and self.stop:
            return self.fraction / 2 * (1 + math.cos(math.pi * step / self.stop))
        return float(self.fraction)

    def mutates_after(self, index: int) -> bool:
        """Whether the exchange runs after the step with this index (0-based)."""
        done = index + 1
        return done % self.every == 0 and self.fraction_at(done) > 0

    def _needs_gradient(self) -> bool:
        return self.grow == "gradient" or self.gradient_weight > 0

    # -- masks ---------------------------------------------------------------------------------
    def initial_mask(self, w):
        Units.of(w.pattern, [w.dense.shape])  # a pattern exchanges cannot keep fails here
        if self.init == "magnitude":
            return w.pattern.mask(w.dense.detach().abs())
        scores = torch.rand(w.dense.shape, generator=_seeded(self.seed, "init", w.name))
        return w.pattern.mask(scores).to(w.dense.device)

    def refresh(self, w):
        return w.enforce_mask()  # the mask changes only in exchanges

    def masked_weight(self, w):
        return straight_through(w)  # before_step needs the dense gradient; it zeroes the rest

    # -- the step ------------------------------------------------------------------------------
    def before_step(self, weights, step: Step) -> None:
        index = step.index
        keep_grad = self._needs_gradient() and (
            self.mutates_after(index) or (self.soft and self._settles_after(index)))
        for w in weights:
            grad = w.dense.grad
            if grad is None:
                continue
            with torch.no_grad():
                if self.grow == "momentum":
                    ema = w.state.get(_EMA)
                    ema = torch.zeros_like(grad) if ema is None else ema
                    w.state[_EMA] = ema.mul_(self.momentum).add_(grad, alpha=1 - self.momentum)
                if keep_grad:
                    w.state[_GRAD] = grad.detach().abs().clone()
                grad.masked_fill_(~w.mask, 0)

    @property
    def settle_steps(self) -> int:
        return self.settle or self.every // 2

    def _settles_after(self, index: int) -> bool:
        grown_at = index + 1 - self.settle_steps
        return grown_at > 0 and grown_at % self.every == 0 and self.fraction_at(grown_at) > 0

    def after_step(self, weights, step: Step) -> None:
        index = step.index
        try:
            groups = self._groups(weights)
            if self.soft and self._settles_after(index):
                for key, members in groups.items():
                    self._settle(key, members, step)
            if self.mutates_after(index):
                fraction = self.fraction_at(index + 1)
                for key, members in groups.items():
                    self._mutate(key, members, step, fraction)
                step.state["exchanges"] = int(step.state.get("exchanges", 0)) + 1
        finally:
            for w in weights:
                w.state.pop(_GRAD, None)

    def _groups(self, weights) -> dict[str, list]:
        """Weights that share one budget: a ``"global:D"`` pattern's layers together, every
        other weight alone (sorted by name, so the order never depends on the optimizer)."""
        groups: dict[str, list] = {}
        for w in sorted(weights, key=lambda w: w.name):
            shared = isinstance(w.pattern, GlobalUnstructured)
            groups.setdefault(f"global:{w.pattern}" if shared else w.name, []).append(w)
        return groups

    def _scores(self, key: str, members: list, units: Units, step: Step):
        """``(drop, grow)`` scores in unit space."""
        magnitude = [w.dense.detach().abs() for w in members]
        grads = [w.state.get(_GRAD) for w in members]
        drop = units.view(magnitude)
        if self.gradient_weight > 0 and all(g is not None for g in grads):
            drop = drop + self.gradient_weight * units.view(grads)
        if self.grow == "gradient" and all(g is not None for g in grads):
            grow = units.view(grads)
        elif self.grow == "momentum" and all(w.state.get(_EMA) is not None for w in members):
            grow = units.view([w.state[_EMA].abs() for w in members])
        else:  # random, or no gradient seen yet
            generator = _seeded(self.seed, "grow", step.index, key)
            grow = torch.rand(drop.shape, generator=generator).to(drop.device)
        return drop, grow

    def count(self, fraction: float, active: int) -> int:
        """How many of ``active`` weights one exchange drops (``"sorted"``: at least this
        many, see :meth:`signed_counts`)."""
        if self.rounding in ("floor", "sorted"):
            return math.floor(fraction * active)
        return math.floor(fraction * active + 0.5)

    def signed_counts(self, fraction: float, positive: int, negative: int, size: int
                      ) -> tuple[int, int]:
        """(positives, negatives) one signed exchange drops from a budget of ``size``
        entries. ``"sorted"``: the indices of SET's reference (``rewireMask``) into the
        ascending weights, whose first positive sits at ``size - positive``."""
        if self.rounding != "sorted":
            return self.count(fraction, positive), self.count(fraction, negative)
        first_positive = size - positive
        threshold = int(min(size - 1, first_positive + fraction * positive))
        return (max(0, threshold - first_positive + 1),
                negative - int((1 - fraction) * negative))

    def _dropped(self, members: list, units: Units, active: torch.Tensor, drop: torch.Tensor,
                 fraction: float) -> torch.Tensor:
        """Bool ``(units, size)``: what this exchange drops."""
        if not self.signed:
            return drop_plan(active, drop, self.count(fraction, int(active.sum())))
        values = units.view([w.dense.detach() for w in members])
        sorted_counts = self.rounding == "sorted"
        positive = values > 0 if sorted_counts else values >= 0
        negative = active & (values < 0)
        counts = self.signed_counts(fraction, int((active & positive).sum()),
                                    int(negative.sum()), active.numel())
        # the reference keeps only weights strictly beyond its thresholds: an active 0 goes
        dropped = active & (values == 0) if sorted_counts else torch.zeros_like(active)
        for side, count in zip((active & positive, negative), counts, strict=True):
            dropped |= drop_plan(side, drop, count)  # each sign ranked on its own
        # A unit can only drop as many as it has pruned slots to grow into (drop_plan's cap,
        # which each sign alone does not see).
        free = (~active).sum(-1, keepdim=True)
        inf = torch.tensor(float("inf"), dtype=drop.dtype, device=drop.device)
        return dropped & (ranks_in_rows(torch.where(dropped, drop, inf), False) < free)

    def _mutate(self, key: str, members: list, step: Step, fraction: float) -> None:
        units = Units.of(members[0].pattern, [w.dense.shape for w in members])
        active = units.view([w.mask for w in members], reduce="any")
        # "sorted" drops at least one positive weight whenever α > 0, as its reference does
        if fraction == 0 or (self.count(fraction, int(active.sum())) == 0
                             and self.rounding != "sorted"):
            return
        drop, grow = self._scores(key, members, units, step)
        dropped = self._dropped(members, units, active, drop, fraction)
        if self.soft:  # grow now, drop the same number per unit after `settle` steps
            planned = dropped.sum(-1)
            grown = grow_plan(active, grow, planned)
            step.state.setdefault("pending", {})[key] = planned.cpu()
            self._apply(members, units, active | grown, step, check=False)
            return
        kept = active & ~dropped
        # regrow: a weight just dropped competes for growth too (and stays unchanged if grown)
        grown = grow_plan(kept if self.regrow else active, grow, dropped.sum(-1))
        self._apply(members, units, kept | grown, step)

    def _settle(self, key: str, members: list, step: Step) -> None:
        planned = step.state.get("pending", {}).pop(key, None)
        if planned is None:
            return
        units = Units.of(members[0].pattern, [w.dense.shape for w in members])
        active = units.view([w.mask for w in members], reduce="any")
        drop, _ = self._scores(key, members, units, step)
        inf = torch.tensor(float("inf"), dtype=drop.dtype, device=drop.device)
        ranks = ranks_in_rows(torch.where(active, drop, inf), descending=False)
        dropped = active & (ranks < planned.to(ranks.device).reshape(-1, 1))
        self._apply(members, units, active & ~dropped, step)

    def _apply(self, members: list, units: Units, new_units: torch.Tensor, step: Step,
               check: bool = True) -> None:
        """Install the new masks: changed entries get weight 0 and fresh optimizer state."""
        for w, mask in zip(members, units.unview(new_units), strict=True):
            mask = mask.to(w.mask.device)
            changed = mask ^ w.mask
            if check:
                w.set_mask(mask)
            else:  # the soft memory bound keeps more than the pattern until it settles
                with torch.no_grad():
                    w.mask.copy_(mask)
            with torch.no_grad():
                w.dense.masked_fill_(changed, 0)
            reset_optimizer_state(step.optimizer, w.dense, changed)
            w.refresh()


@dataclass(frozen=True)
class SET(PruneGrow):
    """Sparse Evolutionary Training: drop α of the positive weights nearest zero and α of the
    negative ones (``signed``, the paper's rule), grow at random, fixed α.

    Default as in the paper, α of each sign rounded half up; ``rounding="sorted"`` gives the
    exact counts of the reference code (one more positive than α p, every active 0 dropped:
    artefacts of its thresholds on the sorted weights, not the paper's α, hence not the
    default); ``signed=False`` ranks all weights by ``|w|`` together."""

    name: ClassVar[str] = "set"
    schedule: str = "constant"
    signed: bool = True


@dataclass(frozen=True)
class RigL(PruneGrow):
    """Rigged Lottery: drop the smallest magnitudes, grow the largest dense gradients, cosine
    decay of α until ``stop``."""

    name: ClassVar[str] = "rigl"
    grow: str = "gradient"
    # The reference code (google-research/rigl) truncates the drop count and lets growth pick
    # a weight it has just dropped, which then keeps its value.
    rounding: str = "floor"
    regrow: bool = True


@dataclass(frozen=True)
class MEST(PruneGrow):
    """Memory-economic sparse training with elastic mutation: drop by ``|w| + λ|g|``
    (``gradient_weight`` = λ), grow at random, α decaying; ``soft=True`` grows first and
    prunes ``settle`` steps later.

    λ defaults to 0 and growth may pick a just-dropped weight (``regrow``), as in the
    authors' run scripts, which never set λ; the paper's λ|g| term is ``gradient_weight``."""

    name: ClassVar[str] = "mest"
    gradient_weight: float = 0.0
    regrow: bool = True
