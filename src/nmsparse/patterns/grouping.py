"""N:M group geometry: how a weight tensor splits into groups of M, and top-N per group.

Grouping axis (``layout``):

* ``"in"`` (default, the sparse-tensor-core layout): groups of M consecutive entries along
  dim 1, the reduction axis. A Linear weight ``(out, in)`` is grouped along ``in``; a conv
  weight ``(out, in, *kernel)`` along ``in`` at each fixed ``(out, kernel position)``.
* ``"flat"``: groups of M contiguous entries in the weight's memory order within each output
  row (the grouping behind the SR-STE paper's conv numbers; not valid for hardware).

Each group keeps its N largest ``|w|``; ties go to the lower index, so a mask is the same on
every device. All functions here are vectorised and work on CPU and CUDA tensors. The N:M
pattern (:class:`nmsparse.patterns.NM`) is built on them; :mod:`nmsparse.engine.masks` keeps the
functional API (``nm_mask``).
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("in", "flat")

# Above this group size counting ranks pairwise (M*(M-1) passes) loses to one stable sort.
PAIRWISE_MAX_M = 8


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; accepted: 'in' (groups along the input "
                         "dimension, hardware layout) or 'flat' (contiguous in memory order)")
    return layout


def grouping_error(shape: tuple[int, ...], m: int, layout: str) -> str | None:
    """Why a weight of ``shape`` cannot be split into groups of ``m``, or None if it can."""
    check_layout(layout)
    if not 2 <= len(shape) <= 5:
        return f"weight of shape {tuple(shape)} is {len(shape)}-D; N:M needs a 2-D to 5-D weight"
    if layout == "in":
        size, what = shape[1], "input dimension (dim 1)"
    else:
        size, what = math.prod(shape[1:]), "row size (all dims but the first)"
    if size % m:
        return f"{what} {size} of weight shape {tuple(shape)} is not divisible by M={m}"
    return None


def to_groups(tensor: torch.Tensor, m: int, layout: str) -> torch.Tensor:
    """View (or copy) ``tensor`` as ``(..., groups, m)`` in group order."""
    error = grouping_error(tuple(tensor.shape), m, layout)
    if error:
        raise ValueError(error)
    # "in": (out, *kernel, in), the reduction axis last; "flat": one row per output
    tensor = tensor.movedim(1, -1) if layout == "in" else tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(*tensor.shape[:-1], tensor.shape[-1] // m, m)


def from_groups(groups: torch.Tensor, shape: torch.Size, layout: str) -> torch.Tensor:
    """Inverse of :func:`to_groups`: back to a tensor of the weight's ``shape``."""
    if layout == "in":
        moved = (shape[0], *shape[2:], shape[1])
        # contiguous: mask buffers are updated in place by kernels that need plain strides
        return groups.reshape(moved).movedim(-1, 1).contiguous()
    return groups.reshape(shape)


def keep_largest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest entries along the last dim; ties: lower index wins."""
    m = scores.shape[-1]
    if m > PAIRWISE_MAX_M:
        # A stable descending sort keeps equal scores in index order: lower index first.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    columns = scores.unbind(-1)
    keep = []
    for i in range(m):
        # rank of entry i = how many entries of its group beat it (larger, or equal and earlier)
        rank = torch.zeros(columns[i].shape, dtype=torch.uint8, device=scores.device)
        for j in range(m):
            if j != i:
                rank += (columns[j] >= columns[i]) if j < i else (columns[j] > columns[i])
        keep.append(rank < n)
    return torch.stack(keep, dim=-1)


def kept_per_group(mask_or_weight: torch.Tensor, m: int, layout: str = "in") -> torch.Tensor:
    """Number of non-zero entries in every M-group, shaped ``(..., groups)``."""
    return (to_groups(mask_or_weight, m, layout) != 0).sum(-1)
