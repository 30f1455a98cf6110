"""Packed N:M format of one weight: the kept values plus their in-group positions as bits.

Contract (the format every kernel in :mod:`nmsparse.kernels` reads):

* Groups are those of :mod:`nmsparse.engine.masks` (``layout="in"``: M consecutive entries along
  dim 1 at each fixed ``(out, kernel position)``; ``"flat"``: M contiguous entries in memory
  order within each output row). Rows are the grouped view flattened to 2-D: for ``"in"`` the
  view ``(out, *kernel, in)``, so ``rows = out * prod(kernel)`` and a row holds
  ``groups_per_row = in / M`` groups; for ``"flat"`` ``rows = out`` and
  ``groups_per_row = prod(shape[1:]) / M``. A Linear weight ``(out, in)`` has one row per
  output feature in both layouts.
* ``values``: shape ``(rows, groups_per_row * N)``, the weight's dtype; the N kept values of
  every group in ascending position order, groups in order.
* ``indices``: ``uint8``, shape ``(rows, ceil(groups_per_row * N * w / 8))``: the in-group
  position (0..M-1) of every value in ``values``, ``w = index_width(M)`` bits each (the
  smallest of 1, 2, 4, 8 with ``2**w >= M``, so a position never straddles a byte). Positions
  are packed little-endian inside each byte (value ``j`` of a row sits in byte
  ``j * w // 8`` at bit ``j * w % 8``), row by row; the unused high bits of a row's last byte
  are zero.

So fp16 2:4 takes 9/16 of the dense bytes and fp16 2:8 takes 5/16 (plus at most one byte of
padding per row). ``unpack(pack(w, n, m, mask=mask))`` returns ``w`` where ``mask`` is set and
``+0.0`` elsewhere, bit for bit: the round trip of a finalized weight (pruned entries set to
zero with ``masked_fill``) is exact. Only the sign of a pruned ``-0.0`` is not stored.

Everything here is vectorised torch (no Python loop over rows or groups) and works on any
device; this module imports no Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .patterns import NM
from .patterns.grouping import check_layout, from_groups, grouping_error, to_groups

_WIDTHS = (1, 2, 4, 8)


def index_width(m: int) -> int:
    """Bits per stored position for group size ``m``: smallest of 1, 2, 4, 8 with 2**w >= m."""
    for width in _WIDTHS:
        if 2**width >= m:
            return width
    raise ValueError(f"group size M={m} is too large to pack: positions are stored in at most "
                     "8 bits, so M must be at most 256")


def _grouped_rows(shape: tuple[int, ...], m: int, layout: str) -> tuple[int, int]:
    """``(rows, groups_per_row)`` of a weight of ``shape`` (already validated)."""
    if layout == "in":
        return shape[0] * math.prod(shape[2:]), shape[1] // m
    return shape[0], math.prod(shape[1:]) // m


def _index_bytes(count: int, m: int) -> int:
    return -(-count * index_width(m) // 8)


def packed_shapes(shape: tuple[int, ...], n: int, m: int,
                  layout: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the ``(values, indices)`` of an N:M weight of ``shape`` (already validated)."""
    rows, groups = _grouped_rows(tuple(shape), m, layout)
    return (rows, groups * n), (rows, _index_bytes(groups * n, m))


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: compare by identity
class PackedWeight:
    """One N:M weight in packed form (see the module docstring for the exact layout)."""

    values: torch.Tensor
    indices: torch.Tensor
    n: int
    m: int
    shape: tuple[int, ...]
    layout: str = "in"

    def __post_init__(self) -> None:
        NM(self.n, self.m)
        index_width(self.m)
        check_layout(self.layout)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        error = grouping_error(self.shape, self.m, self.layout)
        if error:
            raise ValueError(error)
        expected_values, expected_indices = packed_shapes(self.shape, self.n, self.m,
                                                          self.layout)
        if tuple(self.values.shape) != expected_values:
            raise ValueError(f"values of shape {tuple(self.values.shape)} do not match a "
                             f"{self.n}:{self.m} packed weight of shape {self.shape}: expected "
                             f"{expected_values}")
        if self.indices.dtype != torch.uint8 or tuple(self.indices.shape) != expected_indices:
            raise ValueError(f"indices must be uint8 of shape {expected_indices} for a "
                             f"{self.n}:{self.m} packed weight of shape {self.shape}, got "
                             f"{self.indices.dtype} {tuple(self.indices.shape)}")
        if self.values.device != self.indices.device:
            raise ValueError(f"values on {self.values.device} but indices on "
                             f"{self.indices.device}")

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def groups_per_row(self) -> int:
        return self.values.shape[1] // self.n

    @property
    def index_bits(self) -> int:
        return index_width(self.m)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of ``values`` plus ``indices`` (the storage the format costs)."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense weight this packs."""
        return math.prod(self.shape) * self.values.element_size()

    def to(self, device: torch.device | str) -> PackedWeight:
        """A copy on ``device`` (same dtype, same format)."""
        return PackedWeight(self.values.to(device), self.indices.to(device), self.n, self.m,
                            self.shape, self.layout)


