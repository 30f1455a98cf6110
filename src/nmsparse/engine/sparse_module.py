"""Sparse modules: how a module's weight becomes the masked weight its forward reads.

A sparse weight keeps its dense ``nn.Parameter`` under its usual name (so ``state_dict()``
keys, ``named_parameters()`` and optimizers see the dense weight) and gains a persistent bool
buffer ``<name>_mask``. The module's class is swapped for a generated subclass whose
``<name>`` attribute returns the forward weight of the weight's method, so any code that
reads ``module.weight`` (``nn.Linear.forward``, ``nn.MultiheadAttention``'s functional call,
...) computes with it. :func:`detach` bakes the mask in and restores the original class.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..patterns import NM, OnTranspose, Pattern, Transposable
from .sparse_weight import STATE_ATTRIBUTE, SparseWeight

_SPARSE_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
# Generated classes are named so pickle can find them again in a fresh process (whole-model
# torch.save, multiprocessing spawn): the base module, base qualname and parameter names,
# escaped into one ASCII identifier without dots (pickle protocol 2 needs both).
_CLASS_PREFIX = "SparseModule_s"
_ESCAPES = (("_", "_u"), (".", "_d"))


def _escape(part: str) -> str:
    for raw, escaped in _ESCAPES:
        part = part.replace(raw, escaped)
    return part


def _unescape(part: str) -> str:
    for raw, escaped in reversed(_ESCAPES):
        part = part.replace(escaped, raw)
    return part


# On a module that reads a weight tied to another module's sparse weight: {param name: it}.
TIED_ATTRIBUTE = "_nmsparse_tied"


def _masked_property(param_name: str) -> property:
    def masked(self):
        weight = self.__dict__.get(STATE_ATTRIBUTE, {}).get(param_name)
        if weight is None:
            weight = self.__dict__[TIED_ATTRIBUTE][param_name]
        return weight.forward_weight()

    return property(masked, doc=f"The {param_name} forward uses (W * mask, per the method).")


# -- masks given or loaded from outside: checked against the weight's pattern -----------------
def _keeps_in_every_group(pattern: Pattern) -> bool:
    """Whether ``pattern`` keeps N >= 1 of every group (N:M, transposable N:M), so that a mask
    keeping nothing cannot be one of its masks (a global budget may empty a layer)."""
    pattern = pattern.inner if isinstance(pattern, OnTranspose) else pattern
    return isinstance(pattern, (NM, Transposable)) and pattern.n >= 1


def check_mask(state: SparseWeight, mask: object, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` unless ``mask`` is a bool mask of the weight's
    shape that follows its pattern and, for a pattern keeping N of every M, keeps something
    (an all-False mask would zero the layer)."""
    state.validate_mask(mask, source)
    if _keeps_in_every_group(state.pattern) and not bool(mask.any()):
        raise ValueError(f"{state.name}: {source} keeps no weight at all, but pattern "
                         f"{state.pattern} keeps {state.pattern.density:.0%} of them")


def _load_checking_masks(self, state_dict, prefix, *args) -> None:
    """``load_state_dict`` of a sparse module: a loaded mask that breaks the weight's pattern
    (another model's masks, another pattern) is an error of the load naming the weight, and
    the valid mask in place is kept rather than overwritten."""
    error_msgs = args[-1]
    for state in sparse_states(self).values():
        if state.method.masks_beyond_pattern:
            continue  # its masks keep more than the pattern for a while on purpose
        key = prefix + state.mask_name
        mask = state_dict.get(key)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(state.dense.shape):
            continue  # missing or of another shape: torch's own error says so
        try:
            check_mask(state, mask, f"the loaded mask {key!r}")
        except ValueError as error:
            error_msgs.append(str(error))
            state_dict[key] = state.mask
    generated = next(c for c in type(self).__mro__ if "_nmsparse_base" in c.__dict__)
    super(generated, self)._load_from_state_dict(state_dict, prefix, *args)


def sparse_class(base: type, param_names: tuple[str, ...]) -> type:
    """A subclass of ``base`` whose ``param_names`` attributes return masked weights."""
    key = (base, param_names)
    if key not in _SPARSE_CLASSES:
        attributes = {name: _masked_property(name) for name in param_names}
        parts = [base.__module__, base.__qualname__, *param_names]
        attributes.update(_nmsparse_base=base, __module__=__name__,
                          _load_from_state_dict=_load_checking_masks,
                          __qualname__=_CLASS_PREFIX + "_s".join(map(_escape, parts)))
        _SPARSE_CLASSES[key] = type(f"Sparse{base.__name__}", (base,), attributes)
    return _SPARSE_CLASSES[key]


