"""The one reset of optimizer state for weights that come back: a re-grown weight (prune and
grow, GaP) or channel (CHEX) starts with fresh momentum and Adam moments, so what gathered
while it was pruned cannot move its new value."""

from __future__ import annotations

import torch


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor,
                          where: torch.Tensor) -> None:
    """Zero every state tensor ``optimizer`` keeps for ``param`` (of ``param``'s shape: the
    step count and other scalars stay) at the entries where the bool ``where`` is True."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)
