"""Optimizer step hooks: where a handle's per-step machinery runs inside ``optimizer.step()``.

Two ways in, with one behaviour:

* by default (no extra call), a pair of global ``torch.optim`` step hooks, installed while at
  least one sparsity handle is live and removed when the last one is finalized, finds the
  sparse weights an optimizer holds and hands them to their handles;
* ``handle.attach(optimizer)`` installs hooks on that optimizer instance only; the global
  hooks then leave that optimizer's weights of that handle alone.

Before the update, the handle runs its methods' ``before_step`` on the final gradient: DDP
has averaged it, accumulation has summed every micro-batch, a layer called twice has both
contributions and ``GradScaler.step`` has unscaled it. With ``optimizer.step(closure)``
(LBFGS, Lightning's automatic optimization) the gradient is computed inside ``step``, so the
closure is wrapped and ``before_step`` runs after each evaluation of it. After the update the
handle rebuilds the forward weights of every sparse weight the optimizer holds (fused kernels
write parameters without bumping their version counters, so only the step itself says they
changed) and runs ``after_step``.

``GradScaler`` steps an optimizer that unscales inside its own kernel (fused SGD / Adam /
AdamW) with the gradients still scaled, setting ``grad_scale`` and ``found_inf`` on it for the
step: the methods then see the gradients divided by that scale (multiplied back afterwards;
exact for GradScaler's power-of-two scales), and a step whose gradients overflowed, which the
kernel skips, skips the methods too.

While a handle is live a global module-registration hook is installed too: it warns when a
module holding a sparse weight is replaced (:mod:`nmsparse.engine.swap_guard`), and settles a merge
written into a sparse module's forward weight when the module is put back in place of its
wrapper (PEFT unloading a merged adapter, :mod:`nmsparse.engine.written`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.module import register_module_module_registration_hook
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .sparse_weight import STATE_ATTRIBUTE, SparseWeight
from .swap_guard import warn_if_sparse_module_replaced
from .written import notice_unload

# Handles (nmsparse.engine.handle.SparsityHandle, typed Any here: the handle registers with this
# module, which must not import it back).
_live: weakref.WeakSet = weakref.WeakSet()  # handles not yet finalized
_global: tuple | None = None


def sparse_weights_of(optimizer: torch.optim.Optimizer,
                      only: Any = None) -> dict[Any, list[SparseWeight]]:
    """The sparse weights ``optimizer`` holds, by handle (or those of ``only``)."""
    found: dict[Any, list[SparseWeight]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            weight = getattr(param, STATE_ATTRIBUTE, None)
            if weight is None or weight.dense is not param or weight.handle is None:
                continue
            if only is not None and weight.handle is not only:
                continue
            found.setdefault(weight.handle, []).append(weight)
    _add_model_method_handles(optimizer, only, found)
    return found


def _add_model_method_handles(optimizer: torch.optim.Optimizer, only: Any,
                              found: dict[Any, list[SparseWeight]]) -> None:
    """A handle that runs model methods steps with any optimizer of its model's parameters,
    sparse weights or not (CHEX on a dense model)."""
    candidates = [h for h in ([only] if only is not None else list(_live))
                  if h.model_methods and h not in found]
    if not candidates:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for handle in candidates:
        if any(id(p) in held for p in handle.model.parameters()):
            found[handle] = []


def _closure_of(args: tuple, kwargs: dict) -> tuple[Callable | None, bool]:
    """The closure passed to ``step`` and whether it came by keyword (args[0] is self)."""
    if kwargs.get("closure") is not None:
        return kwargs["closure"], True
    return (args[1], False) if len(args) > 1 and callable(args[1]) else (None, False)


def _claim(optimizer: torch.optim.Optimizer, found: dict) -> dict:
    """The handles this step drives. An optimizer that wraps another (accelerate's
    AcceleratedOptimizer, ZeroRedundancyOptimizer) steps the inner one inside its own step:
    only the outermost step runs the methods, once. A handle still marked by the same
    optimizer had its last step raise: it is claimed afresh."""
    claimed = {}
    for handle, weights in found.items():
        if handle.stepping is None or handle.stepping is optimizer:
            handle.stepping = optimizer
            claimed[handle] = weights
    return claimed


def _overflowed(optimizer: torch.optim.Optimizer) -> bool:
    """GradScaler found inf/NaN gradients for an optimizer that skips the update itself."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.any())


