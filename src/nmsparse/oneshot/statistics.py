"""Calibration statistics of a layer's input, gathered by forward hooks without keeping
activations: what Wanda and SparseGPT need, accumulated batch by batch.

* :class:`InputNorms` (Wanda): the sum over calibration rows of ``x_j ** 2`` per input feature;
  ``norms()`` is ``||x_j||_2``.
* :class:`InputHessian` (SparseGPT): ``H = (2 / rows) * X^T X`` over all calibration rows
  ``X`` (rows = tokens), accumulated as a running mean so the scale does not depend on how
  much data was seen.

Layers that read the same input (a Llama block's q/k/v projections, gate/up) end with
bit-identical statistics; :meth:`Statistic.same_as` finds them so that one statistic, and what a
pruner derives from it once (:meth:`Statistic.derive`: SparseGPT's factor of ``H^-1``), serves
all of them.

:func:`collecting` registers one hook per layer and always removes them, also when the
calibration forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


def bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as integers of its width (so that -0.0 and 0.0 differ); other
    tensors as they are."""
    if not tensor.dtype.is_floating_point:
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


class Statistic:
    """Accumulates a statistic of ``(rows, features)`` input matrices."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.rows = 0
        self._derived: dict = {}

    def add(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def state(self) -> torch.Tensor | None:
        """The accumulated tensor (``None`` before any input)."""
        raise NotImplementedError

    def same_as(self, other: Statistic) -> bool:
        """Whether ``other`` holds bit for bit the same statistic (the same input was seen)."""
        mine, theirs = self.state(), other.state()
        if type(self) is not type(other) or self.rows != other.rows or mine is None \
                or theirs is None or mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            return False
        return torch.equal(bit_view(mine), bit_view(theirs))

    def derive(self, key, compute):
        """``compute()``, remembered under ``key`` for the other layers sharing this
        statistic (the accumulation must be finished)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]


class InputNorms(Statistic):
    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.sum_squares: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        squares = rows.float().pow(2).sum(0)
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        self.rows += rows.shape[0]

    def state(self) -> torch.Tensor | None:
        return self.sum_squares

    def norms(self) -> torch.Tensor:
        if self.sum_squares is None:
            raise ValueError("no calibration input reached this layer")
        return self.sum_squares.sqrt()


class InputHessian(Statistic):
    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.hessian: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        count = rows.shape[0]
        total = self.rows + count
        update = rows.t() @ rows
        update *= 2.0 / total  # in place (the same bits): no second (in, in) matrix
        if self.hessian is None:
            self.hessian = update
        else:  # running mean: old * rows/total + new batch's share
            self.hessian *= self.rows / total
            self.hessian += update
        self.rows = total

    def state(self) -> torch.Tensor | None:
        return self.hessian

    def matrix(self) -> torch.Tensor:
        if self.hessian is None:
            raise ValueError("no calibration input reached this layer")
        return self.hessian

    def take(self) -> torch.Tensor:
        """The matrix, handed over: the statistic no longer holds it (a pruner that needs
        only something derived from it may overwrite it, and its memory goes with it)."""
        hessian, self.hessian = self.matrix(), None
        return hessian


def _input_rows(module: nn.Module, args: tuple, features: int) -> torch.Tensor:
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.shape[-1] != features:
        raise ValueError(f"{type(module).__name__} got an input of shape "
                         f"{tuple(getattr(x, 'shape', ()))}; expected (..., {features})")
    return x.detach().reshape(-1, features)


@contextlib.contextmanager
def collecting(modules: Mapping[nn.Module, Statistic]) -> Iterator[None]:
    """While open, every forward call of each module adds its input rows to its statistic."""
    handles = []
    try:
        for module, statistic in modules.items():
            def hook(module, args, statistic=statistic):
                statistic.add(_input_rows(module, args, statistic.features))

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
