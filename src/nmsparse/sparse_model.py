"""``sparsify(model, ...)``: make a model's eligible layers N:M sparse, in place.

The returned :class:`SparsityHandle` reports every eligible layer (made sparse, or why not),
hands out the live masks and can :meth:`~SparsityHandle.finalize` the model. Training then
needs no extra call: the optimizer hooks (``nmsparse.hooks``) add the SR-STE term and refresh
the masks inside ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import hooks
from ._table import format_table
from .layers import STATE_ATTRIBUTE, SparseWeight, attach, detach, sparse_states
from .masks import check_layout, compute_mask, grouping_error, nonfinite_error
from .methods import Method, make_method
from .patterns import NM
from .selection import PatternSpec, choose_patterns, eligible_weights, qualified

_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


@dataclass(frozen=True)
class LayerReport:
    """One eligible weight: the pattern it got, or the reason it stayed dense."""

    name: str
    kind: str
    shape: tuple[int, ...]
    pattern: NM | None
    reason: str = ""

    @property
    def sparse(self) -> bool:
        return self.pattern is not None


class SparsityHandle:
    """What :func:`sparsify` did, and access to the live sparse state of the model."""

    def __init__(self, model: nn.Module, layers: list[LayerReport], method: Method,
                 layout: str) -> None:
        self.model = model
        self.layers = layers
        self.method = method
        self.layout = layout

    @property
    def sparse_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.sparse]

    @property
    def skipped_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.sparse]

    def states(self) -> list[SparseWeight]:
        return [state for module in self.model.modules()
                for state in sparse_states(module).values()]

    def masks(self) -> dict[str, torch.Tensor]:
        """``{qualified weight name: bool mask}``; the live buffers, updated in place."""
        states = self.states()
        hooks.refresh_stale(states)
        return {state.name: state.mask for state in states}

    def add_decay_to_grads(self) -> None:
        """For hand-written update loops only: add the SR-STE term to the gradients."""
        hooks.add_decay(self.states())

    def refresh(self) -> None:
        """Rebuild masks whose weights changed (done automatically by optimizers)."""
        hooks.refresh_stale(self.states())

    def finalize(self) -> nn.Module:
        return finalize(self.model)

    def __str__(self) -> str:
        rows = [[layer.name, layer.kind, "x".join(map(str, layer.shape)),
                 str(layer.pattern) if layer.sparse else "dense", layer.reason]
                for layer in self.layers]
        title = (f"nmsparse: {len(self.sparse_layers)} of {len(self.layers)} eligible weights "
                 f"sparse, method={self.method}, layout={self.layout!r}")
        return title + "\n" + format_table(["weight", "type", "shape", "pattern", "note"], rows)

    def __repr__(self) -> str:
        return (f"SparsityHandle(sparse={len(self.sparse_layers)}, "
                f"skipped={len(self.skipped_layers)}, method={self.method!r})")


def sparsify(model: nn.Module, pattern: PatternSpec | Mapping[str, PatternSpec] = "2:4",
             method: str | Method = "srste", decay: float | None = None, *,
             include: str | Sequence[str] | None = None,
             exclude: str | Sequence[str] | None = None, layout: str = "in",
             strict: bool = False) -> SparsityHandle:
    """Make ``model``'s eligible layers N:M sparse in place and return a report handle.

    Args:
        pattern: ``"N:M"`` (keep N of every M) for every layer, or ``{glob: "N:M" or None}``
            per layer (first matching glob wins; ``None``/``"dense"`` keeps a layer dense).
        method: ``"srste"`` (default), ``"ste"``, ``"fixed"`` or a :class:`Method`.
        decay: SR-STE refinement strength (default 2e-4); only valid with ``"srste"``.
        include / exclude: globs on qualified module (or weight) names.
        layout: ``"in"`` (hardware grouping along input channels) or ``"flat"``.
        strict: raise instead of skipping a layer whose grouped dim is not divisible by M.
    """
    method = make_method(method, decay)
    check_layout(layout)
    candidates = list(eligible_weights(model))
    if not candidates:
        raise ValueError("the model has no layer nmsparse can make sparse "
                         "(nn.Linear, nn.Conv1d/2d/3d, nn.MultiheadAttention)")
    names = [(module_name, qualified(module_name, param)) for module_name, _, param in
             candidates]
    choices = choose_patterns(names, pattern, include, exclude)

    reports, plan, seen = [], [], {}
    for (module_name, module, param), (_, name), (nm, reason) in zip(candidates, names,
                                                                     choices, strict=True):
        weight = module._parameters[param]
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{name} is uninitialized (a lazy module): run one forward pass "
                             "before sparsify")
        if getattr(weight, STATE_ATTRIBUTE, None) is not None:
            raise ValueError(f"{name} is already sparse; call nmsparse.finalize(model) first")
        if nm is not None and id(weight) in seen:
            nm, reason = None, f"shares its Parameter with {seen[id(weight)]} (kept dense)"
        if nm is not None and not torch.is_floating_point(weight):
            nm, reason = None, f"dtype {weight.dtype} is not floating point"
        if nm is not None and (error := grouping_error(tuple(weight.shape), nm.m, layout)):
            if strict:
                raise ValueError(f"{name}: {error} (strict=True)")
            nm, reason = None, error
        reports.append(LayerReport(name, type(module).__name__, tuple(weight.shape), nm,
                                   reason))
        if nm is not None:
            seen[id(weight)] = name
            plan.append((module_name, module, param, name, nm))
    if not plan:
        handle = SparsityHandle(model, reports, method, layout)
        raise ValueError(f"no layer of the model can take the requested pattern:\n{handle}")

    # Every mask is computed before the model is touched, so an error changes nothing.
    masks = []
    for _, module, param, name, nm in plan:
        weight = module._parameters[param]
        if not bool(torch.isfinite(weight).all()):
            raise nonfinite_error(name)
        masks.append(compute_mask(weight, nm, layout))
    for _, module, param, name, _ in plan:
        if param + "_mask" in module._buffers or hasattr(module, param + "_mask"):
            raise ValueError(f"{name}: the module already has an attribute "
                             f"'{param}_mask' (torch.nn.utils.prune applied?)")
    for (_, module, param, name, nm), mask in zip(plan, masks, strict=True):
        state = SparseWeight(module, param, name, nm, layout, method)
        attach(module, state, mask)
        state.refresh()
    # DDP would broadcast the masks every forward; they are equal on all ranks anyway
    # because they are a deterministic function of the (synchronised) weights.
    ignored = list(getattr(model, _DDP_IGNORE, []))
    ignored += [qualified(module_name, param + "_mask") for module_name, _, param, _, _ in plan]
    setattr(model, _DDP_IGNORE, ignored)
    hooks.install()
    return SparsityHandle(model, reports, method, layout)


def finalize(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights and remove all nmsparse machinery, in place.

    The result has the original module classes and ``state_dict()`` keys, loads into the
    unmodified architecture and computes the same outputs. Returns ``model``.
    """
    mask_names = set()
    for module_name, module in model.named_modules():
        for state in sparse_states(module).values():
            mask_names.add(qualified(module_name, state.mask_name))
        detach(module)
    ignored = [name for name in getattr(model, _DDP_IGNORE, []) if name not in mask_names]
    if hasattr(model, _DDP_IGNORE):
        if ignored:
            setattr(model, _DDP_IGNORE, ignored)
        else:
            delattr(model, _DDP_IGNORE)
    return model
