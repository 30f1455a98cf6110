"""Training methods, found by name in :data:`METHODS` (see :mod:`nmsparse.methods.base` for
the protocol and how to write one)."""

from .base import (
    METHODS,
    Method,
    ModelMethod,
    Step,
    kept_gradient_only,
    make_method,
    straight_through,
)
from .decaying import Decaying
from .fixed import ASP, Fixed
from .gap import GaP
from .gradual import Gradual
from .maskllm import MaskLLM
from .nested import Nested
from .proxsparse import ProxSparse
from .prune_grow import MEST, SET, PruneGrow, RigL
from .reweighted import Reweighted
from .sste import SSTE
from .ste import SRSTE, STE
from .step_adam import STEP

__all__ = ["ASP", "METHODS", "SRSTE", "STE", "Fixed", "Method", "ModelMethod", "Step",
           "kept_gradient_only", "make_method", "straight_through"]
__all__ += ["GaP", "MEST", "Nested", "SET", "PruneGrow", "RigL"]
__all__ += ["SSTE", "Decaying", "Gradual", "STEP", "Reweighted"]
__all__ += ["MaskLLM", "ProxSparse"]
