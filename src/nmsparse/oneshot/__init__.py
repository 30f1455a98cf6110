"""One-shot pruning of trained models: magnitude, Wanda, RIA and SparseGPT, to any pattern.

    import nmsparse
    result = nmsparse.prune(model, "2:4", pruner="sparsegpt", calibration=batches)
    print(result)  # per layer: density, or why it stayed dense
    ...            # optionally fine-tune: the masks are held (method "fixed" by default)
    nmsparse.finalize(model)

See :mod:`nmsparse.oneshot.prune` for the order of work and :data:`PRUNERS` for the methods.
"""

from . import magnitude, ria, sparsegpt, wanda  # noqa: F401  (register the pruners)
from .base import PRUNERS, Pruner
from .prune import PrunedLayer, PruneResult, prune
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = ["PRUNERS", "RIA", "PruneResult", "PrunedLayer", "Pruner", "SparseGPT", "Wanda",
           "prune"]
