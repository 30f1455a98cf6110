"""Training methods: how a sparse layer's mask evolves and what gradient its dense weight gets.

* ``SRSTE(decay)`` (Zhou et al., ICLR 2021): the mask is recomputed from the dense weights
  after every update; the dense weight receives the gradient of the masked weight passed
  straight through to every entry, plus ``decay * (1 - mask) * W`` once per optimizer step.
* ``STE``: SR-STE with ``decay = 0``.
* ``Fixed``: the mask is computed once from the current weights, pruned weights are set to 0
  and kept exactly 0 (the fine-tune phase of NVIDIA's ASP prune-and-retrain recipe).

New methods register themselves by name in ``METHODS`` and are found by :func:`make_method`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Method:
    """Base class: subclasses set the class-level switches and register by name."""

    name: ClassVar[str]
    recomputes_mask: ClassVar[bool]  # mask follows the dense weights after every update
    gradient_to_pruned: ClassVar[bool]  # pruned weights receive the straight-through gradient

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        METHODS[cls.name] = cls

    @property
    def decay(self) -> float:
        return 0.0


@dataclass(frozen=True)
class SRSTE(Method):
    """Sparse-refined straight-through estimator with refinement strength ``decay``."""

    name: ClassVar[str] = "srste"
    recomputes_mask: ClassVar[bool] = True
    gradient_to_pruned: ClassVar[bool] = True
    decay: float = 2e-4

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)):
            raise ValueError(f"decay must be a number >= 0, got {self.decay!r}")
        if not math.isfinite(self.decay) or self.decay < 0:
            raise ValueError(f"decay must be a finite number >= 0, got {self.decay!r}")


@dataclass(frozen=True)
class STE(Method):
    """Plain straight-through estimator: SR-STE without the refinement term."""

    name: ClassVar[str] = "ste"
    recomputes_mask: ClassVar[bool] = True
    gradient_to_pruned: ClassVar[bool] = True


@dataclass(frozen=True)
class Fixed(Method):
    """Mask fixed at sparsify time; pruned weights stay exactly zero."""

    name: ClassVar[str] = "fixed"
    recomputes_mask: ClassVar[bool] = False
    gradient_to_pruned: ClassVar[bool] = False


def make_method(method: str | Method, decay: float | None = None) -> Method:
    """Resolve a method name (``"srste"``, ``"ste"``, ``"fixed"``) or instance.

    ``decay`` is only meaningful for SR-STE; giving it for another method is an error rather
    than silently ignored.
    """
    if isinstance(method, Method):
        if decay is not None and decay != method.decay:
            raise ValueError(f"decay={decay!r} conflicts with the method instance {method!r}")
        return method
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(sorted(METHODS))}")
    cls = METHODS[method.lower()]
    if cls is SRSTE:
        return SRSTE() if decay is None else SRSTE(decay)
    if decay not in (None, 0, 0.0):
        raise ValueError(f"method {cls.name!r} takes no decay (got decay={decay!r}); "
                         "use method='srste' for the sparse-refined decay")
    return cls()
