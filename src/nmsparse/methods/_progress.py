"""Where a weight is in its training run, for methods whose forward weight follows a schedule.

* :func:`steps_taken` - the optimizer steps its handle has completed (``handle.steps``, saved
  by ``handle.state_dict()``, so a resumed run continues the schedule where it stopped);
* :func:`training` - whether its module is in training mode. The methods built on these
  compute with the plain N:M weight (``W * mask``) in evaluation mode, so what is evaluated
  is the sparse network that ``finalize`` produces, never a half-pruned one.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def steps_taken(w: Any) -> int:
    """Optimizer steps completed by ``w``'s handle (0 for a weight without one)."""
    handle = getattr(w, "handle", None)
    return 0 if handle is None else int(handle.steps)


def training(w: Any) -> bool:
    return bool(w.module.training)


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ``ValueError`` saying what is accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    """``value`` as a finite float in ``[low, high]``, or a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}, "
                         f"got {value!r}")
    return value
