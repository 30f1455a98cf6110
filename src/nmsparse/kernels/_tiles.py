"""Which backends the 2:4 kernels have, their per-dtype tile rules and how a weight shape is
padded to fit them (pure: no GPU needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "cusparselt", "cutlass")
KERNEL_BACKENDS = ("cusparselt", "cutlass")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
DEFAULT_MAX_PADDING = 0.125


@dataclass(frozen=True)
class TileRule:
    """Shape constraints of one backend for one dtype."""

    rows: int  # weight rows (output features): a positive multiple of this
    cols: int  # weight columns (input features): a positive multiple of this
    tokens: int  # input rows are padded to a multiple of this


# PyTorch 2.13's SparseSemiStructuredTensor{CUSPARSELT,CUTLASS}._DTYPE_SHAPE_CONSTRAINTS for
# fp16 / bf16, used when the class or its table is missing (a future PyTorch).
_FALLBACK_RULES = {
    "cusparselt": {torch.float16: TileRule(16, 16, 8), torch.bfloat16: TileRule(16, 16, 8)},
    "cutlass": {torch.float16: TileRule(32, 64, 8), torch.bfloat16: TileRule(32, 64, 8)},
}
_CLASS_NAMES = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
                "cutlass": "SparseSemiStructuredTensorCUTLASS"}


def _backend_class(backend: str) -> type | None:
    return getattr(torch.sparse, _CLASS_NAMES[backend], None)


def _check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> str:
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; accepted: "
                         f"{', '.join(repr(b) for b in allowed)}")
    return backend


def tile_rule(backend: str, dtype: torch.dtype) -> TileRule | None:
    """The tile of ``backend`` ("cusparselt" or "cutlass") for ``dtype``, or None if
    :func:`accelerate` does not convert that dtype (only fp16 and bf16)."""
    _check_backend(backend, KERNEL_BACKENDS)
    if dtype not in SUPPORTED_DTYPES:
        return None
    table = getattr(_backend_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    entry = table.get(dtype)
    if entry is not None:
        try:
            return TileRule(int(entry.sparse_min_rows), int(entry.sparse_min_cols),
                            int(entry.dense_min_rows))
        except AttributeError:  # the table changed shape: fall back to the known values
            pass
    return _FALLBACK_RULES[backend].get(dtype)


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


@dataclass(frozen=True)
class ShapePlan:
    """How one weight goes to one backend: its shape and the padded shape the kernel gets."""

    backend: str
    shape: tuple[int, int]  # (out, in)
    padded: tuple[int, int]
    rule: TileRule

    @property
    def is_padded(self) -> bool:
        return self.padded != self.shape

    @property
    def overhead(self) -> float:
        """Extra weight entries from padding, as a fraction of the weight."""
        return math.prod(self.padded) / math.prod(self.shape) - 1.0


def plan_shape(shape: tuple[int, int], dtype: torch.dtype, backend: str,
               max_padding: float = DEFAULT_MAX_PADDING) -> ShapePlan | str:
    """A :class:`ShapePlan` for a weight of ``shape`` (out, in) and ``dtype`` on ``backend``,
    or the reason it cannot be converted (a string)."""
    rows, cols = shape
    if dtype not in SUPPORTED_DTYPES:
        return (f"dtype {str(dtype).removeprefix('torch.')}: the 2:4 kernels take float16 or "
                "bfloat16 (cast the model, e.g. model.to(torch.bfloat16))")
    rule = tile_rule(backend, dtype)
    if rule is None:
        return f"the {backend} backend has no kernel for {dtype}"
    if rows == 0 or cols == 0:
        return "empty weight"
    if cols % 4:
        return f"input dim {cols} is not a multiple of 4, so it has no 2:4 groups"
    padded = (_round_up(rows, rule.rows), _round_up(cols, rule.cols))
    plan = ShapePlan(backend, (rows, cols), padded, rule)
    if plan.overhead > max_padding:
        return (f"too small for {backend} tiles ({rule.rows}x{rule.cols}): {rows}x{cols} would "
                f"be padded to {padded[0]}x{padded[1]} (+{plan.overhead:.1%} > max_padding "
                f"{max_padding:.1%})")
    return plan


def capability_error(capability: tuple[int, int], name: str = "this GPU") -> str | None:
    """Why a GPU of ``capability`` cannot run the 2:4 kernels, or None if it can."""
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"{name} has compute capability {capability[0]}.{capability[1]}; 2:4 sparse tensor "
            f"cores need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (A100, A10, L4, "
            "H100, ...)")
