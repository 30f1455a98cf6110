"""Validation of model options and input shapes, shared by the model files.

Each helper returns the normalised value or raises ``ValueError`` with a one-line message
naming the model, what is wrong and what is accepted. ``bool`` is rejected where a number
is expected (``True`` is an ``int`` in Python, but never a sensible width or depth).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(model: str, option: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{model}: option {option}={value!r} is invalid; expected a positive "
                         "int")
    return int(value)


def positive_float(model: str, option: str, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{model}: option {option}={value!r} is invalid; expected a positive "
                         "number")
    return float(value)


def probability(model: str, option: str, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not 0 <= value < 1:
        raise ValueError(f"{model}: option {option}={value!r} is invalid; expected a number "
                         "in [0, 1)")
    return float(value)


def boolean(model: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{model}: option {option}={value!r} is invalid; expected True or "
                         "False")
    return value


def int_sequence(model: str, option: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v > 0 for v in value):
        raise ValueError(f"{model}: option {option}={value!r} is invalid; expected a "
                         "tuple/list of positive ints, e.g. [256, 256]")
    return tuple(int(v) for v in value)


def choice(model: str, option: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{model}: option {option}={value!r} is invalid; expected one of "
                         f"{', '.join(map(repr, allowed))}")
    return value


def image_shape(model: str, input_shape: tuple[int, ...],
                min_size: int = 1) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_shape``, with ``H, W >= min_size``."""
    if len(input_shape) != 3:
        raise ValueError(f"{model} takes images shaped (C, H, W), got input_shape "
                         f"{tuple(input_shape)}; use 'mlp' for flat features")
    channels, height, width = input_shape
    if min(height, width) < min_size:
        raise ValueError(f"{model} needs images of at least {min_size}x{min_size} pixels, got "
                         f"{height}x{width}")
    return channels, height, width


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest int, at least 1."""
    return max(1, round(channels * width))