def pack_positions(positions: torch.Tensor, m: int) -> torch.Tensor:
    """Pack positions ``(rows, count)`` (integers in ``[0, m)``) into uint8 bytes per row."""
    width = index_width(m)
    per_byte = 8 // width
    rows, count = positions.shape
    padded = -(-count // per_byte) * per_byte
    codes = torch.zeros(rows, padded, dtype=torch.int32, device=positions.device)
    codes[:, :count] = positions
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=positions.device)
    # The fields of one byte never overlap, so a sum is a bitwise or.
    return (codes.view(rows, padded // per_byte, per_byte) << shifts).sum(-1).to(torch.uint8)


def unpack_positions(indices: torch.Tensor, m: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_positions`: int64 positions of shape ``(rows, count)``."""
    width = index_width(m)
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=indices.device)
    fields = (indices.to(torch.int32).unsqueeze(-1) >> shifts) & (2**width - 1)
    return fields.reshape(indices.shape[0], -1)[:, :count].to(torch.int64)


def _positions_from_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending positions ``(..., n)`` of the set entries of a bool ``(..., m)`` tensor."""
    # A stable sort of "not kept" puts kept entries first and keeps them in index order.
    return torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]


def pack(weight: torch.Tensor, n: int, m: int, layout: str = "in",
         mask: torch.Tensor | None = None) -> PackedWeight:
    """Pack ``weight`` (2-D to 5-D) into the N:M format.

    With ``mask`` (bool, ``weight``'s shape, exactly ``n`` set per M-group) the values at the
    set positions are stored, whatever they are (zeros included). Without a mask the weight's
    non-zero pattern is used: a group with fewer than ``n`` non-zeros is padded with its
    lowest-index zero positions; a group with more raises ``ValueError``.
    """
    pattern = NM(n, m)
    n, m = pattern.n, pattern.m
    index_width(m)
    check_layout(layout)
    shape = tuple(weight.shape)
    error = grouping_error(shape, m, layout)
    if error:
        raise ValueError(error)
    groups = to_groups(weight.detach(), m, layout)
    if mask is not None:
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the weight's "
                             f"shape {shape}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        keep = to_groups(mask.to(weight.device), m, layout)
        counts = keep.sum(-1)
        bad = counts != n
        if bool(bad.any()):
            raise ValueError(f"mask for weight of shape {shape} is not {n}:{m}: "
                             f"{int(bad.sum())} of {counts.numel()} groups keep "
                             f"{int(counts[bad].min())}..{int(counts[bad].max())} entries "
                             f"instead of exactly {n}")
    else:
        found = NM(n, m, layout).violations(weight.detach())  # the one "is this N:M"
        if not found.ok:
            raise ValueError(f"weight of shape {shape} is not {n}:{m} ({layout!r} layout): "
                             f"{found.violating} of {found.groups} groups have more than "
                             f"{n} non-zeros (up to {found.max_kept}); finalize the model "
                             "or pass a mask")
        nonzero = groups != 0
        counts = nonzero.sum(-1)
        # Pad short groups with their first zeros: the k-th zero (0-based) of a group is
        # taken while k < n - count.
        zero = ~nonzero
        zero_rank = zero.to(torch.int32).cumsum(-1) - 1
        keep = nonzero | (zero & (zero_rank < (n - counts).unsqueeze(-1)))
    positions = _positions_from_mask(keep, n)
    rows, groups_per_row = _grouped_rows(shape, m, layout)
    values = torch.gather(groups, -1, positions).reshape(rows, groups_per_row * n)
    indices = pack_positions(positions.reshape(rows, groups_per_row * n), m)
    return PackedWeight(values.contiguous(), indices, n, m, shape, layout)


def unpack_rows(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense grouped rows ``(rows, groups_per_row * m)`` from packed ``values``/``indices``.

    For a Linear weight (either layout) this is the dense ``(out, in)`` weight itself.
    """
    rows, count = values.shape
    groups_per_row = count // n
    positions = unpack_positions(indices, m, count).view(rows, groups_per_row, n)
    dense = torch.zeros(rows, groups_per_row, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(rows, groups_per_row, n))
    return dense.view(rows, groups_per_row * m)


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense weight of ``packed``: kept values in place, ``+0.0`` elsewhere."""
    positions = unpack_positions(packed.indices, packed.m, packed.values.shape[1])
    if bool((positions >= packed.m).any()):
        raise ValueError(f"corrupt packed weight: a stored position is >= M={packed.m}")
    # Distinct positions per group: a duplicate would make the scatter drop a value.
    grouped = positions.view(packed.rows, packed.groups_per_row, packed.n)
    if packed.n > 1 and bool((grouped.diff(dim=-1) <= 0).any()):
        raise ValueError("corrupt packed weight: positions within a group are not strictly "
                         "ascending")
    dense = unpack_rows(packed.values, packed.indices, packed.n, packed.m)
    return from_groups(dense, torch.Size(packed.shape), packed.layout)
