"""STEP (Lu et al., ICML 2023, "STEP: Learning N:M Structured Sparsity Masks from Scratch with
Precondition"): SR-STE for Adam.

Under Adam, SR-STE's masked gradients distort the second-moment estimate ``exp_avg_sq``
early on, and accuracy drops. STEP trains in two phases:

1. precondition: plain dense Adam (forward uses the dense weight; no SR-STE term) until the
   variance estimate has settled;
2. mask learning: from the switch on, each sparse weight's bias-corrected second moment is
   frozen at its value at the switch, and training continues as SR-STE (masked forward,
   straight-through gradient, the ``decay`` term) with Adam dividing by the frozen estimate.

The switch comes at ``switch_step`` if given; otherwise by an AutoSwitch rule. This is our
reading of the paper's AutoSwitch (which tests when the sampled variance changes
concentrate), not a copy of it: after every step we sample the relative change of the sparse
weights' bias-corrected ``exp_avg_sq``, ``sum |v_t - v_(t-1)| / sum |v_t|``; we switch once at
least ``min_steps`` steps are done and the mean of the last ``window`` samples is at most
``tolerance * (1 - beta2)`` (in a steady state the estimate still moves by about
``1 - beta2`` of itself per step), or at ``max_steps`` at the latest. ``statistic="absolute"``
is the paper's AutoSwitch statistic instead: the mean over the sparse weights' entries of
``|v_t - v_(t-1)|`` of the raw ``exp_avg_sq``, switching once the mean of the last ``window``
samples is at most ``epsilon`` (the paper's window is ``1 / (1 - beta2)`` steps). It depends
on the scale of the gradients, which is why the relative rule is the default.

What is frozen: by default (``frozen="corrected"``) the bias-corrected second moment
``exp_avg_sq / (1 - beta2^t)`` at the switch, so that Adam's step size carries on where the
dense phase left it. The re-implementation of STEP in thu-ml's 2:4 pre-training code (the
authors published no code we could find) freezes the raw ``exp_avg_sq`` instead and divides
by ``sqrt(v) + eps^0.75``: ``frozen="raw"`` gives exactly that rule. The two differ by the
factor ``1 - beta2^t`` at the switch, which matters for an early switch (at step 100 with
beta2 = 0.999 the raw estimate is 0.095 of the corrected one, so the first sparse steps are
~3.2x larger than Adam's last dense ones); that jump is why the corrected estimate is the
default.

Freezing works with ``torch.optim.Adam`` / ``AdamW`` as created by the user (found through the
step's optimizer, inside wrappers that keep theirs in ``.optimizer``): before each update the
method writes into ``exp_avg_sq`` the value that Adam's own update turns into
``frozen * (1 - beta2 ** t)``, so Adam divides by the frozen estimate (up to rounding). Only
the sparse weights' estimates are frozen; biases and dense layers train with plain Adam.
Other optimizers and ``amsgrad=True`` are refused with an error. In evaluation mode forward
uses ``W * mask`` in both phases. The phase and the frozen estimates are saved in the
handle's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._progress import check_count, check_number, training
from .ste import SRSTE

FROZEN = "step_frozen_v"  # per weight: the estimate Adam divides by (sqrt + eps) from the switch
PREVIOUS = "step_previous_v"  # per weight, before the switch: last step's, for AutoSwitch
# Keep the pre-compensated estimate's update from rounding below 0 (a NaN in sqrt).
_FLOOR = 1.0 - 1e-6
STATISTICS = ("relative", "absolute")
FROZEN_RULES = ("corrected", "raw")


def adam_of(optimizer: Any) -> torch.optim.Adam:
    """The ``torch.optim.Adam`` (or ``AdamW``) doing the step, or a ``ValueError``."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, torch.optim.Adam):
            if any(group.get("amsgrad") for group in seen.param_groups):
                raise ValueError("method 'step' does not support amsgrad=True (it freezes "
                                 "exp_avg_sq, which amsgrad replaces by its running maximum)")
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    name = "a hand-written update loop" if optimizer is None else type(optimizer).__name__
    raise ValueError(f"method 'step' needs torch.optim.Adam or torch.optim.AdamW (it freezes "
                     f"Adam's second moment exp_avg_sq), got {name}; use 'srste' for other "
                     "optimizers")


def _group_of(adam: torch.optim.Adam, param: torch.Tensor) -> dict:
    for group in adam.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("method 'step': a sparse weight is not in the optimizer's param groups")


def _bias_corrected(state: dict, beta2: float) -> torch.Tensor:
    return state["exp_avg_sq"] / (1.0 - beta2 ** float(state["step"]))


