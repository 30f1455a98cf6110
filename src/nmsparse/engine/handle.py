"""The sparsity handle: what ``sparsify`` did, the live sparse weights, and the per-step
machinery of their methods.

``handle["fc.weight"]`` is the :class:`~nmsparse.engine.sparse_weight.SparseWeight` of that layer
(``.dense``, ``.mask``, ``.pattern``, ``.method``, ``.state``). The handle owns the step: it
counts the optimizer steps its weights took, runs each method's ``before_step`` /
``after_step`` with that index and the method's state, and saves all method state in
:meth:`SparsityHandle.state_dict` (checkpoint it next to the model and the optimizer).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..methods import Method, ModelMethod, Step
from ..patterns import Pattern
from ..tables import format_table
from . import step_hooks
from .baking import finalize_weights
from .sparse_weight import SparseWeight, refresh_stale

STATE_FORMAT = 1


@dataclass(frozen=True)
class LayerReport:
    """One eligible weight: the pattern and method it got, or the reason it stayed dense."""

    name: str
    kind: str
    shape: tuple[int, ...]
    pattern: Pattern | None
    reason: str = ""
    method: Method | None = None

    @property
    def sparse(self) -> bool:
        return self.pattern is not None


class SparsityHandle:
    """What :func:`nmsparse.sparsify` did, and the live sparse state of the model."""

    def __init__(self, model: nn.Module, layers: list[LayerReport]) -> None:
        self.model = model
        self.layers = layers
        self.weights: dict[str, SparseWeight] = {}
        self.steps = 0  # optimizer steps taken by this handle's weights
        self.method_states: dict[str, dict[str, Any]] = {}
        self.warned_bypass = False
        self.stepping: torch.optim.Optimizer | None = None  # the optimizer mid-step
        self.finalized = False
        self._attached: list[tuple[weakref.ref, tuple]] = []
        self.model_methods: list[ModelMethod] = []  # run at this handle's steps (drive())

    # -- what was done -------------------------------------------------------------------------
    @property
    def sparse_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.sparse]

    @property
    def skipped_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.sparse]

    @property
    def methods(self) -> list[Method]:
        """The distinct methods of the sparse weights, in layer order."""
        return list(dict.fromkeys(w.method for w in self.weights.values()))

    @property
    def method(self) -> Method | None:
        """The method of every sparse weight, or ``None`` if they differ."""
        methods = self.methods
        return methods[0] if len(methods) == 1 else None

    # -- the live weights ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> SparseWeight:
        if name not in self.weights:
            raise KeyError(f"{name!r} is not a sparse weight of this handle; sparse weights: "
                           f"{', '.join(self.weights) or '(none)'}")
        return self.weights[name]

    def __iter__(self) -> Iterator[SparseWeight]:
        return iter(self.weights.values())

    def __len__(self) -> int:
        return len(self.weights)

    def __contains__(self, name: object) -> bool:
        return name in self.weights

    def masks(self) -> dict[str, torch.Tensor]:
        """``{qualified weight name: bool mask}``; the live buffers, updated in place (DTensors
        sharded like their weights under FSDP2)."""
        self.refresh()
        return {name: w.mask for name, w in self.weights.items()}

    def refresh(self, force: bool = False) -> None:
        """Rebuild the masks whose weights changed (optimizer steps do it themselves);
        ``force``: rebuild all, e.g. after writing into dense weights through ``.data``,
        which version counters do not see."""
        weights = list(self.weights.values())
        if force:
            for w in weights:
                w.mark_stale()
        refresh_stale(weights)

    # -- the step --------------------------------------------------------------------------------
    def _step(self, method: Method, optimizer) -> Step:
        return Step(self.steps, optimizer, self.method_states.setdefault(repr(method), {}))

    def _by_method(self, weights: list[SparseWeight]) -> dict[Method, list[SparseWeight]]:
        groups: dict[Method, list[SparseWeight]] = {}
        for w in weights:
            groups.setdefault(w.method, []).append(w)
        return groups

    def _model_step(self, method: ModelMethod, optimizer) -> Step:
        return Step(self.steps, optimizer, self.method_states.setdefault(method.name, {}))

    def run_before_step(self, weights: list[SparseWeight], optimizer=None) -> None:
        for method, group in self._by_method(weights).items():
            method.before_step(group, self._step(method, optimizer))
        for w in weights:
            w.saw_gradient()
        for model_method in self.model_methods:
            model_method.before_step(self._model_step(model_method, optimizer))

    def run_after_step(self, weights: list[SparseWeight], optimizer=None) -> None:
        for w in weights:
            # fused optimizers write without bumping version counters; a weight without a
            # gradient was not stepped (torch.optim skips it) and keeps its cache
            if w.owned().grad is not None:
                w.mark_stale()
        refresh_stale(weights)
        for method, group in self._by_method(weights).items():
            method.after_step(group, self._step(method, optimizer))
        for model_method in self.model_methods:
            model_method.after_step(self._model_step(model_method, optimizer))
        self.steps += 1

    def add(self, method: ModelMethod) -> SparsityHandle:
        """Run a model-level method at this handle's steps and keep its state in
        :meth:`state_dict` (see :func:`nmsparse.drive`). Returns the handle."""
        if not isinstance(method, ModelMethod):
            raise ValueError(f"add takes a nmsparse.methods.ModelMethod, got "
                             f"{type(method).__name__}")
        if any(m.name == method.name for m in self.model_methods if m is not method):
            raise ValueError(f"this handle already runs a model method named {method.name!r}")
        if method not in self.model_methods:
            self.model_methods.append(method)
        return self

    def before_step(self) -> None:
        """For update loops that bypass ``torch.optim``: call once the gradients are final,
        before updating the weights (adds the SR-STE term, among others)."""
        self.run_before_step(list(self.weights.values()))

    def after_step(self) -> None:
        """For update loops that bypass ``torch.optim``: call after updating the weights."""
        self.run_after_step(list(self.weights.values()))

    def attach(self, optimizer: torch.optim.Optimizer) -> SparsityHandle:
        """Run this handle's step machinery through hooks on ``optimizer`` itself (instead of
        the global hooks); removed again by :meth:`finalize`. Returns the handle."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"attach takes a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        if self.finalized:
            raise ValueError("this handle was finalized: its model has no sparse weights left")
        if self.is_attached_to(optimizer):
            return self
        for w in self.weights.values():
            w.claim()  # FSDP2 may have replaced the Parameters since sparsify: tag the new ones
        if not step_hooks.sparse_weights_of(optimizer, only=self):
            raise ValueError("the optimizer holds none of this handle's sparse weights (nor "
                             "of its model's parameters, for a model method)")

        def before(opt, args, kwargs):
            return step_hooks.begin_step(opt, step_hooks.sparse_weights_of(opt, only=self),
                                         args, kwargs)

        def after(opt, args, kwargs):
            step_hooks.end_step(opt, step_hooks.sparse_weights_of(opt, only=self))

        hooks = (optimizer.register_step_pre_hook(step_hooks.eager_only(before)),
                 optimizer.register_step_post_hook(step_hooks.eager_only(after)))
        self._attached.append((weakref.ref(optimizer), hooks))
        return self

    def is_attached_to(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(ref() is optimizer for ref, _ in self._attached)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count and every method's state (per method and per weight): only tensors and
        plain containers, so it loads with ``torch.load(weights_only=True)``."""
        state = {"format": STATE_FORMAT, "steps": self.steps,
                 "methods": {key: dict(value) for key, value in self.method_states.items()},
                 "weights": {name: dict(w.state) for name, w in self.weights.items()},
                 "layers": _layers(self)}
        if self.model_methods:
            state["model_methods"] = {m.name: m.state_dict() for m in self.model_methods}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`; a state of another handle (other layer names, shapes,
        patterns or methods) is a ``ValueError`` saying what differs, and changes nothing."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a sparsity handle state (expected a dict from "
                             f"SparsityHandle.state_dict(), format {STATE_FORMAT})")
        _check_same_layers(state, self)
        weights = state.get("weights", {})
        saved = state.get("model_methods", {})
        missing = sorted({m.name for m in self.model_methods} - set(saved))
        if missing:
            raise ValueError(f"the saved handle state has no state of the model method(s) "
                             f"{missing} this handle runs")
        self.steps = int(state["steps"])
        self.method_states = {key: dict(value) for key, value in state["methods"].items()}
        for name, w in self.weights.items():
            w.state = dict(weights.get(name, {}))
        for model_method in self.model_methods:
            model_method.load_state_dict(saved[model_method.name])

    # -- the end -----------------------------------------------------------------------------------
    def finalize(self) -> nn.Module:
        """Bake this handle's masks into the weights, remove its machinery (hooks included)
        and return the model; other handles on the same model stay."""
        finalize_weights(self.model, list(self.weights.values()))
        if not self.finalized:  # only model methods were left
            self.release()
        return self.model

    def release(self) -> None:
        """Forget the weights and remove every hook (called when they are finalized)."""
        for _, hooks in self._attached:
            for hook in hooks:
                hook.remove()
        self._attached.clear()
        self.weights.clear()
        self.model_methods.clear()
        self.finalized = True
        step_hooks.unregister(self)

    # -- copies (deepcopy, whole-model pickles) --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_attached"] = []  # hooks belong to this process's optimizers
        state["stepping"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if not self.finalized:
            step_hooks.register(self)

    # -- printing --------------------------------------------------------------------------------
    def __str__(self) -> str:
        mixed = self.method is None and bool(self.weights)
        rows = []
        for layer in self.layers:
            row = [layer.name, layer.kind, "x".join(map(str, layer.shape)),
                   str(layer.pattern) if layer.sparse else "dense"]
            if mixed:
                row.append(repr(layer.method) if layer.sparse else "")
            rows.append([*row, layer.reason])
        headers = ["weight", "type", "shape", "pattern", *(["method"] if mixed else []), "note"]
        how = "methods per layer" if mixed else f"method={self.method}"
        title = (f"nmsparse: {len(self.sparse_layers)} of {len(self.layers)} eligible weights "
                 f"sparse, {how}")
        return title + "\n" + format_table(headers, rows)

    def __repr__(self) -> str:
        return (f"SparsityHandle(sparse={len(self.sparse_layers)}, "
                f"skipped={len(self.skipped_layers)}, methods={self.methods!r})")


# -- which handle a saved state belongs to ------------------------------------------------------
def _layers(handle: SparsityHandle) -> dict[str, dict[str, Any]]:
    """What identifies each sparse weight of a handle: shape, the pattern sparsify gave it
    (a method may change the live one, e.g. a nested weight's level) and method."""
    given = {layer.name: layer.pattern for layer in handle.layers}
    return {name: {"shape": list(w.dense.shape), "pattern": str(given.get(name, w.pattern)),
                   "method": getattr(type(w.method), "name", type(w.method).__name__)}
            for name, w in handle.weights.items()}


def _check_same_layers(state: dict[str, Any], handle: SparsityHandle) -> None:
    """Refuse the state of another handle. States saved before ``layers`` was recorded are
    checked by their weight names only."""
    weights = handle.weights
    saved_names = state.get("weights", {})
    saved_names = set(saved_names) if isinstance(saved_names, dict) else set()
    if unknown := sorted(saved_names - set(weights)):
        raise ValueError("the saved handle state is of another model: it names weights this "
                         f"handle does not have: {unknown[:3]}; this handle's: "
                         f"{list(weights)[:6]}")
    if missing := sorted(set(weights) - saved_names):
        raise ValueError("the saved handle state is of another model: it lacks weights this "
                         f"handle has: {missing[:3]}")
    saved = state.get("layers")
    if saved is None:
        return
    for name, mine in _layers(handle).items():
        theirs = saved.get(name) if isinstance(saved, dict) else None
        for key, value in mine.items():
            if not isinstance(theirs, dict) or theirs.get(key) != value:
                got = theirs.get(key) if isinstance(theirs, dict) else None
                raise ValueError(f"the saved handle state is of another model: {name} has "
                                 f"{key} {got!r} there and {value!r} here")

