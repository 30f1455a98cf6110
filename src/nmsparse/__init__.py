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
from .engine.handle import LayerReport, SparsityHandle
from .engine.make_sparse import drive, finalize, handles_of, sparsify
from .engine.masks import MASK_SUFFIX, nm_mask, saved_masks
from .engine.sparse_weight import SparseWeight
from .hf.pretrained import load_pretrained
from .lora import LoraMerge, merge_lora
from .methods import ASP, METHODS, SRSTE, STE, Fixed, Method, Step, make_method
from .oneshot import PruneResult, prune
from .packing import PackedWeight, pack, unpack
from .patterns import NM, PATTERN_KINDS, Pattern, Unstructured, Violations, parse_pattern
from .resize import resize_token_embeddings
from .sad import SADResult, SADTracker, sad
from .summary import ModelSummary, summary

__version__ = "0.1.0"

__all__ = [
    "ASP", "MASK_SUFFIX", "METHODS", "NM", "PATTERN_KINDS", "SRSTE", "STE", "CheckReport",
    "Fixed", "LayerReport", "LoraMerge", "Method", "ModelSummary", "NMViolationError",
    "PackedWeight", "Pattern", "PruneResult", "SADResult", "SADTracker", "SparseWeight",
    "SparsityHandle", "Step", "Unstructured", "Violations", "check", "drive", "finalize",
    "handles_of", "load_pretrained", "make_method", "merge_lora", "nm_mask", "pack",
    "parse_pattern", "prune", "resize_token_embeddings", "sad", "saved_masks", "sparsify",
    "summary", "unpack",
]
