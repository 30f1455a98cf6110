"""A warning when a sparse module is replaced by another module while its handle is live.

Code that rebuilds a layer instead of changing it (Hugging Face's ``resize_token_embeddings``
builds a new ``nn.Linear`` head and an ``nn.Embedding``; hand-written surgery does the same)
silently drops nmsparse from that layer: the new module is dense and trains dense while the
handle still reports the old one as sparse. Torch calls a global module-registration hook on
every ``parent.name = module`` / ``register_module``; while a handle is live nmsparse
installs one that warns when the module being replaced holds (or reads) a sparse weight and
the new module does not contain the old one (wrapping it, as adapter libraries do, is fine).
"""

from __future__ import annotations

import warnings

from torch import nn

from .sparse_module import sparse_states, tied_states


class SparseModuleReplacedWarning(UserWarning):
    """A module holding a sparse weight was replaced; the replacement is dense."""


def warn_if_sparse_module_replaced(parent: nn.Module, name: str,
                                   new: nn.Module | None) -> None:
    """The module-registration hook: returns None, so registration proceeds unchanged."""
    old = parent.__dict__.get("_modules", {}).get(name)
    if old is None or old is new:
        return None
    weights = {**sparse_states(old), **tied_states(old)}
    if not weights:
        return None
    if new is not None and any(module is old for module in new.modules()):
        return None
    what = ", ".join(sorted(w.name for w in weights.values()))
    replacement = "None" if new is None else f"a {type(new).__name__}"
    warnings.warn(
        f"the module holding sparse weight {what} was replaced by {replacement}: the new "
        "module is dense and trains dense (Hugging Face resize_token_embeddings does this; use "
        "nmsparse.resize_token_embeddings, or nmsparse.finalize before changing the layer)",
        SparseModuleReplacedWarning, stacklevel=3)
    return None
