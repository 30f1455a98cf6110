"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and let the not yet
processed columns of each row absorb the error (an Optimal Brain Surgeon update).

The layer's reconstruction loss for one row ``w`` is ``(w - w') H (w - w')^T`` with the input
Hessian ``H = 2 X^T X / rows``. ``H`` is damped (``damp`` times its mean diagonal added to the
diagonal; inputs that never fired get a unit diagonal and zero weight). With ``U`` the upper
Cholesky factor of ``H^-1``, column ``j`` is processed as: the pruned part of the column,
``e = (w_j - q_j) / U[j, j]``, is subtracted as ``e * U[j, j:]`` from the columns still to come.
Row ``j`` of ``U`` divided by ``U[j, j]`` is the OBS update of the remaining columns
``j..end`` (``H_F^-1[0, :] / H_F^-1[0, 0]``), so this is the sequential OBS solution without
inverting one matrix per column.

Columns are handled in blocks of ``blocksize`` (lazy batch updates): the update is applied
inside the block column by column and to the rest of the matrix once per block.

Masks: N:M chooses each group of M columns when its first column is reached, by the OBS
saliency ``w^2 / U[j, j]^2`` of the current (already updated) weights; an unstructured density
chooses per block of columns across all rows (``floor(density * block size)`` kept, so the
layer keeps no more than allowed); any other pattern kind, or a given ``mask``, fixes the
mask before the sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import Pattern, Unstructured
from .base import Pruner, nm_of, top_count
from .statistics import InputHessian, bit_view


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, *, overwrite: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the damped ``H^-1``, and the inputs whose
    Hessian diagonal is zero (they never fired). ``overwrite``: the caller gives ``hessian``
    up, so it is damped in place instead of copied."""
    if not overwrite:
        hessian = hessian.clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    if damp > 0:
        diagonal = torch.diagonal(hessian)
        diagonal += damp * diagonal.mean()
    try:
        if hessian.device.type == "cpu" and _bit_symmetric(hessian):
            # LAPACK takes column-major matrices and PyTorch copies others into one; the
            # transpose of a symmetric H is the same matrix in that layout, so the three
            # steps overwrite it in place (a copy of 127 MB less for a 5632-wide input;
            # checked on the CPU, where that memory is the process's)
            upper = hessian.mT
            torch.linalg.cholesky(upper, out=upper)
            torch.cholesky_inverse(upper, out=upper)
            torch.linalg.cholesky(upper, upper=True, out=upper)
        else:  # one name, so that each step's input is freed
            hessian = torch.linalg.cholesky(hessian)
            hessian = torch.cholesky_inverse(hessian)
            upper = torch.linalg.cholesky(hessian, upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError(f"the input Hessian is not positive definite with damp={damp}; "
                         "use more calibration data or a larger damp (e.g. 0.1)") from None
    return upper, dead


def _bit_symmetric(matrix: torch.Tensor) -> bool:
    """Whether ``matrix`` equals its transpose bit for bit (then both layouts give LAPACK the
    same numbers)."""
    bits = bit_view(matrix)
    return torch.equal(bits, bits.mT)


def sparsegpt(matrix: torch.Tensor, hessian: torch.Tensor | None, pattern: Pattern, *,
              blocksize: int = 128, damp: float = 0.01, mask: torch.Tensor | None = None,
              factor: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``matrix`` ``(out, in)`` to ``pattern`` given the input Hessian ``(in, in)``;
    returns ``(pruned matrix, mask)``. ``mask`` fixes the mask instead of choosing it;
    ``factor`` is ``inverse_hessian_factor(hessian, damp)`` when already computed (layers
    reading the same input share it; ``hessian`` may then be ``None``)."""
    weight = matrix.clone()
    rows, columns = weight.shape
    given = hessian if factor is None else factor[0]
    if given.shape != (columns, columns):
        raise ValueError(f"Hessian shape {tuple(given.shape)} does not fit a weight with "
                         f"{columns} input features")
    if factor is None:
        factor = inverse_hessian_factor(hessian.to(weight.dtype), damp)
    upper, dead = factor
    weight[:, dead] = 0
    nm = nm_of(pattern) if mask is None else None
    if nm is not None:
        blocksize = max(nm.m, blocksize // nm.m * nm.m)  # whole groups per block
    if mask is None and nm is None and not isinstance(pattern, Unstructured):
        mask = pattern.mask(weight.pow(2) / torch.diagonal(upper).pow(2).unsqueeze(0))
    chosen = torch.zeros_like(weight, dtype=torch.bool) if mask is None else mask.clone()

    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        # The block is worked on transposed, (columns, rows), so that every column read and
        # written in the sweep is contiguous (strided columns made the sweep several times
        # slower); the arithmetic per element is unchanged.
        block = weight[:, start:end].t().contiguous()
        inner = upper[start:end, start:end]
        diagonal = torch.diagonal(inner)
        errors = torch.empty_like(block)
        if mask is None and isinstance(pattern, Unstructured):
            keep = math.floor(pattern.keep * block.numel() + 1e-9)
            chosen[:, start:end] = top_count(weight[:, start:end].pow(2) / diagonal.pow(2),
                                             keep)
        kept_t = chosen[:, start:end].t().contiguous()
        for j in range(end - start):
            if nm is not None and j % nm.m == 0:
                group = slice(j, j + nm.m)
                scores = block[group].pow(2) / diagonal[group].pow(2).unsqueeze(1)
                kept_t[group] = nm.mask(scores.t()).t()
            column = block[j]
            kept = column * kept_t[j]
            error = (column - kept) / inner[j, j]
            block[j + 1:] -= inner[j, j + 1:].unsqueeze(1) * error.unsqueeze(0)
            block[j] = kept  # exact zeros where pruned
            errors[j] = error
        weight[:, start:end] = block.t()
        chosen[:, start:end] = kept_t.t()
        weight[:, end:] -= errors.t().contiguous() @ upper[start:end, end:]
    return weight, chosen


@dataclass(frozen=True)
class SparseGPT(Pruner):
    name: ClassVar[str] = "sparsegpt"
    statistic: ClassVar[type] = InputHessian
    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) \
                or self.blocksize < 1:
            raise ValueError(f"sparsegpt blocksize must be an integer >= 1, got "
                             f"{self.blocksize!r}")
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < math.inf:
            raise ValueError(f"sparsegpt damp must be a finite number >= 0, got {self.damp!r}")

    def prune(self, matrix, statistic, pattern):
        # H is needed only to make the factor: the statistic hands it over and it becomes
        # the factor in place (one (in, in) matrix per input; the old code held up to five)
        factor = statistic.derive(
            ("sparsegpt factor", self.damp, matrix.dtype, matrix.device),
            lambda: inverse_hessian_factor(statistic.take().to(matrix.device, matrix.dtype),
                                           self.damp, overwrite=True))
        return sparsegpt(matrix, None, pattern, blocksize=self.blocksize, damp=self.damp,
                         factor=factor)
