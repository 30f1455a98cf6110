"""The per-layer machinery behind :func:`nmsparse.sparsify`.

A sparse weight keeps its dense ``nn.Parameter`` under its usual name (so ``state_dict()``
keys, ``named_parameters()`` and optimizers see the dense weight) and gains a persistent bool
buffer ``<name>_mask``. The module's class is swapped for a generated subclass whose
``<name>`` attribute returns the masked weight, so any code that reads ``module.weight``
(``nn.Linear.forward``, ``nn.MultiheadAttention``'s functional call, ...) computes with
``W * mask``; the gradient reaches the dense weight straight through.

The masked weight is cached and rebuilt only when the weight or mask tensor changed (their
version counters say so): after an optimizer step, ``load_state_dict``, ``.to()`` or a manual
edit. Evaluation and inference therefore cost no masking work at all.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ._fused import add_decay_, refresh_
from .masks import nonfinite_error
from .methods import Method
from .patterns import NM

# On a sparse module: {param name: SparseWeight}; on a sparse weight: its SparseWeight.
STATE_ATTRIBUTE = "_nmsparse"


class _MaskedWeight(torch.autograd.Function):
    """Forward: the cached ``W * mask``. Backward: the gradient goes to the dense ``W``,
    to every entry (straight-through) or to the kept entries only (fixed masks)."""

    @staticmethod
    def forward(ctx, weight, masked, mask, straight_through: bool):
        ctx.straight_through = straight_through
        if not straight_through:
            ctx.save_for_backward(mask)
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad):
        if ctx.straight_through:
            return grad, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None


class SparseWeight:
    """State of one sparse weight: its pattern, method and the cached masked weight."""

    def __init__(self, module: nn.Module, param_name: str, name: str, pattern: NM,
                 layout: str, method: Method) -> None:
        self.module = module
        self.param_name = param_name
        self.mask_name = f"{param_name}_mask"
        self.name = name  # qualified name of the weight, e.g. "layer1.0.conv1.weight"
        self.pattern = pattern
        self.layout = layout
        self.method = method
        self.masked: torch.Tensor | None = None
        self._built_from: tuple | None = None
        self._decayed_grad: tuple | None = None

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.param_name]

    @property
    def mask(self) -> torch.Tensor:
        return self.module._buffers[self.mask_name]

    def _fingerprint(self) -> tuple:
        weight, mask = self.weight, self.mask
        return (weight._version, weight.data_ptr(), weight.dtype, weight.device,
                mask._version, mask.data_ptr(), mask.device)

    def is_fresh(self) -> bool:
        if self._built_from is None or self.masked is None:
            return False
        if self._built_from[:-1] != self._fingerprint():
            return False
        if self.masked._version != self._built_from[-1]:
            raise RuntimeError(
                f"the masked weight of sparse layer {self.name!r} was modified in place; "
                f"'module.{self.param_name}' is the masked view: change the dense weight "
                f"instead (module._parameters[{self.param_name!r}]) or call nmsparse.finalize")
        return True

    def refresh(self) -> torch.Tensor:
        """Rebuild mask (per the method) and cache; returns a 0-d "all finite" tensor."""
        weight = self.weight
        setattr(weight, STATE_ATTRIBUTE, self)  # a replaced Parameter must be found by hooks
        if (self.masked is None or self.masked.shape != weight.shape
                or self.masked.dtype != weight.dtype or self.masked.device != weight.device):
            self.masked = torch.empty_like(weight, memory_format=torch.contiguous_format,
                                           requires_grad=False)
        finite = refresh_(weight, self.mask, self.masked, self.pattern, self.layout,
                          recompute=self.method.recomputes_mask)
        self._built_from = (*self._fingerprint(), self.masked._version)
        return finite

    def ensure_fresh(self) -> None:
        if not self.is_fresh():
            raise_if_nonfinite([self], [self.refresh()])

    def masked_weight(self) -> torch.Tensor:
        """What forward passes use: ``W * mask`` with the method's gradient rule."""
        if not torch.compiler.is_compiling():
            self.ensure_fresh()
        return _MaskedWeight.apply(self.weight, self.masked, self.mask,
                                   self.method.gradient_to_pruned)

    def add_decay_to_grad(self) -> None:
        """Add ``decay * (1 - mask) * W`` to the dense weight's gradient, once per gradient."""
        grad = self.weight.grad
        decay = self.method.decay
        if grad is None or decay == 0:
            return
        # A nested optimizer (e.g. ZeroRedundancyOptimizer) steps twice on the same gradient.
        if self._decayed_grad == (id(grad), grad._version):
            return
        add_decay_(grad, self.weight, self.mask, decay)
        self._decayed_grad = (id(grad), grad._version)


def raise_if_nonfinite(states: list[SparseWeight], finite_flags: list[torch.Tensor]) -> None:
    """Check many layers' finiteness flags with a single host sync."""
    if not states or bool(torch.stack([f.to(finite_flags[0].device)
                                       for f in finite_flags]).all()):
        return
    for state, finite in zip(states, finite_flags, strict=True):
        if not bool(finite):
            raise nonfinite_error(state.name)


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


def _masked_property(param_name: str) -> property:
    def masked(self):
        return self.__dict__[STATE_ATTRIBUTE][param_name].masked_weight()

    return property(masked, doc=f"The masked {param_name} (W * mask) used by forward.")


def sparse_class(base: type, param_names: tuple[str, ...]) -> type:
    """A subclass of ``base`` whose ``param_names`` attributes return masked weights."""
    key = (base, param_names)
    if key not in _SPARSE_CLASSES:
        attributes = {name: _masked_property(name) for name in param_names}
        parts = [base.__module__, base.__qualname__, *param_names]
        attributes.update(_nmsparse_base=base, __module__=__name__,
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
    return getattr(type(module), "_nmsparse_base", type(module))


def sparse_states(module: nn.Module) -> dict[str, SparseWeight]:
    """The module's sparse weights by parameter name (empty for a dense module)."""
    return module.__dict__.get(STATE_ATTRIBUTE, {})


def attach(module: nn.Module, state: SparseWeight, mask: torch.Tensor) -> None:
    """Make ``state.param_name`` of ``module`` sparse with the given initial mask."""
    module.register_buffer(state.mask_name, mask, persistent=True)
    states = module.__dict__.setdefault(STATE_ATTRIBUTE, {})
    states[state.param_name] = state
    module.__class__ = sparse_class(original_class(module), tuple(sorted(states)))
    setattr(state.weight, STATE_ATTRIBUTE, state)


def detach(module: nn.Module) -> None:
    """Bake every mask of ``module`` into its weights and restore the original class."""
    states = sparse_states(module)
    for name, state in states.items():
        state.ensure_fresh()
        weight = module._parameters[name]
        with torch.no_grad():
            weight.masked_fill_(state.mask.logical_not(), 0)
        del module._buffers[state.mask_name]
        if getattr(weight, STATE_ATTRIBUTE, None) is state:
            delattr(weight, STATE_ATTRIBUTE)
    if states:
        del module.__dict__[STATE_ATTRIBUTE]
        module.__class__ = original_class(module)
