"""Training methods, found by name in :data:`METHODS` (see :mod:`nmsparse.methods.base` for
the protocol and how to write one)."""

from .base import (
    METHODS,
    Method,
    Step,
    kept_gradient_only,
    make_method,
    straight_through,
)
from .decaying import Decaying
from .fixed import ASP, Fixed
from .gradual import Gradual
from .reweighted import Reweighted
from .sste import SSTE
from .ste import SRSTE, STE
from .step_adam import STEP

__all__ = ["ASP", "METHODS", "SRSTE", "STE", "Fixed", "Method", "Step", "kept_gradient_only",
           "make_method", "straight_through"]
__all__ += ["SSTE", "Decaying", "Gradual", "STEP", "Reweighted"]
