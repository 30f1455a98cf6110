"""``nmsparse.prune``: one-shot pruning of a trained model to a pattern, layer by layer.

Order of work:

* ``magnitude`` needs no data: every prunable weight is pruned on its own.
* ``wanda``, ``ria`` and ``sparsegpt`` need calibration statistics of each layer's input. When the
  model has a chain of repeated blocks (:mod:`nmsparse.oneshot.blocks`), the pruning is
  sequential: the inputs of the first block are computed once, then for each block in turn
  the statistics of all its prunable layers are gathered in one pass over the cached inputs,
  those layers are pruned, and the pruned block's outputs become the next block's inputs.
  Layers outside the blocks (a language model's head) are pruned last, from one pass of the
  whole (already pruned) model. A model without such a chain gets that whole-model pass for
  all its layers (fallback: statistics then come from the dense model for every layer).

The pruned weights are written into the model (zero where pruned; SparseGPT also updates the
kept weights). The selection (:func:`nmsparse.engine.selection.select`, the one every verb uses)
and the masks are then handed to ``sparsify`` with the method ``then`` (``"fixed"``: masks
held during any later training, the ASP recipe; ``"srste"``: SR-STE continuing from the
one-shot mask), so the model is ready for ``finalize``, packing, or fine-tuning.

Calibration statistics are gathered by forward hooks that are always removed, also on error.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.make_sparse import check_choices, sparsify_choices
from ..engine.selection import Choice, check_tied, select
from ..methods import Method, make_method
from ..patterns import Pattern, PatternLike, parse_pattern
from ..tables import format_table
from .base import PRUNERS, Pruner
from .blocks import BlockRunner, call_model, find_blocks, is_chain
from .statistics import collecting
from .targets import Target

SEQUENTIAL, WHOLE_MODEL, NO_DATA = "sequential blocks", "whole model", "no calibration"


@dataclass
class PrunedLayer:
    """One prunable weight: its density after pruning, or why it was left dense."""

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float | None = None
    reason: str = ""

    @property
    def pruned(self) -> bool:
        return self.density is not None


@dataclass
class PruneResult:
    """What :func:`prune` did."""

    pruner: str
    pattern: Pattern
    layers: list[PrunedLayer]
    masks: dict[str, torch.Tensor]  # weight name -> bool mask as the Parameter is stored
    handle: object | None  # the SparsityHandle holding the masks (None with then=None)
    mode: str = NO_DATA
    calibration_batches: int = 0
    calibration_rows: int = 0  # input rows (tokens) seen by the first pruned layer
    peak_cached_bytes: int = 0
    seconds: float = 0.0
    permutation: object | None = None  # the PermutationReport of permute=True

    def __str__(self) -> str:
        rows = [(layer.name, layer.kind, "x".join(map(str, layer.shape)),
                 f"{layer.density:.3f}" if layer.pruned else "dense", layer.reason)
                for layer in self.layers]
        head = (f"{self.pruner} to {self.pattern}: {sum(layer.pruned for layer in self.layers)} of "
                f"{len(self.layers)} weights pruned in {self.seconds:.1f} s ({self.mode}, "
                f"{self.calibration_batches} calibration batches, "
                f"{self.calibration_rows} rows)")
        return head + "\n" + format_table(["weight", "module", "shape", "density", "note"],
                                          rows)

    @property
    def method(self) -> str:
        """The pruner's name (deprecated: use ``pruner``)."""
        warnings.warn("PruneResult.method is deprecated: use PruneResult.pruner",
                      DeprecationWarning, stacklevel=2)
        return self.pruner


def _plan(model: nn.Module, pattern: Pattern, pruner: Pruner, include, exclude, then,
          tied: str) -> tuple[list[Choice], list[Target], list[PrunedLayer]]:
    """The weights to prune: :func:`nmsparse.engine.selection.select` (the one selection every verb
    uses), less the layers the pruner cannot calibrate."""
    choices = select(model, pattern, include, exclude, method=then, tied=tied)
    targets, layers = [], []
    for choice in choices:
        if choice.sparse_state is not None:
            if choice.requested:
                raise ValueError(f"{choice.name} is already sparse; call "
                                 "nmsparse.finalize(model) before pruning it again")
            continue
        target = Target.of(choice)
        if (choice.pattern is not None and pruner.statistic is not None
                and not target.calibratable):
            choice.leave_dense(f"{pruner.name} needs a Linear-like layer; prune it with "
                               "magnitude")
        layers.append(PrunedLayer(choice.name, type(choice.module).__name__, target.shape,
                                  reason=choice.reason))
        if choice.pattern is not None:
            targets.append(target)
    if not targets:
        raise ValueError(f"no layer of the model can be pruned to {pattern} with "
                         f"{pruner.name}: " + "; ".join(f"{layer.name}: {layer.reason}"
                                                         for layer in layers[:4]))
    return choices, targets, layers


