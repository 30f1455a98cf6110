"""One sparse weight: its dense tensor, mask, pattern, method and state, and the cached
forward weight.

``handle["layer.weight"]`` hands out these objects: ``w.dense`` is the dense
``nn.Parameter`` the optimizer updates, ``w.mask`` the live bool mask buffer, ``w.masked``
the cached ``W * mask``, ``w.state`` the method's per-weight state (saved by the handle).

The cached masked weight is rebuilt only when the weight or mask tensor changed (their
version counters say so): after an optimizer step, ``load_state_dict``, ``.to()`` or a manual
edit. Evaluation and inference therefore cost no masking work at all.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .fused import add_decay_, refresh_
from .masks import nonfinite_error
from .patterns import NM, Pattern

if TYPE_CHECKING:
    from .methods import Method

# On a sparse module: {param name: SparseWeight}; on a sparse weight: its SparseWeight.
STATE_ATTRIBUTE = "_nmsparse"


class SparseWeight:
    """State of one sparse weight (see the module docstring)."""

    def __init__(self, module: nn.Module, param_name: str, name: str, pattern: Pattern,
                 method: Method, handle: Any = None) -> None:
        self.module = module
        self.param_name = param_name
        self.mask_name = f"{param_name}_mask"
        self.name = name  # qualified name of the weight, e.g. "layer1.0.conv1.weight"
        self.pattern = pattern
        self.method = method
        self.handle = handle  # the SparsityHandle that drives this weight's steps
        self.state: dict[str, Any] = {}
        self.masked: torch.Tensor | None = None
        self._built_from: tuple | None = None
        self._decayed_grad: tuple | None = None
        self._seen_grad: tuple | None = None  # the gradient the last step hooks saw

    def __repr__(self) -> str:
        return (f"SparseWeight({self.name!r}, pattern={str(self.pattern)!r}, "
                f"method={self.method!r}, shape={tuple(self.dense.shape)})")

    # -- public view ---------------------------------------------------------------------------
    @property
    def dense(self) -> nn.Parameter:
        """The dense weight (what the optimizer updates and ``state_dict()`` saves)."""
        return self.module._parameters[self.param_name]

    weight = dense  # the name the internals use

    @property
    def mask(self) -> torch.Tensor:
        """The live bool mask buffer (``True`` = kept)."""
        return self.module._buffers[self.mask_name]

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask in place; it must be a bool tensor of the weight's shape that
        complies with the pattern. The forward weight is rebuilt on next use."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{self.name}: a mask must be a torch.bool tensor, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != self.dense.shape:
            raise ValueError(f"{self.name}: mask shape {tuple(mask.shape)} differs from the "
                             f"weight shape {tuple(self.dense.shape)}")
        found = self.pattern.violations(mask)
        if not found.ok:
            raise ValueError(f"{self.name}: the mask breaks pattern {self.pattern} in "
                             f"{found.violating} of {found.groups} groups")
        with torch.no_grad():
            self.mask.copy_(mask)

    # -- keeping the forward weight current ----------------------------------------------------
    def _fingerprint(self) -> tuple:
        weight, mask = self.dense, self.mask
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
                f"instead (handle[{self.name!r}].dense) or call nmsparse.finalize")
        return True

    def _prepare_cache(self) -> None:
        weight = self.dense
        if weight.shape != self.mask.shape:
            raise ValueError(
                f"the dense weight of sparse layer {self.name!r} changed shape from "
                f"{tuple(self.mask.shape)} to {tuple(weight.shape)} (resize_token_embeddings?); "
                "finalize the model (nmsparse.finalize) before changing shapes, then sparsify "
                "again")
        setattr(weight, STATE_ATTRIBUTE, self)  # a replaced Parameter must be found by hooks
        if (self.masked is None or self.masked.shape != weight.shape
                or self.masked.dtype != weight.dtype or self.masked.device != weight.device):
            self.masked = torch.empty_like(weight, memory_format=torch.contiguous_format,
                                           requires_grad=False)

    def refresh(self) -> torch.Tensor:
        """Rebuild mask and forward weight per the method; returns a 0-d "all finite" tensor."""
        self._prepare_cache()
        finite = self.method.refresh(self)
        self._built_from = (*self._fingerprint(), self.masked._version)
        return finite

    def ensure_fresh(self) -> None:
        if not self.is_fresh():
            self._warn_if_step_skipped()
            raise_if_nonfinite([self], [self.refresh()])

    def forward_weight(self) -> torch.Tensor:
        """What forward passes use (per the method), rebuilt first if stale."""
        if not torch.compiler.is_compiling():
            self.ensure_fresh()
        return self.method.masked_weight(self)

    # -- building blocks for methods -------------------------------------------------------------
    def recompute_mask(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Set the mask to the pattern applied to ``scores`` (``None``: ``|w|``, on the fused
        fast path where it applies) and rebuild ``masked``; returns "all finite"."""
        self._prepare_cache()
        weight = self.dense
        if scores is None and isinstance(self.pattern, NM):
            return refresh_(weight, self.mask, self.masked, self.pattern, recompute=True)
        with torch.no_grad():
            finite = torch.isfinite(weight).all()
            if scores is None:
                scores = weight.detach().abs()
            self.mask.copy_(self.pattern.mask(scores))
            torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype,
                                                       device=weight.device), out=self.masked)
        return finite

    def enforce_mask(self) -> torch.Tensor:
        """Keep the mask, set the pruned dense weights to 0 and rebuild ``masked``."""
        self._prepare_cache()
        return refresh_(self.dense, self.mask, self.masked, self.pattern, recompute=False)

    def add_pruned_to_grad(self, decay: float) -> None:
        """Add ``decay * (1 - mask) * W`` to the dense weight's gradient, once per gradient."""
        grad = self.dense.grad
        if grad is None or decay == 0:
            return
        # A nested optimizer (e.g. ZeroRedundancyOptimizer) steps twice on the same gradient.
        if self._decayed_grad == (id(grad), grad._version):
            return
        add_decay_(grad, self.dense, self.mask, decay)
        self._decayed_grad = (id(grad), grad._version)

    # -- the bypass check ----------------------------------------------------------------------
    def saw_gradient(self) -> None:
        """The step hooks ran on the current gradient (called by the handle)."""
        grad = self.dense.grad
        self._seen_grad = None if grad is None else (id(grad), grad._version)

    def _warn_if_step_skipped(self) -> None:
        """A gradient the step hooks never saw, and a weight that changed since: an update
        loop bypassed ``torch.optim``, so the method's step hooks (the SR-STE term, mask
        updates) were skipped. Say so once per handle rather than train silently as STE."""
        grad, handle = self.dense.grad, self.handle
        if (grad is None or self._built_from is None or handle is None
                or self._built_from[0] == self.dense._version
                or self._seen_grad == (id(grad), grad._version)
                or not self.method.steps_matter() or handle.warned_bypass):
            return
        handle.warned_bypass = True
        warnings.warn(
            f"nmsparse: the dense weight of {self.name!r} was updated outside a torch.optim "
            f"step, so {self.method!r}'s step hooks did not run; call handle.before_step() "
            "before and handle.after_step() after a hand-written update, or use a "
            "torch.optim optimizer", RuntimeWarning, stacklevel=4)

    # -- pickling: the per-step caches are rebuilt on first use --------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_built_from=None, _decayed_grad=None, _seen_grad=None)
        return state


def raise_if_nonfinite(states: list[SparseWeight], finite_flags: list[torch.Tensor]) -> None:
    """Check many layers' finiteness flags with a single host sync."""
    if not states or bool(torch.stack([f.to(finite_flags[0].device)
                                       for f in finite_flags]).all()):
        return
    for state, finite in zip(states, finite_flags, strict=True):
        if not bool(finite):
            raise nonfinite_error(state.name)


def refresh_stale(weights: list[SparseWeight]) -> None:
    """Rebuild the weights whose dense tensor or mask changed, with one finiteness sync."""
    stale = [w for w in weights if not w.is_fresh()]
    raise_if_nonfinite(stale, [w.refresh() for w in stale])