def __getattr__(name: str) -> type:
    """Rebuild a generated sparse class from its pickled name."""
    if not name.startswith(_CLASS_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, qualname, *param_names = map(_unescape,
                                              name[len(_CLASS_PREFIX):].split("_s"))
    base = importlib.import_module(module_name)
    for attribute in qualname.split("."):
        base = getattr(base, attribute)
    return sparse_class(base, tuple(param_names))


def original_class(module: nn.Module) -> type:
    """The module's class as the user wrote it (not the generated sparse subclass)."""
    return _without_sparse(type(module))


def _without_sparse(cls: type) -> type:
    if "_nmsparse_base" in cls.__dict__:
        return cls._nmsparse_base
    if not hasattr(cls, "_nmsparse_base"):
        return cls
    # Derived from a sparse class after sparsify (FSDP2's fully_shard makes FSDP<class>):
    # the same derivation of the original class, so that FSDP's own class survives.
    if cls not in _UNDERIVED:
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        _UNDERIVED[cls] = type(cls.__name__, tuple(map(_without_sparse, cls.__bases__)), body)
    return _UNDERIVED[cls]


_UNDERIVED: dict[type, type] = {}


def sparse_states(module: nn.Module) -> dict[str, SparseWeight]:
    """The module's sparse weights by parameter name (empty for a dense module)."""
    return module.__dict__.get(STATE_ATTRIBUTE, {})


def tied_states(module: nn.Module) -> dict[str, SparseWeight]:
    """Weights ``module`` reads that are another module's sparse weights (tied weights)."""
    return module.__dict__.get(TIED_ATTRIBUTE, {})


def _sync_class(module: nn.Module) -> None:
    """The generated class for the module's sparse and tied weights, or the original one."""
    for attribute in (STATE_ATTRIBUTE, TIED_ATTRIBUTE):
        if attribute in module.__dict__ and not module.__dict__[attribute]:
            del module.__dict__[attribute]
    names = tuple(sorted({*sparse_states(module), *tied_states(module)}))
    base = original_class(module)
    module.__class__ = sparse_class(base, names) if names else base


def attach(module: nn.Module, state: SparseWeight, mask: torch.Tensor) -> None:
    """Make ``state.param_name`` of ``module`` sparse with the given initial mask."""
    module.register_buffer(state.mask_name, mask, persistent=True)
    module.__dict__.setdefault(STATE_ATTRIBUTE, {})[state.param_name] = state
    _sync_class(module)
    setattr(state.weight, STATE_ATTRIBUTE, state)


def attach_tied(module: nn.Module, param_name: str, state: SparseWeight) -> None:
    """Make ``module`` read ``state``'s forward weight as its ``param_name`` (the same
    Parameter is tied to the sparse weight), so both see the masked weight."""
    module.__dict__.setdefault(TIED_ATTRIBUTE, {})[param_name] = state
    _sync_class(module)


def detach_tied(module: nn.Module, states: list[SparseWeight]) -> None:
    """Stop ``module`` reading the forward weights of ``states``."""
    tied = tied_states(module)
    for name in [name for name, state in tied.items() if any(state is s for s in states)]:
        del tied[name]
    _sync_class(module)


def detach(module: nn.Module, param_names: list[str] | None = None, *,
           bake: bool = True) -> None:
    """Bake the masks of ``param_names`` (default: all) into ``module``'s weights; once no
    sparse weight is left, restore the original class. ``bake=False`` leaves the dense
    weights as they are (the layer is re-made sparse right after, e.g. around a resize)."""
    states = sparse_states(module)
    for name in list(states) if param_names is None else param_names:
        state = states.pop(name)
        if bake:
            state.zero_pruned()
        state.remove_hooks()
        weight = module._parameters[name]
        del module._buffers[state.mask_name]
        if getattr(weight, STATE_ATTRIBUTE, None) is state:
            delattr(weight, STATE_ATTRIBUTE)
    _sync_class(module)
