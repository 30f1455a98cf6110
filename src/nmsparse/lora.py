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

from dataclasses import dataclass, field

import torch
from torch import nn

from .engine.selection import layer_pattern
from .engine.sparse_module import sparse_states
from .engine.written import LoraMergeWarning, MergedLayer, absorb
from .patterns import parse_pattern
from .tables import format_table

__all__ = ["LoraMerge", "LoraMergeWarning", "MergedLayer", "merge_lora"]


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