@contextlib.contextmanager
def _unscaled(optimizer: torch.optim.Optimizer, found: dict):
    """The gradients of ``found`` divided by GradScaler's scale while the methods run, if
    they reach the optimizer still scaled."""
    scale = getattr(optimizer, "grad_scale", None)
    grads = [] if not isinstance(scale, torch.Tensor) else [
        grad for weights in found.values() for w in weights
        if (grad := w.owned().grad) is not None]
    for grad in grads:
        grad.div_(scale.to(grad.device))
    try:
        yield
    finally:
        for grad in grads:
            grad.mul_(scale.to(grad.device))


def _run_before_step(optimizer: torch.optim.Optimizer, found: dict) -> None:
    with _unscaled(optimizer, found):
        for handle, weights in found.items():
            handle.run_before_step(weights, optimizer)


def begin_step(optimizer: torch.optim.Optimizer, found: dict, args: tuple, kwargs: dict):
    """Run ``before_step`` now, or after the closure if ``step`` was given one."""
    if _overflowed(optimizer):
        return None  # unclaimed, so end_step skips the methods too
    found = _claim(optimizer, found)
    if not found:
        return None
    closure, by_keyword = _closure_of(args, kwargs)
    if closure is None:
        _run_before_step(optimizer, found)
        return None

    def closure_then_before_step():
        loss = closure()
        _run_before_step(optimizer, found)
        return loss

    if by_keyword:
        return args, {**kwargs, "closure": closure_then_before_step}
    return (args[0], closure_then_before_step, *args[2:]), kwargs


def end_step(optimizer: torch.optim.Optimizer, found: dict) -> None:
    for handle, weights in found.items():
        if handle.stepping is optimizer:
            handle.stepping = None
            handle.run_after_step(weights, optimizer)


def _unattached(optimizer: torch.optim.Optimizer) -> dict:
    found = sparse_weights_of(optimizer)
    return {handle: weights for handle, weights in found.items()
            if not handle.is_attached_to(optimizer)}


def eager_only(hook: Callable) -> Callable:
    """``hook`` run eagerly even inside a compiled train step: it is bookkeeping plus the
    fused kernels, and tracing it would split the step into many small graphs. Applied when
    the first handle registers, not at import: ``torch.compiler.disable`` imports dynamo
    (about 1.5 s), which ``import nmsparse`` must not pay."""
    return torch.compiler.disable(hook)


def _global_before(optimizer, args, kwargs):
    if not _live:
        uninstall_if_unused()
        return None
    return begin_step(optimizer, _unattached(optimizer), args, kwargs)


def _global_after(optimizer, args, kwargs) -> None:
    if _live:
        end_step(optimizer, _unattached(optimizer))


def _module_registered(parent: torch.nn.Module, name: str, new: torch.nn.Module | None) -> None:
    warn_if_sparse_module_replaced(parent, name, new)
    notice_unload(parent, name, new)


def register(handle: Any) -> None:
    """A live handle: make sure the global hooks are installed."""
    global _global
    if handle not in _live:
        # a handle dropped without finalize (collected with its model) must not leave the
        # global hooks behind: the last one to go removes them
        weakref.finalize(handle, uninstall_if_unused).atexit = False
    _live.add(handle)
    if _global is None:
        _global = (register_optimizer_step_pre_hook(eager_only(_global_before)),
                   register_optimizer_step_post_hook(eager_only(_global_after)),
                   register_module_module_registration_hook(_module_registered))


def live_handles(model: Any) -> list[Any]:
    """The handles of ``model`` not yet finalized."""
    return [handle for handle in list(_live) if handle.model is model]


def unregister(handle: Any) -> None:
    _live.discard(handle)
    uninstall_if_unused()


def uninstall_if_unused() -> None:
    global _global
    # iterate, not len(): inside a collection the set may still count a dead handle
    if _global is not None and next(iter(_live), None) is None:
        for hook in _global:
            hook.remove()
        _global = None


def installed() -> bool:
    """Whether the global step and module-registration hooks are installed (for tests)."""
    return _global is not None
