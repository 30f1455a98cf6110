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
kept weights). The masks are then handed to ``nmsparse.sparsify(..., masks=...)`` with the
method ``then`` (``"fixed"``: masks held during any later training, the ASP recipe;
``"srste"``: SR-STE continuing from the one-shot mask), so the model is ready for
``finalize``, packing, or fine-tuning.

Calibration statistics are gathered by forward hooks that are always removed, also on error.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..make_sparse import sparsify
from ..methods import Method
from ..patterns import Pattern, PatternLike, parse_pattern
from ..sparse_weight import STATE_ATTRIBUTE
from ..tables import format_table
from .base import PRUNERS, Pruner
from .blocks import BlockRunner, call_model, find_blocks, is_chain
from .statistics import collecting
from .targets import Target, find_targets

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

    method: str
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
        head = (f"{self.method} to {self.pattern}: {sum(layer.pruned for layer in self.layers)} of "
                f"{len(self.layers)} weights pruned in {self.seconds:.1f} s ({self.mode}, "
                f"{self.calibration_batches} calibration batches, "
                f"{self.calibration_rows} rows)")
        return head + "\n" + format_table(["weight", "module", "shape", "density", "note"],
                                          rows)


def _globs(value: str | Sequence[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else (list(value) if value is not None else None)


def _selected(target: Target, includes, excludes) -> bool:
    names = (target.module_name, target.name)
    hit = lambda globs: any(fnmatch.fnmatchcase(n, g) for g in globs for n in names)  # noqa: E731
    return (includes is None or hit(includes)) and not (excludes and hit(excludes))


def _plan(model: nn.Module, pattern: Pattern, pruner: Pruner, include, exclude
          ) -> tuple[list[Target], list[PrunedLayer]]:
    targets, layers = [], []
    includes, excludes = _globs(include), _globs(exclude)
    owners: dict[int, list[str]] = {}  # Parameter -> every name it has (tied weights)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for target in find_targets(model):
        weight = target.weight
        if getattr(weight, STATE_ATTRIBUTE, None) is not None:
            raise ValueError(f"{target.name} is already sparse; call nmsparse.finalize(model) "
                             "before pruning it again")
        reason = ""
        if not _selected(target, includes, excludes):
            reason = "not selected (include/exclude)"
        elif not torch.is_floating_point(weight):
            reason = f"dtype {weight.dtype} is not floating point"
        elif len(owners.get(id(weight), ())) > 1:
            others = [n for n in owners[id(weight)] if n != target.name]
            reason = f"shares its Parameter with {others[0]} (kept dense)"
        elif error := pattern.why_not(target.shape):
            reason = error
        elif pruner.statistic is not None and not target.calibratable:
            reason = f"{pruner.name} needs a Linear-like layer; prune it with magnitude"
        layers.append(PrunedLayer(target.name, type(target.module).__name__, target.shape,
                                  reason=reason))
        if not reason:
            targets.append(target)
    if not targets:
        raise ValueError(f"no layer of the model can be pruned to {pattern} with "
                         f"{pruner.name}: " + "; ".join(f"{layer.name}: {layer.reason}"
                                                         for layer in layers[:4]))
    return targets, layers


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
    for target in targets:
        masks[target.name] = _prune_one(target, pruner, statistics[target.module], pattern)
    return statistics[targets[0].module].rows


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


def prune(model: nn.Module, pattern: PatternLike = "2:4", method: str = "sparsegpt",
          calibration: Iterable | None = None, *, then: str | Method | None = "fixed",
          include: str | Sequence[str] | None = None,
          exclude: str | Sequence[str] | None = None, layout: str = "in",
          permute: bool = False, progress: Callable[[int, int, float], None] | None = None,
          **options) -> PruneResult:
    """Prune ``model``'s prunable layers to ``pattern`` in one shot, in place.

    Args:
        pattern: ``"2:4"``, ``"4:8"``, ``"unstructured:0.5"``, any pattern spec.
        method: ``"magnitude"`` (no data), ``"wanda"``, ``"ria"`` or ``"sparsegpt"``.
        calibration: an iterable of batches for the calibrated methods: token tensors
            ``(batch, seq)``, mappings of keyword arguments, or ``(inputs, targets)`` pairs.
        then: the nmsparse method that holds the masks afterwards (``"fixed"``, ``"srste"``,
            a :class:`~nmsparse.Method`), or ``None`` to only write the pruned weights.
        include / exclude: globs on module or weight names.
        permute: first reorder input channels (through their producers, so the function
            is unchanged) so that more magnitude survives N:M (:mod:`nmsparse.channels`);
            the first calibration batch is the example the model is traced with.
        progress: called as ``progress(done, blocks, seconds)`` after each transformer block
            of a sequential (calibrated) prune, ``seconds`` since the call began.
        options: the method's settings (SparseGPT: ``blocksize=128``, ``damp=0.01``).
    """
    started = time.perf_counter()
    pattern = parse_pattern(pattern, layout=layout)
    try:
        pruner = PRUNERS.get(method)(**options)
    except TypeError as error:
        raise ValueError(f"{method}: {error}") from None
    targets, layers = _plan(model, pattern, pruner, include, exclude)
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
    with _calibration_mode(model):
        if pruner.statistic is None:
            for target in targets:
                masks[target.name] = _prune_one(target, pruner, None, pattern)
        else:
            _prune_calibrated(model, targets, pruner, pattern, batches, result,
                              progress=progress, started=started)
    for layer in layers:
        if layer.name in masks:
            mask = masks[layer.name]
            layer.density = float(mask.sum()) / mask.numel()
    result.handle = _hold_masks(model, pattern, targets, masks, then)
    result.seconds = time.perf_counter() - started
    return result


def _prune_calibrated(model: nn.Module, targets: list[Target], pruner: Pruner,
                      pattern: Pattern, batches: list, result: PruneResult, *,
                      progress=None, started: float = 0.0) -> None:
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
                if progress is not None:
                    progress(index + 1, len(blocks), time.perf_counter() - started)
            result.peak_cached_bytes = runner.peak_cached_bytes
        finally:
            runner.clear()
    else:
        result.mode = WHOLE_MODEL
    if rest:
        rows.append(_prune_with_statistics(rest, pruner, pattern, whole_model_pass,
                                           result.masks))
    result.calibration_rows = rows[0]


def _hold_masks(model: nn.Module, pattern: Pattern, targets: list[Target],
                masks: Mapping[str, torch.Tensor], then) -> object | None:
    """Hand the masks to ``sparsify`` (the one place that decides how a pruned weight is kept
    sparse afterwards)."""
    held = {t.name: masks[t.name] for t in targets}
    if then is None:
        return None
    rules = {glob.escape(name): pattern for name in held}
    return sparsify(model, rules, method=then, masks=held)
