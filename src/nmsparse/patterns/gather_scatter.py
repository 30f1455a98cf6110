"""Gather-scatter (GS) patterns: load-balanced sparsity for vector units fed from banked
scratchpads (after Li et al., "Load-balanced Gather-scatter Patterns for Sparse Deep Neural
Networks", arXiv 2112.10898).

A vector unit gathers its operands from ``B`` memory banks in one cycle only if they come
from different banks, and it wastes lanes when rows carry unequal work. The GS constraint as
nmsparse implements it (``"gs:B:R:D"``):

* **buckets**: input column ``c`` lives in bank ``c mod B`` (the columns ``b, b+B, b+2B...``
  form bucket ``b``);
* **rows per group**: output rows are taken ``R`` at a time (at each kernel position of a
  conv, like N:M's ``"in"`` grouping);
* **balanced column indices**: inside each group of ``R`` rows, every bucket keeps the same
  number ``k = round(D * R * C / B)`` of weights (``C``: input channels). Any ``k`` vectors
  of ``B`` kept weights, one per bucket, can then be gathered conflict-free, and every group
  carries the same load.

The mask solver keeps the ``k`` highest scores of every (row group, bucket) block, which is
the best mask under the constraint (blocks are independent); ties go to the lower index.
:func:`pack_gs` stores a complying weight compactly: per block its ``k`` values and their
positions inside the block (``int16``), with :func:`unpack_gs` as its inverse.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, Violations, is_density

_ACCEPTED = ("'gs:B:R:D' with B buckets (an integer >= 2), R rows per group (an integer "
             ">= 1) and a keep density 0 < D < 1, e.g. 'gs:4:2:0.25'")


@dataclass(frozen=True)
class GatherScatter(Pattern):
    """Every group of ``rows`` rows keeps the same number of weights in each of ``buckets``
    column buckets: ``round(keep * rows * columns / buckets)``."""

    kind: ClassVar[str] = "gs"
    syntax: ClassVar[str] = "'gs:B:R:D'"
    buckets: int
    rows: int
    keep: float

    def __post_init__(self) -> None:
        for name, low in (("buckets", 2), ("rows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or value < low:
                raise ValueError(f"invalid GS {name} {value!r}; accepted: {_ACCEPTED}")
            object.__setattr__(self, name, int(value))
        if not is_density(self.keep):
            raise ValueError(f"invalid GS density {self.keep!r}; accepted: {_ACCEPTED}")
        object.__setattr__(self, "keep", float(self.keep))

    @property
    def density(self) -> float:
        return self.keep

    def __str__(self) -> str:
        return f"gs:{self.buckets}:{self.rows}:{self.keep:g}"

    @classmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> GatherScatter:
        parts = arguments.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            return cls(int(parts[0]), int(parts[1]), float(parts[2]))
        except ValueError:
            raise ValueError(f"cannot parse pattern 'gs:{arguments}'; accepted: "
                             f"{_ACCEPTED}") from None

    # -- geometry ------------------------------------------------------------------------------
    def block_size(self, shape: tuple[int, ...]) -> int:
        return self.rows * shape[1] // self.buckets

    def kept_per_block(self, shape: tuple[int, ...]) -> int:
        return int(round(self.keep * self.block_size(shape)))

    def why_not(self, shape: tuple[int, ...]) -> str | None:
        shape = tuple(shape)
        if not 2 <= len(shape) <= 5:
            return f"weight of shape {shape} is {len(shape)}-D; GS needs a 2-D to 5-D weight"
        if shape[1] % self.buckets:
            return (f"input dimension (dim 1) {shape[1]} of weight shape {shape} is not "
                    f"divisible by the {self.buckets} buckets")
        if shape[0] % self.rows:
            return (f"output dimension (dim 0) {shape[0]} of weight shape {shape} is not "
                    f"divisible by {self.rows} rows per group")
        if not 1 <= self.kept_per_block(shape) < self.block_size(shape):
            return (f"density {self.keep:g} keeps {self.kept_per_block(shape)} of the "
                    f"{self.block_size(shape)} weights of a (row group, bucket) block of "
                    f"weight shape {shape}; it cannot keep between 1 and all but one")
        return None

    def to_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(row groups, kernel positions, buckets, R * C/B)``; inside a block the entries
        are in the tensor's own index order (row, then column)."""
        self.require(tuple(tensor.shape), "the tensor")
        out, columns = tensor.shape[0], tensor.shape[1]
        moved = tensor.movedim(1, -1).reshape(out, -1, columns)  # (out, kernel, in)
        kernel, per_bucket = moved.shape[1], columns // self.buckets
        grouped = moved.reshape(out // self.rows, self.rows, kernel, per_bucket, self.buckets)
        return grouped.permute(0, 2, 4, 1, 3).reshape(out // self.rows, kernel, self.buckets,
                                                      self.rows * per_bucket)

    def from_blocks(self, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        out, columns = shape[0], shape[1]
        groups, kernel = blocks.shape[0], blocks.shape[1]
        per_bucket = columns // self.buckets
        grouped = blocks.reshape(groups, kernel, self.buckets, self.rows, per_bucket)
        moved = grouped.permute(0, 3, 1, 4, 2).reshape(out, *shape[2:], columns)
        return moved.movedim(-1, 1).contiguous()

    # -- the three pattern operations ------------------------------------------------------------
    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        blocks = self.to_blocks(scores.detach())
        keep = self.kept_per_block(tuple(scores.shape))
        order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices[..., :keep]
        chosen = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order, True)
        return self.from_blocks(chosen, scores.shape)

    def violations(self, tensor: torch.Tensor) -> Violations:
        if tensor.numel() == 0:
            return Violations(0, 0, 0)
        kept = (self.to_blocks(tensor) != 0).sum(-1)
        limit = self.kept_per_block(tuple(tensor.shape))
        return Violations(kept.numel(), int((kept > limit).sum()), int(kept.max()))


@dataclass(frozen=True)
class PackedGS:
    """A GS-sparse weight stored as, per (row group, kernel position, bucket) block, its kept
    values and their positions in the block (``row * C/B + column // B``)."""

    pattern: GatherScatter
    shape: tuple[int, ...]
    values: torch.Tensor  # (groups, kernel, buckets, k)
    positions: torch.Tensor  # int16, same shape

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.positions.numel() * 2


def pack_gs(weight: torch.Tensor, pattern: GatherScatter) -> PackedGS:
    """Pack a weight that complies with ``pattern`` (a block keeping fewer than ``k`` is
    padded with zeros at its first free positions)."""
    found = pattern.violations(weight)
    if not found.ok:
        raise ValueError(f"the weight breaks pattern {pattern} in {found.violating} of "
                         f"{found.groups} blocks; prune it to the pattern first")
    blocks = pattern.to_blocks(weight.detach())
    if blocks.shape[-1] - 1 > torch.iinfo(torch.int16).max:  # positions run 0 .. size - 1
        raise ValueError(f"blocks of {blocks.shape[-1]} weights do not fit int16 positions "
                         f"(at most {torch.iinfo(torch.int16).max + 1} weights per block)")
    keep = pattern.kept_per_block(tuple(weight.shape))
    # kept entries first (in index order), then the zeros that pad a block
    order = torch.sort((blocks == 0).to(torch.int8), dim=-1, stable=True).indices[..., :keep]
    return PackedGS(pattern, tuple(weight.shape), blocks.gather(-1, order),
                    order.to(torch.int16))


def unpack_gs(packed: PackedGS) -> torch.Tensor:
    """The dense weight of a :class:`PackedGS`."""
    pattern, shape = packed.pattern, packed.shape
    size = pattern.block_size(shape)
    blocks = torch.zeros(*packed.values.shape[:-1], size, dtype=packed.values.dtype,
                         device=packed.values.device)
    blocks.scatter_(-1, packed.positions.long(), packed.values)
    return pattern.from_blocks(blocks, torch.Size(shape))
