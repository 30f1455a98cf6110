"""A delta written into a sparse layer's forward weight, found and kept.

The forward weight of a live sparse layer is a cache of ``W * mask`` that no version counter
tracks, so ``module.weight.data += delta`` (PEFT's ``merge_and_unload``, or any in-place
merge) would be lost at the next rebuild, and PEFT's ``safe_merge`` writes into a temporary
that vanishes. ``finalize`` and the module-registration hook call these to move such a delta
into the dense weight, re-masked by the layer's method, with a warning that says how much of
it the pattern dropped. :mod:`nmsparse.lora` builds ``merge_lora`` on the same blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..patterns import Pattern
from .sparse_module import sparse_states
from .sparse_weight import SparseWeight, refresh_stale


class LoraMergeWarning(UserWarning):
    """A delta merged into a sparse layer's forward weight was re-masked to its pattern."""


@dataclass(frozen=True)
class MergedLayer:
    """One merged base weight: the delta's norm and the norm the pattern dropped (how far the
    merged forward weight is from ``forward weight + delta``)."""

    name: str
    pattern: Pattern | None  # None: merged dense (the base layer was not sparse)
    delta_norm: float
    dropped_norm: float

    @property
    def dropped(self) -> float:
        """The dropped share of the delta's norm (0 for an empty delta)."""
        return self.dropped_norm / self.delta_norm if self.delta_norm else 0.0


def _kept_forward(w: SparseWeight) -> torch.Tensor:
    """``W * mask``: the forward weight as nmsparse built it."""
    zero = torch.zeros((), dtype=w.dense.dtype, device=w.dense.device)
    return torch.where(w.mask, w.dense.detach(), zero)


def written_delta(w: SparseWeight) -> torch.Tensor | None:
    """What was written into ``w``'s cached forward weight in place since it was built
    (``module.weight.data += delta`` bumps no version counter), or ``None``."""
    if w.masked is None or w._built_from is None or w._sharded is not None \
            or w._built_from[:-1] != w._fingerprint():
        return None  # no cache, or one the dense weight or mask left behind: rebuilt anyway
    with torch.no_grad():
        delta = w.masked - _kept_forward(w)
    return delta if bool(delta.ne(0).any()) else None  # NaN != 0 counts as written


def absorb(w: SparseWeight, delta: torch.Tensor) -> MergedLayer:
    """Add ``delta`` to ``w``'s dense weight and let ``w``'s method re-mask it."""
    with torch.no_grad():
        intended = _kept_forward(w) + delta
        w.dense.add_(delta.to(w.dense.dtype))
        w.mark_stale()
        refresh_stale([w])
        dropped = (intended - _kept_forward(w)).norm()
    return MergedLayer(w.name, w.pattern, float(delta.norm()), float(dropped))


def peft_merged_delta(layer: nn.Module, base: nn.Module) -> torch.Tensor | None:
    """The delta PEFT merged (or meant to merge) into ``base`` if ``layer`` is a PEFT tuner
    layer over it with merged adapters; recognised by PEFT's attributes, not imported."""
    merged = getattr(layer, "merged_adapters", None)
    if not merged or not hasattr(layer, "get_delta_weight") \
            or not hasattr(layer, "get_base_layer") or layer.get_base_layer() is not base:
        return None
    with torch.no_grad():
        return sum(layer.get_delta_weight(adapter) for adapter in merged)


def settle_written(w: SparseWeight, peft_layer: nn.Module | None = None) -> None:
    """Move a delta written into ``w``'s forward weight (or merged by PEFT's ``peft_layer``
    into a temporary) into the dense weight, re-masked, with a warning."""
    delta = written_delta(w)
    if delta is None and peft_layer is not None:
        delta = peft_merged_delta(peft_layer, w.module)
    if delta is None:
        return
    row = absorb(w, delta)
    warnings.warn(
        f"nmsparse: {w.name}: a delta was merged into the masked forward weight (PEFT "
        f"merge_and_unload?); it was moved into the dense weight and re-masked to "
        f"{w.pattern}, dropping {row.dropped:.1%} of its norm; nmsparse.merge_lora(model) "
        "merges LoRA adapters keeping N:M and reports this per layer",
        LoraMergeWarning, stacklevel=4)


def notice_unload(parent: nn.Module, name: str, new: nn.Module | None) -> None:
    """Module-registration hook: a sparse module put back in place of the module that wrapped
    it (PEFT unloading an adapter) may carry a merge in its forward weight."""
    if new is None:
        return
    weights = sparse_states(new)
    if not weights:
        return
    old = parent.__dict__.get("_modules", {}).get(name)
    for w in weights.values():
        settle_written(w, old if old is not new else None)


def settle_before_finalize(model: nn.Module, weights: list[SparseWeight]) -> None:
    """``finalize`` bakes ``W * mask``: first settle any merge into the forward weights,
    including one by a PEFT layer still wrapping its base."""
    wrappers = {}
    for module in model.modules():
        if getattr(module, "merged_adapters", None) and hasattr(module, "get_base_layer"):
            wrappers[id(module.get_base_layer())] = module
    for w in weights:
        settle_written(w, wrappers.get(id(w.module)))
