"""The method protocol: how a sparse weight's mask evolves and what gradient its dense weight
gets, over the life of a training run.

A :class:`Method` is a frozen dataclass of hyperparameters with a lifecycle of hooks, each
given a :class:`~nmsparse.engine.sparse_weight.SparseWeight` ``w`` (``w.dense``, ``w.mask``,
``w.pattern``, ``w.state``) or the list of them the method drives:

* :meth:`~Method.score` - what the pattern ranks (default ``|w|``);
* :meth:`~Method.initial_mask` - the mask at ``sparsify`` time (default: the pattern applied
  to the scores);
* :meth:`~Method.refresh` - bring the mask and the forward weight up to date after the dense
  weight changed (an optimizer step, ``load_state_dict``, a manual edit). Default: the mask
  follows the scores (STE, SR-STE). Fixed masks keep the mask and zero the pruned weights;
* :meth:`~Method.masked_weight` - what forward uses, and through it which gradient the dense
  weight gets (default: straight through to every entry);
* :meth:`~Method.deployed_weight` - what ``finalize`` bakes in (default: ``W * mask``);
* :meth:`~Method.before_step` - inside ``optimizer.step()``, once the gradients are final
  (DDP-averaged, accumulated, unscaled, after a closure ran), before the update;
* :meth:`~Method.after_step` - after the update, once the masks have been refreshed.

Step hooks receive a :class:`Step`: the step index, the optimizer, and the method's own state
dict, which the handle saves and restores (``handle.state_dict()``), like ``w.state`` per
weight. Keep in both only tensors, numbers, strings, lists and dicts, so checkpoints load with
``torch.load(weights_only=True)``.

A subclass that sets ``name`` in its body is registered under it (a clash with another class
raises); a subclass without one is an abstract intermediate and is not registered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..patterns import Pattern
from ..registry import Registry

if TYPE_CHECKING:
    from ..engine.sparse_weight import SparseWeight


METHODS: Registry[type[Method]] = Registry("method")


@dataclass
class Step:
    """One optimizer step, as the step hooks see it."""

    index: int  # optimizer steps completed on this handle's weights before this one
    optimizer: torch.optim.Optimizer | None  # None: a hand-written update loop
    state: dict[str, Any] = field(default_factory=dict)  # the method's saved state


class _StraightThrough(torch.autograd.Function):
    """Forward: the cached ``W * mask``. Backward: the whole gradient to the dense ``W``."""

    @staticmethod
    def forward(ctx, weight, masked):
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _KeptOnly(torch.autograd.Function):
    """Forward: the cached ``W * mask``. Backward: the gradient of the kept entries only."""

    @staticmethod
    def forward(ctx, weight, masked, mask):
        ctx.save_for_backward(mask)
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


# Under torch.compile the forward weight is computed in the graph from the dense weight and
# the mask buffer (never from the eager cache, which a compiled forward cannot check for
# staleness): the same values bit for bit, with the same gradient rule.


def value_straight_through(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` (computed from ``weight`` without autograd); backward: the whole
    gradient to ``weight`` (the rule of every straight-through estimator)."""
    return _StraightThrough.apply(weight, value)


def straight_through(w: SparseWeight) -> torch.Tensor:
    """``W * mask`` whose gradient reaches every entry of the dense weight (STE)."""
    if torch.compiler.is_compiling():
        dense = w.dense
        return dense - torch.where(w.mask, 0.0, dense).detach()  # pruned: x - x = +0.0
    return value_straight_through(w.dense, w.masked)


def kept_gradient_only(w: SparseWeight) -> torch.Tensor:
    """``W * mask`` whose gradient reaches only the kept entries (fixed masks)."""
    if torch.compiler.is_compiling():
        return torch.where(w.mask, w.dense, 0.0)
    return _KeptOnly.apply(w.dense, w.masked, w.mask)


