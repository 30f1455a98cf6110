"""Optimizer hooks: the SR-STE term and the mask refresh happen inside ``optimizer.step()``.

Two global ``torch.optim`` step hooks, installed once by the first ``sparsify`` call:

* before a step: add ``decay * (1 - mask) * W`` to the gradient of each sparse weight the
  optimizer holds. At that moment the gradient is the true one: DDP has averaged it across
  ranks, gradient accumulation has summed every micro-batch, a layer called twice has both
  contributions, and ``GradScaler.step`` has unscaled it. So the term is applied exactly
  once per optimizer step, never multiplied or divided by any of those (the official SR-STE
  code adds it inside autograd backward and gets all four wrong).
* after a step: recompute the masks of the weights that changed, checking all layers for
  NaN/Inf with one host sync.

Works with every optimizer derived from ``torch.optim.Optimizer``; a hand-written update loop
can call :meth:`SparsityHandle.add_decay_to_grads` and :meth:`SparsityHandle.refresh`.
"""

from __future__ import annotations

import torch

from .layers import STATE_ATTRIBUTE, SparseWeight, raise_if_nonfinite

_installed: tuple | None = None


def sparse_weights_of(optimizer: torch.optim.Optimizer) -> list[SparseWeight]:
    states = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = getattr(param, STATE_ATTRIBUTE, None)
            if state is not None and state.weight is param:
                states.append(state)
    return states


def add_decay(states: list[SparseWeight]) -> None:
    for state in states:
        state.add_decay_to_grad()


def refresh_stale(states: list[SparseWeight]) -> None:
    stale = [state for state in states if not state.is_fresh()]
    raise_if_nonfinite(stale, [state.refresh() for state in stale])


def _before_step(optimizer, args, kwargs) -> None:
    add_decay(sparse_weights_of(optimizer))


def _after_step(optimizer, args, kwargs) -> None:
    refresh_stale(sparse_weights_of(optimizer))


def install() -> None:
    """Register the global step hooks (idempotent)."""
    global _installed
    if _installed is None:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        _installed = (register_optimizer_step_pre_hook(_before_step),
                      register_optimizer_step_post_hook(_after_step))
