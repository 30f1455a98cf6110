"""Baking masks in: what ``finalize`` and ``handle.finalize()`` do to a set of sparse
weights. Below the handle (which calls it) and ``make_sparse`` (which re-exports the verbs),
so neither imports the other."""

from __future__ import annotations

from torch import nn

from .selection import qualified
from .sparse_module import detach, detach_tied, sparse_states, tied_states
from .sparse_weight import SparseWeight
from .written import settle_before_finalize

# DDP would broadcast the masks every forward; sparsify lists them here (see make_sparse).
DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


def finalize_weights(model: nn.Module, weights: list[SparseWeight]) -> None:
    """Bake ``weights``' masks in, restore their modules' classes and release their handles."""
    settle_before_finalize(model, weights)  # a LoRA merge into a forward weight is kept
    chosen = {id(w) for w in weights}
    mask_names, handles = set(), {}
    for module_name, module in model.named_modules():
        states = sparse_states(module)
        names = [param for param, w in states.items() if id(w) in chosen]
        for param in names:
            w = states[param]
            mask_names.add(qualified(module_name, w.mask_name))
            if w.handle is not None:
                handles[id(w.handle)] = w.handle
        detach(module, names)
    for module in model.modules():
        if tied_states(module):
            detach_tied(module, weights)
    for handle in handles.values():
        handle.weights = {name: w for name, w in handle.weights.items() if id(w) not in chosen}
        if not handle.weights:
            handle.release()
    ignored = [name for name in getattr(model, DDP_IGNORE, []) if name not in mask_names]
    if hasattr(model, DDP_IGNORE):
        if ignored:
            setattr(model, DDP_IGNORE, ignored)
        else:
            delattr(model, DDP_IGNORE)