@dataclass(frozen=True)
class STEP(SRSTE):
    """Dense Adam until the second moment settles, then SR-STE with it frozen."""

    name: ClassVar[str] = "step"
    optimizers: ClassVar[tuple[type[torch.optim.Optimizer], ...]] = (torch.optim.Adam,)
    switch_step: int | None = None
    tolerance: float = 2.0
    window: int = 10
    min_steps: int = 10
    max_steps: int = 10000
    statistic: str = "relative"
    epsilon: float = 1e-8
    frozen: str = "corrected"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.switch_step is not None:
            object.__setattr__(self, "switch_step", check_count("switch_step",
                                                                self.switch_step, 1))
        object.__setattr__(self, "tolerance", check_number("tolerance", self.tolerance, 0))
        for name in ("window", "min_steps", "max_steps"):
            object.__setattr__(self, name, check_count(name, getattr(self, name), 1))
        if self.statistic not in STATISTICS:
            raise ValueError(f"method 'step': statistic must be one of {STATISTICS}, got "
                             f"{self.statistic!r}")
        object.__setattr__(self, "epsilon", check_number("epsilon", self.epsilon, 0))
        if self.frozen not in FROZEN_RULES:
            raise ValueError(f"method 'step': frozen must be one of {FROZEN_RULES}, got "
                             f"{self.frozen!r}")

    @staticmethod
    def switched(w) -> bool:
        return FROZEN in w.state

    def masked_weight(self, w) -> torch.Tensor:
        if training(w) and not self.switched(w):
            return w.dense.view_as(w.dense)  # the precondition phase is dense
        return super().masked_weight(w)

    # -- the step --------------------------------------------------------------------------------
    def before_step(self, weights, step) -> None:
        adam = adam_of(step.optimizer)
        weights = [w for w in weights if self.switched(w)]
        super().before_step(weights, step)  # SR-STE's term, mask-learning phase only
        for w in weights:
            self._freeze_second_moment(adam, w)

    def _freeze_second_moment(self, adam: torch.optim.Adam, w) -> None:
        """Set ``exp_avg_sq`` so that this step's Adam update leaves it at the frozen value."""
        param = w.dense
        state, grad = adam.state.get(param), param.grad
        if not state or grad is None:
            return
        group = _group_of(adam, param)
        beta2 = float(group["betas"][1])
        with torch.no_grad():
            g = -grad if group.get("maximize") else grad
            decoupled = group.get("decoupled_weight_decay", isinstance(adam, torch.optim.AdamW))
            if group["weight_decay"] and not decoupled:
                g = g + group["weight_decay"] * param  # Adam's L2 enters the moments
            fresh = (1.0 - beta2) * g * g
            upcoming = float(state["step"]) + 1
            target = w.state[FROZEN].to(fresh.dtype) * (1.0 - beta2 ** upcoming)
            before = torch.maximum((target - fresh) / beta2, -_FLOOR * fresh / beta2)
            state["exp_avg_sq"].copy_(before)

    def after_step(self, weights, step) -> None:
        adam = adam_of(step.optimizer)
        waiting = [w for w in weights if not self.switched(w) and adam.state.get(w.dense)]
        if not waiting:
            return
        done = step.index + 1
        if self.switch_step is not None:
            if done >= self.switch_step:
                self._switch(adam, waiting, step, done)
            return
        changes = step.state.setdefault("changes", [])
        change = self._variance_change(adam, waiting)
        if change is not None:
            changes.append(change)
            del changes[:-self.window]
        beta2 = float(_group_of(adam, waiting[0].dense)["betas"][1])
        bound = self.epsilon if self.statistic == "absolute" else self.tolerance * (1.0 - beta2)
        settled = (len(changes) == self.window and done >= self.min_steps
                   and sum(changes) / self.window <= bound)
        if settled or done >= self.max_steps:
            self._switch(adam, waiting, step, done)

    def _variance_change(self, adam: torch.optim.Adam, weights) -> float | None:
        """``sum |v_t - v_(t-1)| / sum |v_t|`` of the bias-corrected estimate over ``weights``
        (``"absolute"``: the mean ``|v_t - v_(t-1)|`` of the raw one); None on the first
        step."""
        moved, size, first = 0.0, 0.0, False
        absolute = self.statistic == "absolute"
        for w in weights:
            beta2 = float(_group_of(adam, w.dense)["betas"][1])
            state = adam.state[w.dense]
            current = (state["exp_avg_sq"] if absolute else _bias_corrected(state, beta2))
            current = current.detach()
            previous = w.state.get(PREVIOUS)
            if previous is None:
                first = True
            else:
                moved += float((current - previous).abs().sum())
                size += current.numel() if absolute else float(current.abs().sum())
            w.state[PREVIOUS] = current.clone()
        if first or size == 0:
            return None
        return moved / size

    def _switch(self, adam: torch.optim.Adam, weights, step, done: int) -> None:
        for w in weights:
            group = _group_of(adam, w.dense)
            state = adam.state[w.dense]
            if self.frozen == "raw":
                # The reference divides by sqrt(v_raw) + eps^0.75; Adam divides by
                # sqrt(frozen) + eps, so freeze the square of the difference's root.
                eps = float(group["eps"])
                root = state["exp_avg_sq"].detach().sqrt() + (eps ** 0.75 - eps)
                w.state[FROZEN] = root * root
            else:
                w.state[FROZEN] = _bias_corrected(state, float(group["betas"][1])).detach().clone()
            w.state.pop(PREVIOUS, None)
        step.state["switched_at"] = done
        step.state.pop("changes", None)
