"""Calibration statistics of a layer's input, gathered by forward hooks without keeping
activations: what Wanda and SparseGPT need, accumulated batch by batch.

* :class:`InputNorms` (Wanda): the sum over calibration rows of ``x_j ** 2`` per input feature;
  ``norms()`` is ``||x_j||_2``.
* :class:`InputHessian` (SparseGPT): ``H = (2 / rows) * X^T X`` over all calibration rows
  ``X`` (rows = tokens), accumulated as a running mean so the scale does not depend on how
  much data was seen.

:func:`collecting` registers one hook per layer and always removes them, also when the
calibration forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class Statistic:
    """Accumulates a statistic of ``(rows, features)`` input matrices."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        raise NotImplementedError


class InputNorms(Statistic):
    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.sum_squares: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        squares = rows.float().pow(2).sum(0)
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        self.rows += rows.shape[0]

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
        update = rows.t() @ rows * (2.0 / total)
        if self.hessian is None:
            self.hessian = update
        else:  # running mean: old * rows/total + new batch's share
            self.hessian = self.hessian * (self.rows / total) + update
        self.rows = total

    def matrix(self) -> torch.Tensor:
        if self.hessian is None:
            raise ValueError("no calibration input reached this layer")
        return self.hessian


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
