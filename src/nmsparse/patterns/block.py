"""Block sparsity: keep whole R x C tiles of a weight, the tiles with the highest total score.

Grammar: ``"block:RxC:D"``, e.g. ``"block:4x4:0.25"`` keeps a quarter of the 4x4 tiles.
The weight is seen as a matrix ``(out, everything else)`` (a conv weight ``(out, in, kh, kw)``
becomes ``(out, in*kh*kw)`` in memory order), cut into ``R`` rows by ``C`` columns tiles; both
sizes must divide. A tile's score is the sum of its entries' scores; the
``round(D * tiles)`` best tiles are kept, ties going to the lower tile index (row-major over
the tile grid). A tensor complies when at most that many tiles hold a non-zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Pattern, Violations, is_density

_ACCEPTED = ("'block:RxC:D' with tile rows R >= 1, tile columns C >= 1 (not both 1) and a "
             "keep density 0 < D < 1, e.g. 'block:4x4:0.25'")
_SPEC = re.compile(r"\s*([0-9]+)\s*x\s*([0-9]+)\s*:\s*([0-9.eE+-]+)\s*", re.ASCII)


@dataclass(frozen=True)
class Block(Pattern):
    """Keep ``keep`` of the ``rows x cols`` tiles of a weight, highest total score first."""

    kind: ClassVar[str] = "block"
    syntax: ClassVar[str] = "'block:RxC:D'"
    rows: int
    cols: int
    keep: float

    def __post_init__(self) -> None:
        sizes_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                       for v in (self.rows, self.cols)) and self.rows * self.cols > 1
        if not sizes_ok or not is_density(self.keep):
            raise ValueError(f"invalid block pattern {self.rows!r}x{self.cols!r}:{self.keep!r}; "
                             f"accepted: {_ACCEPTED}")
        object.__setattr__(self, "keep", float(self.keep))

    @property
    def density(self) -> float:
        return self.keep

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}:{self.keep:g}"

    @classmethod
    def from_arguments(cls, arguments: str, *, layout: str) -> Block:
        match = _SPEC.fullmatch(arguments)
        if match is None:
            raise ValueError(f"cannot parse pattern 'block:{arguments}'; accepted: {_ACCEPTED}")
        try:
            keep = float(match.group(3))
        except ValueError:
            raise ValueError(f"cannot parse pattern 'block:{arguments}'; accepted: "
                             f"{_ACCEPTED}") from None
        return cls(int(match.group(1)), int(match.group(2)), keep)

    def why_not(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) < 2:
            return (f"weight of shape {tuple(shape)} is {len(shape)}-D; block sparsity needs a "
                    "2-D or larger weight")
        out, rest = shape[0], math.prod(shape[1:])
        if out % self.rows or rest % self.cols:
            return (f"weight of shape {tuple(shape)} seen as a {out}x{rest} matrix is not "
                    f"divisible into {self.rows}x{self.cols} tiles")
        return None

    def tiles(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as ``(tile rows, tile cols, rows, cols)``: one entry per tile position."""
        self.require(tuple(tensor.shape))
        matrix = tensor.reshape(tensor.shape[0], -1)
        grid_rows, grid_cols = matrix.shape[0] // self.rows, matrix.shape[1] // self.cols
        return matrix.reshape(grid_rows, self.rows, grid_cols, self.cols).permute(0, 2, 1, 3)

    def tile_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Sum of ``scores`` over each tile, shaped like the tile grid."""
        return self.tiles(scores.detach()).sum((-2, -1))

    def expand(self, tile_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A per-tile bool mask (the tile grid's shape) as a mask of the weight's ``shape``."""
        grid_rows, grid_cols = tile_mask.shape
        full = tile_mask[:, None, :, None].expand(grid_rows, self.rows, grid_cols, self.cols)
        return full.reshape(shape).contiguous()

    def kept(self, tiles: int) -> int:
        return int(round(self.keep * tiles))

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        grid = self.tile_scores(scores)
        flat = grid.reshape(-1)
        order = torch.sort(flat, descending=True, stable=True).indices[: self.kept(flat.numel())]
        tile_mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        tile_mask.scatter_(0, order, True)
        return self.expand(tile_mask.reshape(grid.shape), scores.shape)

    def violations(self, tensor: torch.Tensor) -> Violations:
        if tensor.numel() == 0:
            return Violations(0, 0, 0)
        busy = (self.tiles(tensor) != 0).flatten(-2).any(-1)
        used = int(busy.sum())
        return Violations(1, int(used > self.kept(busy.numel())), used)