def _prune_one(target: Target, pruner: Pruner, statistic, pattern: Pattern
               ) -> torch.Tensor:
    """Prune one weight in place; returns its mask as the Parameter is stored."""
    matrix = target.matrix()
    pruned, mask = pruner.prune(matrix, statistic, pattern)
    found = pattern.violations(mask)
    if not found.ok:  # a pruner bug, never the user's input
        raise RuntimeError(f"{pruner.name} produced a mask for {target.name} that breaks "
                           f"{pattern} in {found.violating} of {found.groups} groups")
    target.write(pruned * mask)
    return target.to_parameter_layout(mask)


def _share_statistics(statistics: dict) -> None:
    """Layers that read the same input (bit-identical statistics) get one statistic object,
    so that what the pruner derives from it is computed once."""
    distinct: list = []
    for module, statistic in statistics.items():
        same = next((d for d in distinct if d.same_as(statistic)), None)
        if same is None:
            distinct.append(statistic)
        else:
            statistics[module] = same


def _prune_with_statistics(targets: Sequence[Target], pruner: Pruner, pattern: Pattern,
                           feed, masks: dict[str, torch.Tensor]) -> int:
    """Gather statistics of ``targets`` while ``feed()`` runs the calibration data, then prune
    them; returns the rows the first target saw."""
    statistics = {t.module: pruner.statistic(t.shape[1]) for t in targets}
    with collecting(statistics):
        feed()
    for target in targets:
        if statistics[target.module].rows == 0:
            raise ValueError(f"{target.name}: no calibration input reached this layer (is it "
                             "used in the forward pass?); leave it out with exclude=")
    rows = statistics[targets[0].module].rows
    _share_statistics(statistics)
    last = {target.module: target for target in targets}
    for target in targets:  # each statistic is freed after the last layer that reads it
        statistic = (statistics.pop(target.module) if last[target.module] is target
                     else statistics[target.module])
        masks[target.name] = _prune_one(target, pruner, statistic, pattern)
    return rows


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterable[None]:
    """Evaluation mode, no gradients and (Hugging Face) no key/value cache; all restored."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache


def prune(model: nn.Module, pattern: PatternLike = "2:4",
          pruner: str | Pruner | None = None, calibration: Iterable | None = None, *,
          then: str | Method | None = "fixed", include: str | Sequence[str] | None = None,
          exclude: str | Sequence[str] | None = None, layout: str = "in",
          tied: str = "dense", permute: bool = False,
          progress: Callable[[int, int, str], None] | None = None, method: str | None = None,
          **options) -> PruneResult:
    """Prune ``model``'s prunable layers to ``pattern`` in one shot, in place.

    Args:
        pattern: ``"2:4"``, ``"4:8"``, ``"unstructured:0.5"``, any pattern spec.
        pruner: ``"magnitude"`` (no data), ``"wanda"``, ``"ria"`` or ``"sparsegpt"`` (the
            default), any registered name (:data:`~nmsparse.oneshot.PRUNERS`) or a
            :class:`~nmsparse.oneshot.Pruner` instance such as ``SparseGPT(damp=0.1)``.
        calibration: an iterable of batches for the calibrated methods: token tensors
            ``(batch, seq)``, mappings of keyword arguments, or ``(inputs, targets)`` pairs.
        then: the nmsparse method that holds the masks afterwards (``"fixed"``, ``"srste"``,
            a :class:`~nmsparse.Method`), or ``None`` to only write the pruned weights.
        include / exclude: globs on module or weight names; one matching no eligible layer
            is an error (as in every verb: :func:`nmsparse.engine.selection.select`).
        tied: a weight other modules also read: ``"dense"`` keeps it dense, ``"sparse"``
            prunes it for all of them (as :func:`nmsparse.sparsify`).
        permute: first reorder input channels (through their producers, so the function
            is unchanged) so that more magnitude survives N:M (:mod:`nmsparse.channels`);
            the first calibration batch is the example the model is traced with.
        progress: called as ``progress(done, total, unit)`` after each pruned ``unit``
            (``"layer"`` without calibration, ``"block"`` of a sequential calibrated prune,
            ``"model pass"`` for layers calibrated on the whole model), so that a long prune
            is not silent (the command line prints a line or a bar with the elapsed time).
        options: the pruner's settings (SparseGPT: ``blocksize=128``, ``damp=0.01``); one it
            does not take is an error.
        method: the old name of ``pruner`` (deprecated: ``method`` names the training
            method everywhere else, here ``then``).
    """
    started = time.perf_counter()
    check_tied(tied)
    pattern = parse_pattern(pattern, layout=layout)
    if method is not None:
        if pruner is not None:
            raise ValueError("give the one-shot pruner as pruner= only (method= is its old, "
                             "deprecated name)")
        warnings.warn("prune(method=...) is deprecated: the one-shot pruner is pruner=, the "
                      "training method that holds the masks is then=", DeprecationWarning,
                      stacklevel=2)
        pruner = method
    pruner = PRUNERS.build("sparsegpt" if pruner is None else pruner, Pruner, **options)
    held_by = make_method(then) if then is not None else None
    choices, targets, layers = _plan(model, pattern, pruner, include, exclude, held_by, tied)
    if held_by is not None:
        check_choices(choices)  # refused before a pruned weight is written
    batches: list = []
    if permute:
        batches = list(calibration) if calibration is not None else []
        if not batches:
            raise ValueError("permute=True needs calibration= (at least one input batch) to "
                             "trace the model's channel dependencies")
        calibration = batches
    if pruner.statistic is not None:
        if calibration is None:
            raise ValueError(f"{pruner.name} needs calibration data: give calibration=an "
                             "iterable of input batches")
        batches = list(calibration)
        if not batches:
            raise ValueError(f"{pruner.name} needs calibration data; the calibration "
                             "iterable was empty")
    masks: dict[str, torch.Tensor] = {}
    result = PruneResult(pruner.name, pattern, layers, masks, None,
                         calibration_batches=len(batches))
    if permute:
        from ..channels.permute import permute_model

        result.permutation = permute_model(model, pattern, batches[0], {t.name for t in targets})
    report = progress or (lambda done, total, unit: None)
    with _calibration_mode(model):
        if pruner.statistic is None:
            for index, target in enumerate(targets):
                masks[target.name] = _prune_one(target, pruner, None, pattern)
                report(index + 1, len(targets), "layer")
        else:
            _prune_calibrated(model, targets, pruner, pattern, batches, result, report)
    for layer in layers:
        if layer.name in masks:
            mask = masks[layer.name]
            layer.density = float(mask.sum()) / mask.numel()
    if held_by is not None:  # sparsify keeps them sparse from here (its one place to decide)
        result.handle = sparsify_choices(model, choices, masks)
    result.seconds = time.perf_counter() - started
    return result


def _prune_calibrated(model: nn.Module, targets: list[Target], pruner: Pruner,
                      pattern: Pattern, batches: list, result: PruneResult,
                      report: Callable[[int, int, str], None]) -> None:
    device = next(model.parameters()).device
    module_ids = {id(t.module) for t in targets}
    found = find_blocks(model, lambda block: any(id(m) in module_ids for m in block.modules()))
    blocks = found[1] if found is not None else None
    if blocks is not None and not is_chain(model, blocks, batches[0], device):
        blocks = None
    rest = list(targets)
    rows = []

    def whole_model_pass():
        for batch in batches:
            call_model(model, batch, device)

    if blocks is not None:
        result.mode = SEQUENTIAL
        runner = BlockRunner()
        try:
            runner.capture(model, blocks[0], batches, device)
            for index, block in enumerate(blocks):
                inside = {id(m) for m in block.modules()}
                mine = [t for t in rest if id(t.module) in inside]
                rest = [t for t in rest if id(t.module) not in inside]
                if mine:
                    rows.append(_prune_with_statistics(
                        mine, pruner, pattern,
                        lambda block=block: runner.run(block, replace=False), result.masks))
                if index + 1 < len(blocks):
                    runner.run(block, replace=True)
                report(index + 1, len(blocks), "block")
            result.peak_cached_bytes = runner.peak_cached_bytes
        finally:
            runner.clear()
    else:
        result.mode = WHOLE_MODEL
    if rest:
        rows.append(_prune_with_statistics(rest, pruner, pattern, whole_model_pass,
                                           result.masks))
        report(1, 1, "model pass")
    result.calibration_rows = rows[0]
