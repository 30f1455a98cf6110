"""LoRA adapters on sparse models: merge them without losing N:M, and never lose one silently.

Training a LoRA (PEFT's ``get_peft_model``) on a sparse model needs nothing special: PEFT
freezes the base layers and wraps them, so the base keeps its masks and the adapters train
dense beside it. Merging is where N:M is at stake, since ``B @ A`` is dense:

* :func:`merge_lora` adds each adapter's delta to its base layer's dense weight, lets the
  layer's method re-mask it (a fixed mask keeps its mask; a magnitude method ranks
  ``|W + delta|``), reports per layer how much of the delta's norm the pattern dropped, and
  unloads the adapters as PEFT's ``merge_and_unload`` does. For a finalized model (plain N:M
  weights) pass ``pattern=``: the merged delta is masked to each layer's non-zeros.
* PEFT's own merge writes into ``base_layer.weight.data``, which on a live sparse layer is the
  masked forward weight, a cache no version counter tracks (or, with ``safe_merge=True``, a
  temporary, so the delta would vanish). nmsparse looks for that when PEFT unloads the
  adapter (the module swap) and in ``finalize``: the written (or lost) delta is moved into the
  dense weight and re-masked as :func:`merge_lora` does, with a :class:`LoraMergeWarning`
  saying how much was dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine.selection import layer_pattern
from .engine.sparse_module import sparse_states
from .engine.sparse_weight import SparseWeight, refresh_stale
from .patterns import Pattern, parse_pattern
from .tables import format_table


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


@dataclass
class LoraMerge:
    """What :func:`merge_lora` did: the model without adapters, and one row per merged
    base weight."""

    model: nn.Module
    layers: list[MergedLayer] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [[row.name, str(row.pattern or "dense"), f"{row.delta_norm:.4g}",
                 f"{row.dropped:.1%}"] for row in self.layers]
        return (f"nmsparse: merged LoRA into {len(self.layers)} base weight(s)\n"
                + format_table(["weight", "pattern", "|delta|", "dropped"], rows,
                               right_aligned=(2, 3)))


# -- the building blocks ---------------------------------------------------------------------
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


# -- merge_lora -----------------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, tuner layer)`` of every PEFT LoRA layer, outermost only."""
    from peft.tuners.lora import LoraLayer

    found, inside = [], set()
    for parent in model.modules():
        if id(parent) in inside:
            continue
        for name, child in parent.named_children():
            if isinstance(child, LoraLayer) and id(child) not in inside:
                found.append((parent, name, child))
                inside.update(id(m) for m in child.modules())
    return found


def _adapter_delta(layer: nn.Module) -> torch.Tensor:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    variants = [a for a in adapters if a in getattr(layer, "lora_variant", {})]
    if variants:
        raise ValueError(f"merge_lora merges plain LoRA adapters; {variants} are LoRA "
                         "variants (DoRA, ...): merge those with PEFT and check the result")
    with torch.no_grad():
        return sum((layer.get_delta_weight(a) for a in adapters),
                   torch.zeros_like(layer.get_base_layer().weight.detach()))


def merge_lora(model: nn.Module, pattern: object = None) -> LoraMerge:
    """Merge the active LoRA adapters of ``model`` (a PEFT model, or a model PEFT injected
    adapters into) into their base weights keeping N:M, and remove the adapters.

    A live sparse base layer gets the delta in its dense weight, re-masked by its method. A
    base that is not live sparse (a finalized model) is merged with the delta masked to its
    ``pattern`` (``"2:4"``, ...) non-zeros if ``pattern`` is given and its weight follows it,
    else merged dense (the report says ``dense``). Returns a :class:`LoraMerge`: the model
    without adapters (as ``merge_and_unload`` returns it) and per layer the share of the
    delta's norm the pattern dropped.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no PEFT LoRA layer to merge")
    pattern = None if pattern is None else parse_pattern(pattern)
    merged = [layer for _, _, layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError("PEFT has already merged adapters into some base layers; call "
                         "model.unmerge_adapter() first, then merge_lora")
    plan = []  # every delta and decision first: an error changes nothing
    for _, _, layer in layers:
        base = layer.get_base_layer()
        delta = _adapter_delta(layer)
        live = sparse_states(base).get("weight")
        if live is not None and live._sharded is not None:
            raise ValueError(f"{live.name}: merging into a sharded (FSDP) sparse weight is "
                             "not supported; merge before sharding")
        if any(layer.lora_bias.get(a) for a in layer.active_adapters) \
                and getattr(base, "bias", None) is None:
            raise ValueError("a LoRA adapter with lora_bias=True sits on a base layer without "
                             "a bias: nothing to merge its bias into")
        keep = None
        if live is None and pattern is not None:
            chosen = layer_pattern(base, pattern)
            weight = base.weight.detach()
            if chosen.why_not(tuple(weight.shape)) is None and chosen.violations(weight).ok:
                keep = chosen
        plan.append((layer, base, delta, live, keep))
    if pattern is None and not any(live is not None for _, _, _, live, _ in plan):
        raise ValueError("no LoRA base layer is a live sparse layer: for a finalized model "
                         "pass pattern= (e.g. merge_lora(model, '2:4')) to keep its N:M; "
                         "PEFT's merge_and_unload merges dense")
    # rows are named as the model without adapters names them (as sparsify did)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = {id(module): name for name, module in root.named_modules()}
    report = LoraMerge(model)
    for layer, base, delta, live, keep in plan:
        if live is not None:
            report.layers.append(absorb(live, delta))
            continue
        name = names.get(id(layer), "") + ".weight"
        with torch.no_grad():
            weight = base.weight
            kept = delta if keep is None else delta * keep.mask(weight.detach().abs())
            weight.add_(kept.to(weight.dtype))
        report.layers.append(MergedLayer(name, keep, float(delta.norm()),
                                         float((delta - kept).norm())))
    for layer, _, _, _, _ in plan:
        for adapter in [a for a in layer.active_adapters if a in layer.lora_A]:
            if layer.lora_bias.get(adapter):
                with torch.no_grad():
                    layer.get_base_layer().bias.add_(
                        layer.lora_B[adapter].bias * layer.scaling[adapter])
    report.model = _unload(model, layers)
    return report


def _unload(model: nn.Module, layers: list[tuple[nn.Module, str, nn.Module]]) -> nn.Module:
    """Remove the adapters (now merged) as PEFT's unload does."""
    if hasattr(model, "unload"):  # PeftModel / LoraModel: PEFT's own bookkeeping too
        return model.unload()
    for parent, name, layer in layers:
        setattr(parent, name, layer.get_base_layer())
    return model
