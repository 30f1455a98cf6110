"""``sparsify(model, ...)`` makes a model's eligible layers sparse in place; ``finalize``
bakes the masks in and removes every trace of nmsparse.

The returned :class:`~nmsparse.engine.handle.SparsityHandle` reports every eligible layer (made
sparse, or why not) and owns the per-step machinery. Training then needs no extra call: the
optimizer step hooks (:mod:`nmsparse.engine.step_hooks`) run each method inside
``optimizer.step()``. A later ``sparsify`` may make other, still dense, layers sparse with
other patterns and methods; each call returns its own handle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..methods import Method, ModelMethod, make_method
from ..patterns import OnTranspose
from ..patterns.grouping import check_layout
from . import step_hooks
from .baking import DDP_IGNORE, finalize_weights
from .handle import LayerReport, SparsityHandle
from .masks import nonfinite_error
from .selection import (
    UNINITIALIZED,
    Choice,
    PatternSpec,
    check_tied,
    parameter_holders,
    qualified,
    select,
)
from .sparse_module import attach, attach_tied, check_mask, sparse_states
from .sparse_weight import SparseWeight


# Masks and cached forward weights must track versions, which inference tensors cannot: made
# as normal tensors even when the caller runs under torch.inference_mode().
@torch.inference_mode(False)
def sparsify(model: nn.Module, pattern: PatternSpec | Mapping[str, object] = "2:4",
             method: str | Method = "srste", *,
             include: str | Sequence[str] | None = None,
             exclude: str | Sequence[str] | None = None, layout: str = "in",
             strict: bool = False, masks: Mapping[str, torch.Tensor] | None = None,
             tied: str = "dense", **method_options) -> SparsityHandle:
    """Make ``model``'s eligible layers sparse in place and return the handle.

    Args:
        pattern: a pattern for every layer (``"2:4"`` keeps 2 of every 4, any
            :class:`~nmsparse.patterns.Pattern`), or ``{glob: rule}`` per layer (first
            matching glob wins), a rule being a pattern, ``None`` / ``"dense"``, or a pair
            ``(pattern, method)``, e.g. ``{"layer1.*": ("4:8", "ste"), "fc": None,
            "*": ("2:4", SRSTE(decay=2e-4))}``.
        method: the method of rules that name none: a registered name (``"srste"``,
            ``"ste"``, ``"fixed"``, ``"asp"``, ...) or a :class:`~nmsparse.methods.Method`.
        **method_options: hyperparameters of a ``method`` given by name, e.g. ``decay=2e-4``
            (SR-STE's refinement strength); one the method does not take is an error.
        include / exclude: globs on qualified module (or weight) names.
        layout: grouping of ``"N:M"`` specs: ``"in"`` (input channels, the hardware
            layout) or ``"flat"`` (memory order).
        strict: raise instead of skipping a layer whose shape cannot take its pattern.
        masks: ``{weight name: bool mask}`` to start from instead of the method's initial
            mask (a one-shot pruner's result, a saved ticket); each must follow its layer's
            pattern, and every name must be a weight this call makes sparse. They are
            copied: later mask updates never write into the caller's tensors.
        tied: a weight that other modules also read (an LM head tied to the input
            embedding): ``"dense"`` (default) keeps it dense, with the reason in the report;
            ``"sparse"`` makes it sparse for every module that reads it, so the trained and
            the finalized model compute the same.
    """
    _check_model(model)
    check_tied(tied)
    default_method = make_method(method, **method_options)
    check_layout(layout)
    choices = select(model, pattern, include, exclude, method=default_method, layout=layout,
                     tied=tied, strict=strict)
    return sparsify_choices(model, choices, masks)


@torch.inference_mode(False)
def sparsify_choices(model: nn.Module, choices: list[Choice],
                     masks: Mapping[str, torch.Tensor] | None = None) -> SparsityHandle:
    """Make the weights ``choices`` give a pattern sparse (:func:`nmsparse.engine.selection.select`
    decided them; ``prune`` hands over its own selection here) and return the handle."""
    check_choices(choices)
    holders = parameter_holders(model)
    handle = SparsityHandle(model, [])
    plan = []
    for choice in choices:
        weight = choice.weight
        if choice.sparse_state is not None:
            if choice.requested:
                raise ValueError(f"{choice.name} is already sparse; call "
                                 "nmsparse.finalize(model) first, or leave it out of this call "
                                 "(include/exclude)")
            continue  # sparse from an earlier call and not asked for: not this handle's
        handle.layers.append(LayerReport(choice.name, type(choice.module).__name__,
                                         tuple(weight.shape), choice.pattern, choice.reason,
                                         choice.method))
        if choice.pattern is not None:
            plan.append((choice.module_name,
                         SparseWeight(choice.module, choice.param, choice.name, choice.pattern,
                                      choice.method, handle)))
    if not plan:
        raise ValueError(f"no layer of the model can take the requested pattern:\n{handle}")
    given = dict(masks or {})
    unknown = sorted(set(given) - {w.name for _, w in plan})
    if unknown:
        raise ValueError(f"masks given for weights this call does not make sparse: {unknown}; "
                         f"sparse here: {[w.name for _, w in plan]}")

    # Every mask is computed and checked before the model is touched: an error changes nothing.
    initial = []
    for _, w in plan:
        if not bool(torch.isfinite(w.dense).all()):
            raise nonfinite_error(w.name)
        initial.append(_initial_mask(w, given.get(w.name)))
    for _, w in plan:
        if w.mask_name in w.module._buffers or hasattr(w.module, w.mask_name):
            raise ValueError(f"{w.name}: the module already has an attribute "
                             f"{w.mask_name!r} (torch.nn.utils.prune applied?)")
    for (_, w), mask in zip(plan, initial, strict=True):
        attach(w.module, w, mask)
        handle.weights[w.name] = w
        w.refresh()
        for _, module, param in holders.get(id(w.dense), ()):
            if (module, param) != (w.module, w.param_name):
                attach_tied(module, param, w)
    # DDP would broadcast the masks every forward; they are equal on all ranks anyway
    # because they are a deterministic function of the (synchronised) weights.
    ignored = list(getattr(model, DDP_IGNORE, []))
    ignored += [qualified(module_name, w.mask_name) for module_name, w in plan]
    setattr(model, DDP_IGNORE, ignored)
    step_hooks.register(handle)
    return handle


def check_choices(choices: list[Choice]) -> None:
    """Refuse, before anything changes, the chosen weights that cannot be made sparse
    (``prune`` calls it too, before it writes pruned weights)."""
    for choice in choices:
        _check_method_takes(choice)
        if choice.requested and choice.reason == UNINITIALIZED:
            raise ValueError(f"{choice.name} is {UNINITIALIZED}, then sparsify")
        if choice.pattern is not None and choice.weight.is_inference():
            raise ValueError(f"{choice.name} is an inference tensor (created under "
                             "torch.inference_mode()), which cannot track versions; create "
                             "the model outside it (torch.no_grad() is fine)")


def _check_method_takes(choice: Choice) -> None:
    """The method's ``patterns`` fact: a pattern it cannot train is refused up front."""
    method, pattern = choice.method, choice.pattern
    accepted = getattr(method, "patterns", None)
    if pattern is None or accepted is None:
        return
    inner = pattern.inner if isinstance(pattern, OnTranspose) else pattern
    if not isinstance(inner, accepted):
        kinds = " or ".join(kind.syntax or kind.__name__ for kind in accepted)
        raise ValueError(f"{choice.name}: method {method.name!r} needs a pattern of kind "
                         f"{kinds}, got {pattern}")


def _initial_mask(w: SparseWeight, given: torch.Tensor | None) -> torch.Tensor:
    if given is None:
        mask = w.initial_mask()
        w.validate_mask(mask, f"{w.method!r}.initial_mask")
    else:
        mask = given
        check_mask(w, mask, "the given mask")
    # a copy: the live mask is updated in place, and two layers never share one
    return mask.to(w.dense.device).clone(memory_format=torch.contiguous_format)


def _check_model(model: object) -> None:
    """A clear error for what sparsify cannot work on: not a module, or weights without values
    (the meta device: nothing to choose a mask from)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify takes a torch.nn.Module (the model whose layers become "
                        f"sparse), got {type(model).__name__}")
    meta = [name for name, param in model.named_parameters() if param.is_meta]
    if meta:
        raise ValueError(f"the model's weights are on the meta device (no values, e.g. "
                         f"{meta[0]!r}): masks are chosen from the weights' values; "
                         "materialise it first (model.to_empty(device=...) and load the "
                         "weights), then sparsify")


def drive(model: nn.Module, method: ModelMethod,
          handle: SparsityHandle | None = None) -> SparsityHandle:
    """Run a model-level ``method`` (e.g. :class:`nmsparse.channels.Chex`) at ``model``'s
    optimizer steps, on ``handle`` (one of ``sparsify``'s) or a new handle without sparse
    weights: the same step hooks, step index and ``state_dict()`` as per-weight methods.
    ``finalize`` (or the handle's) stops it."""
    if handle is None:
        handle = SparsityHandle(model, [])
        step_hooks.register(handle)
    elif handle.model is not model:
        raise ValueError("the handle belongs to another model")
    return handle.add(method)


def handles_of(model: nn.Module) -> list[SparsityHandle]:
    """The live handles of ``model``'s sparse weights, in the order of its modules (for
    frameworks that build the model elsewhere, e.g. to checkpoint ``handle.state_dict()``)."""
    found = {id(w.handle): w.handle for module in model.modules()
             for w in sparse_states(module).values() if w.handle is not None}
    return list(found.values())


def finalize(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight and remove all nmsparse machinery, in place.

    The result has the original module classes and ``state_dict()`` keys, loads into the
    unmodified architecture and computes the same outputs. Returns ``model``.
    """
    weights = [w for module in model.modules() for w in sparse_states(module).values()]
    finalize_weights(model, weights)
    for handle in step_hooks.live_handles(model):  # those that ran model methods only
        handle.release()
    return model
