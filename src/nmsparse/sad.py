"""Sparse Architecture Divergence (SAD) between N:M masks.

SAD (Zhou et al., ICLR 2021, "Learning N:M Fine-grained Structured Sparse Neural
Networks From Scratch") counts how many weights changed their kept/pruned state
between two masks::

    SAD(a, b) = || a XOR b ||_1

Contract
--------
* A mask is a ``torch.bool`` tensor with the weight's shape, ``True`` = kept.
* :func:`sad` takes either two mask tensors of the same shape, or two mappings
  ``{layer name: mask}`` with the same keys and per-layer shapes. A plain tensor pair
  is reported under the single layer name ``""`` (:data:`TENSOR_KEY`). Layers are
  reported in the order of ``a``'s keys. If ``b`` lives on another device it is moved
  to ``a``'s device. Bad input raises ``ValueError`` (non-bool dtype, shape mismatch,
  different layer names, a tensor mixed with a mapping) or ``TypeError`` (something
  that is neither a tensor nor a mapping).
* The normalised SAD (``fraction``) is the flipped count divided by the number of
  weights compared; it is ``0.0`` when nothing was compared.
* All counts are computed on the masks' device and copied to the host with one
  device->host transfer per call (one per device when layers are spread over
  several devices).
* :class:`SADTracker` records, at each ``record()`` call, the SAD of the current
  masks against the previously recorded masks and against the initial masks; see
  :meth:`SADTracker.record` for the row key scheme. It keeps private clones of the
  masks it compares against, so in-place updates of mask buffers are safe. Its
  ``state_dict()`` contains only tensors, lists, dicts, ints, floats, strings and
  ``None``, so it round-trips through ``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_open

__all__ = ["TENSOR_KEY", "SADResult", "SADTracker", "sad"]

#: Layer name under which :func:`sad` reports a plain tensor pair.
TENSOR_KEY = ""

_STATE_VERSION = 1
_PREV = "sad_prev"
_INIT = "sad_init"

MaskDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class SADResult:
    """SAD between two sets of masks.

    Attributes:
        per_layer: flipped (kept <-> pruned) positions per layer.
        per_layer_numel: number of weights compared per layer.
        per_layer_fraction: ``per_layer[k] / per_layer_numel[k]`` (0.0 for empty layers).
        total: sum of ``per_layer``.
        numel: total number of weights compared.
        fraction: ``total / numel`` (0.0 when ``numel == 0``).
    """

    per_layer: dict[str, int]
    per_layer_numel: dict[str, int]
    per_layer_fraction: dict[str, float]
    total: int
    numel: int
    fraction: float


def _describe(name: str) -> str:
    return "tensor" if name == TENSOR_KEY else f"layer {name!r}"


def _check_mask(t: Any, name: str, label: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{_describe(name)}: {label} is a {type(t).__name__}; masks must be torch.bool tensors"
        )
    if t.dtype != torch.bool:
        raise ValueError(
            f"{_describe(name)}: {label} has dtype {t.dtype}; masks must be torch.bool tensors "
            "(True = kept); convert with `mask.bool()` or `mask != 0`"
        )


def _check_same_layers(a: MaskDict, b: MaskDict, labels: tuple[str, str]) -> None:
    missing = [k for k in a if k not in b]
    extra = [k for k in b if k not in a]
    if missing or extra:
        raise ValueError(
            f"{labels[0]} and {labels[1]} must have the same layer names; "
            f"missing from {labels[1]}: {missing}; extra in {labels[1]}: {extra}"
        )


def _xor_counts(
    a: MaskDict, b: MaskDict, labels: tuple[str, str]
) -> tuple[list[str], list[Tensor], list[int]]:
    """Validate and return (names, on-device flip counts, numels) without any host sync."""
    _check_same_layers(a, b, labels)
    names: list[str] = []
    counts: list[Tensor] = []
    numels: list[int] = []
    for name, ta in a.items():
        tb = b[name]
        _check_mask(ta, name, labels[0])
        _check_mask(tb, name, labels[1])
        if ta.shape != tb.shape:
            raise ValueError(
                f"shape mismatch for {_describe(name)}: {labels[0]} has shape "
                f"{tuple(ta.shape)} but {labels[1]} has shape {tuple(tb.shape)}; "
                "masks must have identical shapes"
            )
        if tb.device != ta.device:
            tb = tb.to(ta.device)
        names.append(name)
        counts.append(torch.count_nonzero(ta ^ tb))
        numels.append(ta.numel())
    return names, counts, numels


def _to_host(counts: Sequence[Tensor]) -> list[int]:
    """Copy scalar count tensors to Python ints: one transfer per device involved."""
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(counts):
        by_device.setdefault(c.device, []).append(i)
    out = [0] * len(counts)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([counts[i] for i in idx]).tolist(), strict=True):
            out[i] = v
    return out


def _result(names: list[str], counts: list[int], numels: list[int]) -> SADResult:
    total = sum(counts)
    numel = sum(numels)
    return SADResult(
        per_layer=dict(zip(names, counts, strict=True)),
        per_layer_numel=dict(zip(names, numels, strict=True)),
        per_layer_fraction={
            k: (c / n if n else 0.0) for k, c, n in zip(names, counts, numels, strict=True)
        },
        total=total,
        numel=numel,
        fraction=total / numel if numel else 0.0,
    )


def _as_mapping(x: Tensor | MaskDict, label: str) -> MaskDict:
    if isinstance(x, Tensor):
        return {TENSOR_KEY: x}
    if isinstance(x, Mapping):
        return x
    raise TypeError(
        f"{label} is a {type(x).__name__}; expected a torch.bool tensor or a mapping "
        "{name: torch.bool tensor}"
    )


def sad(a: Tensor | MaskDict, b: Tensor | MaskDict) -> SADResult:
    """Sparse Architecture Divergence ``||a XOR b||_1`` between two masks or mask dicts.

    ``a`` and ``b`` are both bool tensors of the same shape (reported under layer
    name ``""``) or both mappings ``{name: bool tensor}`` with the same keys.
    ``b`` is moved to ``a``'s device if needed.
    """
    if isinstance(a, Tensor) != isinstance(b, Tensor):
        raise ValueError(
            f"cannot compare a {type(a).__name__} with a {type(b).__name__}; pass either "
            "two torch.bool tensors or two mappings {name: torch.bool tensor}"
        )
    names, counts, numels = _xor_counts(_as_mapping(a, "a"), _as_mapping(b, "b"), ("a", "b"))
    return _result(names, _to_host(counts), numels)


def _clone_masks(masks: MaskDict) -> dict[str, Tensor]:
    # Clone: the library updates mask buffers in place, so references would drift.
    return {k: v.clone() for k, v in masks.items()}


class SADTracker:
    """Record SAD against the previous and the initial masks over a training run.

    Args:
        masks: either the initial masks ``{name: bool tensor}``, or a zero-argument
            callable returning the current masks (e.g. ``handle.masks``). A callable
            is called once now for the initial masks and again by every
            ``record()`` that is not given masks explicitly.

    Before the first ``record()``, "previous" is the initial masks, so the first
    row's ``sad_prev_*`` equals its ``sad_init_*``.
    """

    def __init__(self, masks: MaskDict | Callable[[], MaskDict]) -> None:
        self._source: Callable[[], MaskDict] | None = None
        if not isinstance(masks, Mapping):
            if not callable(masks):
                raise TypeError(
                    f"SADTracker needs a mapping {{name: torch.bool tensor}} or a callable "
                    f"returning one, got {type(masks).__name__}"
                )
            self._source = masks
            masks = masks()
            if not isinstance(masks, Mapping):
                raise TypeError(
                    f"the mask source returned a {type(masks).__name__}; it must return a "
                    "mapping {name: torch.bool tensor}"
                )
        for name, t in masks.items():
            _check_mask(t, name, "initial masks")
        self._layers: tuple[str, ...] = tuple(masks)
        self._initial = _clone_masks(masks)
        self._previous = _clone_masks(masks)
        self._history: list[dict[str, Any]] = []

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Tracked layer names, in the order used for columns."""
        return self._layers

    def columns(self) -> list[str]:
        """Row keys, in order: see :meth:`record`."""
        return [
            "step",
            "epoch",
            f"{_PREV}_total",
            f"{_PREV}_frac",
            f"{_INIT}_total",
            f"{_INIT}_frac",
            *(f"{_PREV}/{k}" for k in self._layers),
            *(f"{_INIT}/{k}" for k in self._layers),
        ]

    def record(
        self, step: int, masks: MaskDict | None = None, epoch: int | None = None
    ) -> dict[str, Any]:
        """Compare ``masks`` (default: the mask source's current masks) with the
        previously recorded and the initial masks, store and return the row.

        Row keys:
            ``step``, ``epoch`` (``None`` if not given);
            ``sad_prev_total`` / ``sad_init_total``: flipped weights vs previous / initial;
            ``sad_prev_frac`` / ``sad_init_frac``: those totals divided by the number
            of weights in all tracked layers;
            ``sad_prev/<layer>`` / ``sad_init/<layer>``: per-layer flipped counts.

        Costs one device->host transfer. Raises ``ValueError`` if ``masks`` has other
        layers, shapes or dtypes than the initial masks.
        """
        if masks is None:
            if self._source is None:
                raise ValueError(
                    "record() got no masks and the tracker has no mask source; pass masks= "
                    "or build the tracker from a callable such as handle.masks"
                )
            masks = self._source()
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"record() needs masks as a mapping {{name: torch.bool tensor}}, "
                f"got {type(masks).__name__}"
            )
        _check_same_layers(self._initial, masks, ("initial masks", "recorded masks"))
        # Keep reference masks on the training device so later records do no copies.
        for k, t in masks.items():
            if isinstance(t, Tensor) and self._initial[k].device != t.device:
                self._initial[k] = self._initial[k].to(t.device)
        names, prev_counts, numels = _xor_counts(
            masks, self._previous, ("recorded masks", "previous masks")
        )
        _, init_counts, _ = _xor_counts(masks, self._initial, ("recorded masks", "initial masks"))
        host = _to_host(prev_counts + init_counts)  # the single sync for this record
        prev = _result(names, host[: len(names)], numels)
        init = _result(names, host[len(names) :], numels)

        row: dict[str, Any] = {
            "step": int(step),
            "epoch": None if epoch is None else int(epoch),
            f"{_PREV}_total": prev.total,
            f"{_PREV}_frac": prev.fraction,
            f"{_INIT}_total": init.total,
            f"{_INIT}_frac": init.fraction,
        }
        row.update({f"{_PREV}/{k}": prev.per_layer[k] for k in self._layers})
        row.update({f"{_INIT}/{k}": init.per_layer[k] for k in self._layers})
        self._history.append(row)
        self._previous = _clone_masks(masks)
        return dict(row)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Copies of the recorded rows, oldest first."""
        return [dict(r) for r in self._history]

    def to_dict(self) -> dict[str, list]:
        """History as columns ``{key: [value per record]}`` (keys as in :meth:`columns`)."""
        return {c: [r[c] for r in self._history] for c in self.columns()}

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the history as CSV (header = :meth:`columns`; ``None`` -> empty cell).

        Atomic: writes a temporary file in the same directory, then ``os.replace``\\ s it.
        """
        with atomic_open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self._history)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: clones of the reference masks plus the history.

        Contains only tensors, lists, dicts, ints, floats, strings and ``None``.
        """
        return {
            "version": _STATE_VERSION,
            "layers": list(self._layers),
            "initial": _clone_masks(self._initial),
            "previous": _clone_masks(self._previous),
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (e.g. after ``torch.load``).

        The tracker must track the same layers. Loaded masks are placed on the device of
        this tracker's current initial masks. Nothing changes if validation fails.
        """
        required = ("version", "layers", "initial", "previous", "history")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"SADTracker state is missing keys {missing}; expected {required}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"unsupported SADTracker state version {state['version']!r}; "
                f"this version reads {_STATE_VERSION}"
            )
        if list(state["layers"]) != list(self._layers):
            raise ValueError(
                f"state tracks layers {list(state['layers'])} but this tracker tracks "
                f"{list(self._layers)}"
            )
        loaded: dict[str, dict[str, Tensor]] = {}
        for part in ("initial", "previous"):
            masks = state[part]
            _check_same_layers(self._initial, masks, ("tracker masks", f"state {part!r}"))
            for k, t in masks.items():
                _check_mask(t, k, f"state {part!r}")
                if t.shape != self._initial[k].shape:
                    raise ValueError(
                        f"shape mismatch for {_describe(k)}: state {part!r} has shape "
                        f"{tuple(t.shape)} but the tracker has {tuple(self._initial[k].shape)}"
                    )
            loaded[part] = {
                k: masks[k].to(self._initial[k].device, copy=True) for k in self._layers
            }
        columns = set(self.columns())
        history = [dict(r) for r in state["history"]]
        for i, r in enumerate(history):
            if set(r) != columns:
                raise ValueError(
                    f"state history row {i} has keys {sorted(r)}; expected {sorted(columns)}"
                )
        self._initial = loaded["initial"]
        self._previous = loaded["previous"]
        self._history = history
