"""The N:M geometry that the mask-learning methods (MaskLLM, ProxSparse) work in."""

from __future__ import annotations

from typing import Any

from .._dtensor import is_dtensor
from ..patterns import NM


def nm_geometry(w: Any, method: str) -> tuple[int, int, str]:
    """``(n, m, layout)`` of ``w``'s pattern, or a ``ValueError`` naming what is accepted."""
    pattern = w.pattern
    if not isinstance(pattern, NM):
        raise ValueError(f"{w.name}: method {method!r} needs an N:M pattern such as '2:4', "
                         f"'4:8' or 'flat:2:4', got {pattern}")
    if is_dtensor(w.dense):
        raise ValueError(f"{w.name}: method {method!r} does not support sharded (FSDP2) "
                         "weights yet; sparsify and train it unsharded")
    return pattern.n, pattern.m, pattern.layout