@dataclass(frozen=True)
class Method:
    """Base class of every training method; its defaults are the straight-through estimator
    whose masks follow ``|w|``. Override only the hooks your method changes."""

    name: ClassVar[str]
    # Facts about the method that tools and the contract tests read (tests/methods):
    # the torch.optim classes it works with (None: any; the trainer checks up front),
    optimizers: ClassVar[tuple[type[torch.optim.Optimizer], ...] | None] = None
    # True when the method's masks may keep more than the layer's pattern for a while (GaP's
    # dense phase, a nested weight's denser levels): a mask loaded into a sparse module is
    # then not checked against the pattern (nmsparse.engine.sparse_module).
    masks_beyond_pattern: ClassVar[bool] = False
    # which entries of the dense weight its gradient reaches from sparsify on: "all"
    # (straight through), "kept" (pruned weights get none) or "none" (the weight is frozen
    # and the method learns something else, e.g. MaskLLM's logits).
    gradient: ClassVar[str] = "all"
    # the pattern classes it can train (subclasses included); None: any. sparsify refuses
    # the others before it changes anything (OnTranspose is judged by the pattern it wraps).
    patterns: ClassVar[tuple[type[Pattern], ...] | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            METHODS.add(cls.name, cls)

    # -- what the mask ranks, and where it starts --------------------------------------------
    def score(self, w: SparseWeight) -> torch.Tensor:
        """The scores the pattern ranks (higher is kept); default ``|w|``."""
        return w.dense.detach().abs()

    def initial_mask(self, w: SparseWeight) -> torch.Tensor:
        """The mask at ``sparsify`` time."""
        return w.pattern.mask(self.score(w))

    # -- keeping the forward weight current ----------------------------------------------------
    def refresh(self, w: SparseWeight) -> torch.Tensor:
        """Rebuild mask and cached forward weight after the dense weight changed; returns a
        0-d bool "all finite" tensor (checked for many layers with one host sync)."""
        if type(self).score is Method.score:
            return w.recompute_mask()  # |w|: the fused fast path where it applies
        return w.recompute_mask(self.score(w))

    def masked_weight(self, w: SparseWeight) -> torch.Tensor:
        """What forward passes use; its backward decides the dense weight's gradient."""
        return straight_through(w)

    def deployed_weight(self, w: SparseWeight) -> torch.Tensor | None:
        """The weight ``finalize`` writes into the dense tensor; ``None`` (the default): the
        dense weight with its pruned entries set to 0. A method whose forward weight is not
        ``W * mask`` (S-STE) returns it here, so the finalized model computes the same."""
        return None

    # -- the optimizer step --------------------------------------------------------------------
    def before_step(self, weights: list[SparseWeight], step: Step) -> None:
        """Gradients are final; the update has not happened yet."""

    def after_step(self, weights: list[SparseWeight], step: Step) -> None:
        """The update happened and the masks were refreshed."""

    def steps_matter(self) -> bool:
        """Whether skipping the step hooks would change training (then an update loop that
        bypasses ``torch.optim`` gets a warning)."""
        return (type(self).before_step is not Method.before_step
                or type(self).after_step is not Method.after_step)

    # -- training recipes ----------------------------------------------------------------------
    def phases(self) -> tuple[str, ...]:
        """The training phases of a run with this method: ``"dense"`` (no mask) or
        ``"sparse"`` (this method), each as long as the run's epochs; any other name is a
        sparse phase trained with :meth:`phase_method` of that name."""
        return ("sparse",)

    def phase_method(self, kind: str) -> Method:
        """The method that trains a sparse phase named ``kind`` in :meth:`phases` (itself
        unless a method hands a later phase to another, e.g. regularize then fixed masks)."""
        return self

    def options(self) -> dict[str, Any]:
        """The hyperparameters, as given to the constructor."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class ModelMethod:
    """A method that acts on a whole model at optimizer steps (CHEX channel exploration),
    driven by a :class:`~nmsparse.engine.handle.SparsityHandle` like the per-weight methods: the
    handle's step hooks call :meth:`before_step` / :meth:`after_step` with its :class:`Step`
    (index, optimizer), and ``handle.state_dict()`` carries :meth:`state_dict` (keep it to
    tensors, numbers, lists and dicts). Attach one with :func:`nmsparse.drive`."""

    name: ClassVar[str] = "model method"  # its key in the handle's state

    def before_step(self, step: Step) -> None:
        """Gradients are final; the update has not happened yet."""

    def after_step(self, step: Step) -> None:
        """The update happened (and the per-weight masks were refreshed)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""

    def report(self, example: Any) -> dict[str, Any] | None:
        """What a training run adds to its summary for this method (``example``: an input
        batch), or None."""
        return None


def make_method(method: str | Method | type[Method], **options: Any) -> Method:
    """A method instance from a registered name (or class) and its hyperparameters, or an
    instance as is. Hyperparameters travel with the method: an option it does not take (e.g.
    ``decay`` for ``"ste"``) is an error naming the options it accepts, never ignored."""
    return METHODS.build(method, Method, **options)
