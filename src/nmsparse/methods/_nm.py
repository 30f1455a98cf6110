"""The N:M geometry that the mask-learning methods (MaskLLM, ProxSparse) work in."""

from __future__ import annotations

from typing import Any

from ..engine._dtensor import is_dtensor
from ..patterns import NM


def nm_geometry(w: Any, method: str) -> tuple[int, int, str]:
    """``(n, m, layout)`` of ``w``'s pattern, or a ``ValueError`` naming what is accepted."""
    pattern = w.pattern
    if not isinstance(pattern, NM):
        raise ValueError(f"{w.name}: method {method!r} needs an N:M pattern such as '2:4', "
                         f"'4:8' or 'flat:2:4', got {pattern}")
    return pattern.n, pattern.m, pattern.layout


def unsharded_nm_geometry(w: Any, method: str) -> tuple[int, int, str]:
    """:func:`nm_geometry` for methods that keep whole-weight state (MaskLLM's logits,
    ProxSparse's original weights): FSDP2-sharded weights are refused."""
    if is_dtensor(w.dense):
        raise ValueError(f"{w.name}: method {method!r} does not support sharded (FSDP2) "
                         "weights yet; sparsify and train it unsharded")
    return nm_geometry(w, method)
