"""Which ``nn.Linear`` layers of a model may be replaced by a faster module: the rules shared
by :func:`~nmsparse.kernels.swap_linear_layers` and :func:`~nmsparse.kernels.accelerate`."""

from __future__ import annotations

import warnings

from torch import nn

from ..engine.selection import is_hf_conv1d, select


def shared_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters that more than one module holds (tied weights)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def structural_reason(module: nn.Linear, parent: nn.Module | None,
                      shared: set[int]) -> str | None:
    """Why ``module`` cannot be swapped whatever its values are, or None."""
    if isinstance(parent, nn.MultiheadAttention):
        return "owned by nn.MultiheadAttention, which reads the weight directly"
    if type(module) is not nn.Linear and not is_hf_conv1d(module):
        return f"{type(module).__name__} is a subclass of nn.Linear (its forward may differ)"
    if hasattr(module, "weight_orig") or hasattr(module, "parametrizations"):
        return "weight is parametrized or pruned by torch.nn.utils (remove that first)"
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "weight is uninitialized (a lazy module)"
    if id(weight) in shared:
        return "weight is shared with another module (tied weights)"
    if weight.device.type == "meta":
        return "weight is on the meta device"
    return None


def not_asked(model: nn.Module, pattern, include, exclude, filter_fn, verb: str
              ) -> dict[str, str]:
    """``{module name: why it was not asked for}`` of the eligible weights that the
    include/exclude globs leave out, by the one selection every verb uses
    (:func:`nmsparse.engine.selection.select`; a glob matching nothing raises there). What a kernel
    can do with the rest (dtype, shape, structure, values) is the kernel's own judgement.

    ``filter_fn(name, module)`` is the deprecated predicate of the kernel verbs: globs are
    the one vocabulary (they travel in CLI flags and config files, and a typo is an error).
    """
    left_out = {}
    if include is not None or exclude is not None:
        left_out = {choice.module_name: choice.reason
                    for choice in select(model, pattern, include, exclude, tied="each")
                    if not choice.requested}
    if filter_fn is not None:
        warnings.warn(f"{verb}(filter_fn=...) is deprecated: select layers with include= / "
                      "exclude= globs (as every nmsparse verb does)", DeprecationWarning,
                      stacklevel=3)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not filter_fn(name, module):
                left_out.setdefault(name, "excluded by filter_fn")
    return left_out
