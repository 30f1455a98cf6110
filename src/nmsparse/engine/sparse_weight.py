"""One sparse weight: its dense tensor, mask, pattern, method and state, and the cached
forward weight.

``handle["layer.weight"]`` hands out these objects: ``w.dense`` is the dense
``nn.Parameter`` the optimizer updates, ``w.mask`` the live bool mask buffer, ``w.masked``
the cached ``W * mask``, ``w.state`` the method's per-weight state (saved by the handle).

The cached masked weight is rebuilt after every optimizer step of the weight (one with a
gradient): the step hooks mark it stale, since fused optimizer kernels write parameters without
bumping their version counters and a step cannot be told from the tensors. Otherwise it is
rebuilt when the weight or mask tensor changed as their version counters say:
``load_state_dict``, ``.to()``, a manual in-place edit. Evaluation and inference therefore cost
no masking work at all. What stays keyed on version counters alone: writes outside
``optimizer.step()`` that do not bump them (through ``tensor.data``, or a fused kernel called
directly); call ``handle.refresh(force=True)`` after such a write.

Sharded weights (FSDP2's ``fully_shard``) keep their storage rules in
:mod:`nmsparse.engine.sharded_weight`, the other half of this class.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..patterns import NM, Pattern
from ._dtensor import (
    check_placements,
    gather,
    grad_key,
    is_dtensor,
    local,
    local_like,
    same_grad,
    version,
)
from .fused import add_decay_, refresh_
from .masks import MASK_SUFFIX, nonfinite_error
from .sharded_weight import STATE_ATTRIBUTE, ShardedStorage, _View

__all__ = ["STATE_ATTRIBUTE", "SparseWeight", "raise_if_nonfinite", "refresh_stale"]


class SparseWeight(ShardedStorage):
    """State of one sparse weight (see the module docstring)."""

    def __init__(self, module: nn.Module, param_name: str, name: str, pattern: Pattern,
                 method: Any, handle: Any = None) -> None:  # a Method (methods import this)
        self.module = module
        self.param_name = param_name
        self.mask_name = param_name + MASK_SUFFIX
        self.name = name  # qualified name of the weight, e.g. "layer1.0.conv1.weight"
        self.pattern = pattern
        self.method = method
        self.handle = handle  # the SparsityHandle that drives this weight's steps
        self.state: dict[str, Any] = {}
        self.masked: torch.Tensor | None = None
        self._built_from: tuple | None = None
        self._seen_grad: tuple | None = None  # the gradient the last step hooks saw
        self._sharded: nn.Parameter | None = None  # FSDP's sharded dense Parameter, once seen
        self._forward_guard: Any = None  # hook handle, see _refuse_sharded_forward
        if is_dtensor(self.dense):
            check_placements(self.dense, pattern, name)

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
        self.validate_mask(mask, "the mask")
        shard = self._shard()
        with torch.no_grad():
            if shard is None:
                self.mask.copy_(mask)
            else:
                local(self.mask).copy_(local_like(mask, shard))

    def validate_mask(self, mask: object, source: str) -> None:
        """Raise ``ValueError`` unless ``mask`` is a bool tensor of the weight's shape that
        follows the pattern (``source`` names it in the message)."""
        shape = tuple(self.dense.shape)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or tuple(mask.shape) != shape:
            raise ValueError(f"{self.name}: {source} must be a torch.bool tensor of shape "
                             f"{shape}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        found = self.pattern.violations(gather(mask))  # every rank judges the whole mask
        if not found.ok:
            raise ValueError(f"{self.name}: {source} breaks pattern {self.pattern} in "
                             f"{found.violating} of {found.groups} groups")

    def claim(self) -> None:
        """Tag the current dense Parameter so that the step hooks find it in an optimizer
        (adopting it if FSDP sharded it since)."""
        if self._shard() is None:
            setattr(self.dense, STATE_ATTRIBUTE, self)

    def initial_mask(self) -> torch.Tensor:
        """The method's mask at ``sparsify`` time. For a sharded weight the method ranks this
        rank's shard (whole groups) and the full mask is gathered from all ranks."""
        dense = self.dense
        if not is_dtensor(dense):
            return self.method.initial_mask(self)
        shard = local(dense)
        mask = self.method.initial_mask(_View(self, shard, None, None))
        if not isinstance(mask, torch.Tensor) or mask.shape != shard.shape:
            return mask  # wrong: the caller's check says what was expected
        from torch.distributed.tensor import DTensor

        return gather(DTensor.from_local(mask, dense.device_mesh, dense.placements,
                                         run_check=False, shape=dense.shape,
                                         stride=dense.stride()))

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, mask, masked)`` to compute on: the layer's own (``masked`` being the
        forward cache), or for a sharded weight the local shards and a scratch ``masked``."""
        shard = self._shard()
        if shard is None:
            self._prepare_cache()
            return self.dense, self.mask, self.masked
        if self.dense is not shard:
            raise RuntimeError(f"{self.name}: the mask of a sharded weight cannot be rebuilt "
                               "inside FSDP's forward; call it between steps")
        weight = local(shard)
        return weight, local(self.mask), torch.empty_like(weight)

    # -- keeping the forward weight current ----------------------------------------------------
    def _fingerprint(self) -> tuple:
        weight, mask = self.dense, self.mask
        return (weight._version, weight.data_ptr(), weight.dtype, weight.device,
                mask._version, mask.data_ptr(), mask.device)

    def is_fresh(self) -> bool:
        shard = self._shard()
        if shard is not None:
            return self._built_from == self._shard_fingerprint(shard)
        return self._plain_is_fresh()

    def _plain_is_fresh(self) -> bool:
        """``is_fresh`` for an unsharded weight (the forward path has already asked)."""
        if (self._built_from is None or self.masked is None
                or self._built_from[:-1] != self._fingerprint()):
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
        shard = self._shard()
        if shard is not None:
            with self._shard_installed(shard):
                finite = self.method.refresh(self)
            self._built_from = self._shard_fingerprint(shard)
            return finite
        self._prepare_cache()
        finite = self.method.refresh(self)
        self._built_from = (*self._fingerprint(), self.masked._version)
        return finite

    def mark_stale(self) -> None:
        """Rebuild on next use whatever the version counters say (an optimizer step ran)."""
        self._built_from = None

    def ensure_fresh(self) -> None:
        if not self.is_fresh():
            self._rebuild_stale()

    def _rebuild_stale(self) -> None:
        self._warn_if_step_skipped()
        raise_if_nonfinite([self], [self.refresh()])

    def forward_weight(self) -> torch.Tensor:
        """What forward passes use (per the method), rebuilt first if stale."""
        shard = self._shard()
        if shard is not None:
            return self._sharded_forward_weight(shard)
        if not torch.compiler.is_compiling() and not self._plain_is_fresh():
            self._rebuild_stale()
        return self.method.masked_weight(self)

    def zero_pruned(self) -> None:
        """Set the pruned dense weights to 0 for good (what ``finalize`` does), after writing
        the method's :meth:`~nmsparse.methods.Method.deployed_weight` if it has one."""
        self.ensure_fresh()
        shard = self._shard()
        weight = self.dense if shard is None else local(shard)
        deployed = self.method.deployed_weight(self if shard is None else _View(
            self, weight, local(self.mask), None))
        with torch.no_grad():
            if deployed is not None:
                weight.copy_(deployed)
            weight.masked_fill_(local(self.mask).logical_not(), 0)

    # -- building blocks for methods -------------------------------------------------------------
    def recompute_mask(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Set the mask to the pattern applied to ``scores`` (``None``: ``|w|``, on the fused
        fast path where it applies) and rebuild ``masked``; returns "all finite"."""
        weight, mask, masked = self._tensors()
        if scores is None and isinstance(self.pattern, NM):
            return refresh_(weight, mask, masked, self.pattern, recompute=True)
        with torch.no_grad():
            finite = torch.isfinite(weight).all()
            if scores is None:
                scores = weight.detach().abs()
            elif self._sharded is not None:
                scores = local_like(scores, self._sharded)  # row-local: shards hold whole groups
            mask.copy_(self.pattern.mask(scores))
            torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device),
                        out=masked)
        return finite

    def enforce_mask(self) -> torch.Tensor:
        """Keep the mask, set the pruned dense weights to 0 and rebuild ``masked``."""
        weight, mask, masked = self._tensors()
        return refresh_(weight, mask, masked, self.pattern, recompute=False)

    def add_pruned_to_grad(self, decay: float) -> None:
        """Add ``decay * (1 - mask) * W`` to the dense weight's gradient (the step hooks run
        once per step: a wrapping optimizer's inner step does not run them again)."""
        shard = self._shard()
        weight = self.dense if shard is None else shard
        grad = weight.grad
        if grad is None or decay == 0:
            return
        if shard is None:
            add_decay_(grad, weight, self.mask, decay)
        else:  # FSDP has reduce-scattered the gradient: this rank's rows, all local
            add_decay_(local_like(grad, shard), local(shard), local(self.mask), decay)

    # -- the bypass check ----------------------------------------------------------------------
    def owned(self) -> nn.Parameter:
        """The dense Parameter the optimizer updates (FSDP's shard, if sharded)."""
        return self.dense if self._sharded is None else self._sharded

    def saw_gradient(self) -> None:
        """The step hooks ran on the current gradient (called by the handle)."""
        grad = self.owned().grad
        self._seen_grad = None if grad is None else grad_key(grad)

    def _warn_if_step_skipped(self) -> None:
        """A gradient the step hooks never saw, and a weight that changed since: an update
        loop bypassed ``torch.optim``, so the method's step hooks (the SR-STE term, mask
        updates) were skipped. Say so once per handle rather than train silently as STE."""
        weight, handle = self.owned(), self.handle
        grad = weight.grad
        if (grad is None or self._built_from is None or handle is None
                or self._built_from[0] == version(weight)
                or same_grad(self._seen_grad, grad)
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
        state.update(_built_from=None, _seen_grad=None)
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
