"""nmsparse: N:M fine-grained structured sparsity for PyTorch.

"N:M" means keep N of every M consecutive weights along the input dimension (2:4 keeps half).
Train sparse networks from scratch with SR-STE, track how their masks evolve (SAD), count
their parameters and MACs, check and finalize them.

    import nmsparse
    handle = nmsparse.sparsify(model, "2:4", method="srste", decay=2e-4)
    ...  # an ordinary training loop: no extra call
    nmsparse.finalize(model)

Importing nmsparse is light: it loads no GPU code and initialises no CUDA.
"""

from .check import CheckReport, NMViolationError, check
from .handle import LayerReport, SparsityHandle
from .make_sparse import drive, finalize, handles_of, sparsify
from .masks import nm_mask, saved_masks
from .methods import ASP, METHODS, SRSTE, STE, Fixed, Method, Step, make_method
from .oneshot import PruneResult, prune
from .packing import PackedWeight, pack, unpack
from .patterns import NM, PATTERN_KINDS, Pattern, Unstructured, Violations, parse_pattern
from .resize import resize_token_embeddings
from .sad import SADResult, SADTracker, sad
from .sparse_weight import SparseWeight
from .summary import ModelSummary, summary

__version__ = "0.1.0"

__all__ = [
    "ASP", "METHODS", "NM", "PATTERN_KINDS", "STE", "SRSTE", "CheckReport", "Fixed",
    "LayerReport", "Method", "ModelSummary", "NMViolationError", "PackedWeight", "Pattern",
    "PruneResult", "SADResult", "SADTracker", "SparseWeight", "SparsityHandle", "Step",
    "Unstructured", "Violations", "check", "drive", "finalize", "handles_of", "make_method",
    "nm_mask", "pack", "parse_pattern", "prune", "resize_token_embeddings", "sad", "saved_masks",
    "sparsify", "summary", "unpack",
]
