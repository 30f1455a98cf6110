"""ProxSparse (Liu et al., ICML 2025, "ProxSparse: Regularized Learning of Semi-Structured
Sparsity Masks for Pretrained LLMs"): find the N:M mask by proximal gradient steps on a
regulariser that is zero exactly on N:M groups, then deploy the original weights on it.

The regulariser of a group ``w`` of M weights is the elementary symmetric polynomial
``e_{N+1}(|w|)``: the sum over every N+1 of its entries of the product of their magnitudes
(for 2:4, ``sum_{i<j<k} |w_i w_j w_k|``). It is zero if and only if at most N entries are
non-zero. Training uses the dense weight (its whole gradient, a plain forward), and after
every optimizer update the weight takes one proximal step,
``W <- argmin_V 1/2 ||V - W||^2 + lambda1 * sum_groups e_{N+1}(|V|)``, so the groups are pulled
towards N:M gradually rather than cut. ``lambda1`` is the strength of one step (the paper's
released loop applies its lambda once per optimizer step, not scaled by the learning rate).

The proximal step is solved per group as in the paper: for each support made of the s
largest ``|w|`` (s = N .. M) the objective is minimised by alternating exact coordinate
updates (each coordinate's subproblem is a one-dimensional quadratic with the closed form
``v_i = max(|w_i| - lambda1 * e_N(v without i), 0)``; smallest entry first, at most
``iterations`` sweeps, 100 as in the authors' released code, stopping once a sweep moves no entry by
more than 1e-7), and the support with the lowest objective wins (ties to the sparser); signs
are kept. For s = N the solution is the top-N projection itself, and groups that already
have at most N non-zeros are left as they are (their own proximal point).

``lambda2`` > 0 adds the paper's frozen-weight term ``lambda2 * ||(W / (W0 + epsilon *
sign(W0))) * (W - W0)||^2`` to the loss (its gradient, once per optimizer step): weights that
stay are held near their original values ``W0`` while weights going to zero are free to go.

The mask (``w.mask``, ``handle.masks()``) is the final hard projection: the N largest ``|W|``
of each group, after every step. With ``restore=True`` (the paper: no weight update once the
mask is chosen) evaluation mode and ``finalize`` use the original weights on that mask,
``W0 * mask``; ``restore=False`` keeps the trained weights, ``W * mask``. ``W0`` is saved in
the handle state (one copy of every sparse weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import NM
from ..patterns.grouping import from_groups, to_groups
from ._nm import unsharded_nm_geometry
from ._progress import check_count, check_number, training
from .base import Method, Step, kept_gradient_only

ORIGINAL = "proxsparse_original"
CHECK_EVERY, TOLERANCE = 5, 1e-7


def elementary(x: torch.Tensor, k: int) -> torch.Tensor:
    """``e_k`` of the last dimension of ``x``: the sum over every k entries of their product."""
    return _elementary_columns(list(x.unbind(-1)), k)


def _elementary_columns(columns: list[torch.Tensor], k: int) -> torch.Tensor:
    terms = [torch.ones_like(columns[0])] + [torch.zeros_like(columns[0])] * k
    for column in columns:
        for r in range(min(k, len(columns)), 0, -1):
            terms[r] = terms[r] + column * terms[r - 1]
    return terms[k]


def _support_solution(z: torch.Tensor, n: int, strength: float, iterations: int) -> torch.Tensor:
    """Alternating coordinate minimisation on the support ``z`` (magnitudes, ``(G, s)``):
    at most ``iterations`` sweeps, stopping early (checked every few sweeps) once a sweep
    changes no entry by more than 1e-7."""
    targets = list(z.unbind(-1))
    v = [torch.zeros_like(t) for t in targets]
    for sweep in range(iterations):
        previous = list(v) if sweep % CHECK_EVERY == CHECK_EVERY - 1 else None
        for i in reversed(range(len(v))):
            others = v[:i] + v[i + 1:]
            v[i] = (targets[i] - strength * _elementary_columns(others, n)).clamp_(min=0)
        if previous is not None and max(float((a - b).abs().max())
                                        for a, b in zip(v, previous, strict=True)) <= TOLERANCE:
            break
    return torch.stack(v, -1)


def _prox_groups(z: torch.Tensor, n: int, strength: float, iterations: int) -> torch.Tensor:
    """The proximal step on sorted magnitudes ``z`` ``(G, m)``, descending."""
    best = torch.zeros_like(z)
    best[:, :n] = z[:, :n]
    best_objective = 0.5 * z[:, n:].square().sum(-1)
    for size in range(n + 1, z.shape[-1] + 1):
        v = _support_solution(z[:, :size], n, strength, iterations)
        objective = (0.5 * (v - z[:, :size]).square().sum(-1)
                     + 0.5 * z[:, size:].square().sum(-1)
                     + strength * elementary(v, n + 1))
        better = objective < best_objective
        best_objective = torch.where(better, objective, best_objective)
        best[:, :size] = torch.where(better.unsqueeze(-1), v, best[:, :size])
        best[:, size:] = torch.where(better.unsqueeze(-1), 0.0, best[:, size:])
    return best


def prox_nm(weight: torch.Tensor, n: int, m: int, layout: str, strength: float,
            iterations: int = 100) -> torch.Tensor:
    """The proximal step of ``strength * sum_groups e_{n+1}(|w|)`` at ``weight`` (see the
    module docstring), in the weight's dtype. Groups with at most ``n`` non-zeros are their
    own proximal point (the regulariser and its subgradient vanish there) and are skipped."""
    groups = to_groups(weight.detach().float(), m, layout)
    flat = groups.reshape(-1, m)
    result = flat.clone()
    active = ((flat != 0).sum(-1) > n).nonzero().squeeze(-1)
    if strength > 0 and active.numel():
        z, order = flat[active].abs().sort(dim=-1, descending=True, stable=True)
        magnitudes = torch.zeros_like(z).scatter_(
            -1, order, _prox_groups(z, n, strength, iterations))
        result[active] = magnitudes * flat[active].sign()
    return from_groups(result.reshape(groups.shape), weight.shape, layout).to(weight.dtype)


@dataclass(frozen=True)
class ProxSparse(Method):
    """Proximal steps on the N:M regulariser (``lambda1``), the frozen-weight term
    (``lambda2``, ``epsilon``), the top-N projection as the mask (see the module docstring)."""

    name: ClassVar[str] = "proxsparse"
    patterns: ClassVar[tuple] = (NM,)
    lambda1: float = 0.1
    lambda2: float = 0.0
    epsilon: float = 0.1
    iterations: int = 100
    restore: bool = True

    def __post_init__(self) -> None:
        check_number("lambda1", self.lambda1, 0.0)
        check_number("lambda2", self.lambda2, 0.0)
        if check_number("epsilon", self.epsilon, 0.0) == 0.0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon!r}")
        object.__setattr__(self, "iterations", check_count("iterations", self.iterations, 1))
        if not isinstance(self.restore, bool):
            raise ValueError(f"restore must be true or false, got {self.restore!r}")

    def original(self, w) -> torch.Tensor:
        """``W0``: the dense weight at ``sparsify`` time."""
        original = w.state[ORIGINAL]
        if original.device != w.dense.device:
            original = w.state[ORIGINAL] = original.to(w.dense.device)
        return original

    def initial_mask(self, w) -> torch.Tensor:
        unsharded_nm_geometry(w, self.name)  # refused before sparsify touches the model
        return super().initial_mask(w)

    def refresh(self, w) -> torch.Tensor:
        if ORIGINAL not in w.state:  # the first refresh, inside sparsify (masks= or not)
            unsharded_nm_geometry(w, self.name)
            w.state[ORIGINAL] = w.dense.detach().clone()
        return super().refresh(w)

    def masked_weight(self, w) -> torch.Tensor:
        if training(w):
            return w.dense  # the regularised dense weight, whole gradient
        return self.deployed_weight(w) if self.restore else kept_gradient_only(w)

    def deployed_weight(self, w) -> torch.Tensor | None:
        if not self.restore:
            return None
        original = self.original(w)
        return torch.where(w.mask, original, torch.zeros((), dtype=original.dtype,
                                                         device=original.device))

    def frozen_weight_gradient(self, w) -> torch.Tensor:
        """The gradient of ``lambda2 * ||(W / (W0 + epsilon sign W0)) (W - W0)||^2``."""
        weight, original = w.dense.detach(), self.original(w)
        sign = torch.where(original >= 0, 1.0, -1.0).to(original.dtype)
        scale = original + self.epsilon * sign
        return 2 * self.lambda2 * weight * (weight - original) * (2 * weight - original) \
            / scale.square()

    def before_step(self, weights, step: Step) -> None:
        if not self.lambda2:
            return
        for w in weights:
            grad = w.dense.grad
            if grad is not None:
                grad.add_(self.frozen_weight_gradient(w).to(grad.dtype))

    def after_step(self, weights, step: Step) -> None:
        if not self.lambda1:
            return
        for w in weights:
            n, m, layout = unsharded_nm_geometry(w, self.name)
            with torch.no_grad():
                w.dense.copy_(prox_nm(w.dense, n, m, layout, self.lambda1, self.iterations))
            w.refresh()
