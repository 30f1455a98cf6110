"""Reweighted dynamic regularization (after the unified weight-compression framework of
arXiv 2004.05531), then hard pruning and masked retraining.

Phase 1 (``"reweighted"``) adds, once per optimizer step on the final gradient, the gradient
of ``penalty * sum_g P_g ||W_g||^2`` with ``P_g = 1 / (||W_g||^2 + eps)`` held fixed between
re-estimations every ``update_every`` steps (step 0 included). Small groups get a large
coefficient and are driven to zero; large groups are barely touched. Groups (``groups``):

* ``"element"``: every weight alone;
* ``"channel"``: every output channel (row of the weight, all its inputs and kernel taps);
* ``"block:K"``: K consecutive input channels of a row at one kernel position;
* ``"nm"``: the run's N:M groups, where only the M-N smallest weights of each group (the
  ones the pattern would prune now) form the penalised group.

To keep the engine's contract (the forward weight always follows the pattern) phase 1 trains
with the straight-through estimator: forward uses ``W * mask`` with the mask following
``|W|``, the dense weight gets the whole gradient. Phase 2 (``"retrain"``) hard-prunes to the
pattern by magnitude and retrains with that fixed mask (:class:`~nmsparse.methods.Fixed`),
for as many epochs as phase 1.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import NM
from ..patterns.grouping import from_groups, to_groups
from .base import Method, Step
from .fixed import Fixed

_BLOCK = re.compile(r"block:([0-9]+)")
_GROUPS = "'element', 'channel', 'block:K' (K >= 2 consecutive inputs) or 'nm'"


def _number(name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Reweighted(Method):
    """Reweighted group penalty (``penalty``, ``eps``, ``update_every``, ``groups``), then
    hard prune and fixed-mask retraining."""

    name: ClassVar[str] = "reweighted"
    penalty: float = 1e-4
    eps: float = 1e-3
    update_every: int = 100
    groups: str = "element"

    def __post_init__(self) -> None:
        _number("penalty", self.penalty, positive=False)
        _number("eps", self.eps, positive=True)
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) \
                or self.update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {self.update_every!r}")
        match = _BLOCK.fullmatch(str(self.groups))
        if self.groups not in ("element", "channel", "nm") and \
                (match is None or int(match.group(1)) < 2):
            raise ValueError(f"unknown groups {self.groups!r}; accepted: {_GROUPS}")

    def phases(self) -> tuple[str, ...]:
        return ("sparse", "retrain")

    def phase_method(self, kind: str) -> Method:
        return Fixed() if kind == "retrain" else self

    # -- the penalty ---------------------------------------------------------------------------
    def _grouped(self, w, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (weight-shaped) as ``(..., group members)``."""
        if self.groups == "element":
            return tensor.unsqueeze(-1)
        if self.groups == "channel":
            return tensor.reshape(tensor.shape[0], -1)
        if self.groups == "nm":
            if not isinstance(w.pattern, NM):
                raise ValueError(f"{w.name}: groups='nm' needs an N:M pattern, got "
                                 f"{w.pattern}")
            return to_groups(tensor, w.pattern.m, w.pattern.layout)
        size = int(self.groups.split(":")[1])
        return to_groups(tensor, size, "in")

    def penalised(self, w) -> torch.Tensor:
        """Bool, weight-shaped: the entries the penalty acts on."""
        if self.groups != "nm":
            return torch.ones_like(w.mask)
        return ~w.mask  # the M-N smallest of each group: what the pattern prunes now

    def coefficients(self, w) -> torch.Tensor:
        """``P_g = 1 / (||W_g||^2 + eps)`` per group, from the current dense weight."""
        weight = w.dense.detach() * self.penalised(w)
        return 1.0 / (self._grouped(w, weight).square().sum(-1, keepdim=True) + self.eps)

    def _ungrouped(self, w, grouped: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_grouped`."""
        shape = w.dense.shape
        if self.groups in ("element", "channel"):
            return grouped.reshape(shape)
        return from_groups(grouped, shape, w.pattern.layout if self.groups == "nm" else "in")

    def penalty_gradient(self, w) -> torch.Tensor:
        """``2 * penalty * P_g * W`` on the penalised entries (zero elsewhere)."""
        weight = w.dense.detach()
        scaled = self._ungrouped(w, self._grouped(w, weight) * _coefficients(w))
        return 2 * self.penalty * scaled * self.penalised(w)

    def before_step(self, weights, step: Step) -> None:
        if not self.penalty:
            return
        for w in weights:
            if step.index % self.update_every == 0 or "coefficients" not in w.state:
                coefficients = self.coefficients(w)
                # saved as a list: the handle's state holds plain values (compared with ==)
                w.state["coefficients"] = coefficients.flatten().tolist()
                _cache[w] = (w.state["coefficients"], coefficients)
            grad = w.dense.grad
            if grad is not None:
                grad.add_(self.penalty_gradient(w).to(grad.dtype))


# SparseWeight -> (the saved list, the same coefficients as a tensor); rebuilt from the list
# after a resume
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _coefficients(w) -> torch.Tensor:
    saved = w.state["coefficients"]
    cached = _cache.get(w)
    if cached is not None and cached[0] is saved:
        return cached[1]
    method = w.method
    shape = method._grouped(w, w.dense.detach()).shape[:-1] + (1,)
    tensor = torch.tensor(saved, dtype=torch.float32, device=w.dense.device).reshape(shape)
    _cache[w] = (saved, tensor)
    return tensor
