"""Nested multi-level N:M files: the densest level stored once, every sparser level implied.

``save_nested(model, path)`` writes a model whose weights were trained with the nested method
(:mod:`nmsparse.methods.nested`); ``load_nested(path, level)`` returns the finalized dense
``state_dict`` of any level. A nested weight costs exactly what the densest level alone costs
in a packed file (:mod:`nmsparse.export.packed`): its N kept values per group and their
in-group positions. The nesting costs no bit: inside each group the kept entries are stored
level by level (the ``N_0`` entries of the sparsest level first, then the ``N_1 - N_0`` that
level 1 adds, ...), in ascending position within a level, so the first ``N_k`` entries of a
group are level ``k``.

On-disk layout (format ``"nmsparse-nested"``, version 1): one safetensors file (no pickle).
For every nested weight with state-dict key ``K``, shape ``S``, levels ``N_0 < ... < N_L`` of
``M`` and layout ``"in"`` or ``"flat"``: ``K.nv`` (nested values: the weight's dtype,
``(rows, groups_per_row * N_L)``) and ``K.ni`` (nested indices: ``uint8``, positions bit-packed as
in :mod:`nmsparse.packing`, ``rows`` and ``groups_per_row`` as there), in the order above.
Every other tensor of the finalized ``state_dict()`` (the densest level baked into nested
weights is not stored dense) under its own key. The metadata entry ``"nmsparse"`` is a JSON
object ``{"format", "version", "library", "keys", "nested": {K: {"shape", "dtype", "m",
"levels", "layout", "index_bits"}}, "sha256", "metadata"}`` with the checksum computed as in
the packed format. Writes are atomic; a reader rejects anything else with
:class:`~nmsparse.export.packed.PackedFormatError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_open
from ..engine.selection import qualified
from ..engine.sparse_module import sparse_states
from ..engine.sparse_weight import refresh_stale
from ..levels import nested_weights
from ..packing import index_width, pack_positions, packed_shapes, unpack_positions
from ..patterns.grouping import LAYOUTS, from_groups, grouping_error, to_groups
from .packed import (
    HEADER_KEY,
    PackedFormatError,
    _cpu_copy,
    _digest,
    _dtype_name,
    _is_int,
    _require_safetensors,
    _unreadable,
)

FORMAT_NAME = "nmsparse-nested"
FORMAT_VERSION = 1
VALUES_SUFFIX = ".nv"  # short names keep the header no longer than a packed file's
INDICES_SUFFIX = ".ni"
_ENTRY_FIELDS = ("shape", "dtype", "m", "levels", "layout", "index_bits")
_HEADER_FIELDS = ("format", "version", "library", "keys", "nested", "sha256", "metadata")


@dataclass
class NestedReport:
    """What :func:`save_nested` wrote: nested weights, tensor bytes and the file size."""

    path: str
    nested: dict[str, str]  # key -> levels, e.g. "1:4,2:4"
    tensor_bytes: int
    file_bytes: int


def _rows(tensor: torch.Tensor, m: int, layout: str) -> torch.Tensor:
    groups = to_groups(tensor, m, layout)
    return groups.reshape(-1, groups.shape[-2], m)


def _ordered_positions(ranks: torch.Tensor, m: int, layout: str, n: int) -> torch.Tensor:
    """``(rows, groups, n)`` positions of the kept entries, level by level, then by position."""
    grouped = _rows(ranks.to(torch.int64), m, layout)
    key = grouped * m + torch.arange(m)
    return torch.sort(key, dim=-1).indices[..., :n]


def save_nested(model: nn.Module, path: str | os.PathLike[str], *,
                metadata: Mapping[str, Any] | None = None) -> NestedReport:
    """Write ``model`` (live, with nested weights) to ``path``; the model is not modified."""
    safetensors = _require_safetensors()
    user_metadata = dict(metadata or {})
    json.dumps(user_metadata)  # fails before anything is written
    weights = nested_weights(model)
    if not weights:
        raise ValueError("save_nested needs a model with nested weights (method='nested')")
    refresh_stale(weights)
    state = model.state_dict()
    keys_of = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for param, sparse in sparse_states(module).items():
            weight_key, mask_key = qualified(prefix, param), qualified(prefix, sparse.mask_name)
            state.pop(mask_key, None)
            if weight_key in state and any(sparse is w for w in weights):
                keys_of[weight_key] = sparse
            elif weight_key in state:
                state[weight_key] = state[weight_key].masked_fill(~sparse.mask, 0)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        w = keys_of.get(key)
        if w is None:
            tensors[key] = _cpu_copy(value)
            continue
        levels = w.method.levels_of(w)
        densest = levels[-1]
        dense = w.dense.detach().to("cpu")
        positions = _ordered_positions(w.method.ranks(w).cpu(), densest.m, densest.layout,
                                       densest.n)
        values = torch.gather(_rows(dense, densest.m, densest.layout), -1, positions)
        rows = positions.shape[0]
        tensors[key + VALUES_SUFFIX] = values.reshape(rows, -1).contiguous()
        tensors[key + INDICES_SUFFIX] = pack_positions(positions.reshape(rows, -1), densest.m)
        entries[key] = {"shape": list(dense.shape), "dtype": _dtype_name(dense.dtype),
                        "m": densest.m, "levels": [lv.n for lv in levels],
                        "layout": densest.layout, "index_bits": index_width(densest.m)}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
              "library": f"nmsparse {__version__}", "keys": list(state), "nested": entries,
              "sha256": _digest(tensors), "metadata": user_metadata}
    blob = safetensors.torch.save(
        tensors, metadata={HEADER_KEY: json.dumps(header, separators=(",", ":"))})
    with atomic_open(path, "wb") as file:
        file.write(blob)
    levels_text = {key: ",".join(f"{n}:{entries[key]['m']}" for n in entries[key]["levels"])
                   for key in entries}
    return NestedReport(os.fspath(path), levels_text,
                        sum(t.numel() * t.element_size() for t in tensors.values()), len(blob))


def _entry_error(entry: Any) -> str | None:
    if not isinstance(entry, dict) or sorted(entry) != sorted(_ENTRY_FIELDS):
        return f"must be an object with fields {sorted(_ENTRY_FIELDS)}"
    shape, m, levels = entry["shape"], entry["m"], entry["levels"]
    if (not isinstance(shape, list) or not 2 <= len(shape) <= 5
            or not all(_is_int(s) and s > 0 for s in shape)):
        return f"shape {shape!r} is not a list of 2 to 5 positive integers"
    dtype = getattr(torch, entry["dtype"], None) if isinstance(entry["dtype"], str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return f"dtype {entry['dtype']!r} is not a torch floating-point dtype name"
    if not _is_int(m) or not 2 <= m <= 256:
        return f"m={m!r} is not an integer in [2, 256]"
    if (not isinstance(levels, list) or not levels or not all(_is_int(n) for n in levels)
            or any(a >= b for a, b in zip(levels, levels[1:], strict=False))
            or levels[0] < 1 or levels[-1] >= m):
        return f"levels {levels!r} are not increasing integers in [1, {m})"
    if entry["layout"] not in LAYOUTS:
        return f"layout {entry['layout']!r} is not one of {list(LAYOUTS)}"
    if grouping_error(tuple(shape), m, entry["layout"]):
        return grouping_error(tuple(shape), m, entry["layout"])
    if entry["index_bits"] != index_width(m):
        return f"index_bits={entry['index_bits']!r} but M={m} is stored in {index_width(m)} bits"
    return None


def load_nested(path: str | os.PathLike[str], level: int | str = -1) -> dict[str, torch.Tensor]:
    """The finalized dense ``state_dict`` of ``level`` (an index, ``-1`` the densest, or a spec
    such as ``"1:4"`` that every nested weight has) from a :func:`save_nested` file."""
    header, tensors = read_nested(path)
    state = {}
    for key in header["keys"]:
        entry = header["nested"].get(key)
        if entry is None:
            state[key] = tensors[key]
            continue
        levels, m = entry["levels"], entry["m"]
        chosen = _level(levels, m, level, key)
        values = tensors[key + VALUES_SUFFIX]
        rows = values.shape[0]
        positions = unpack_positions(tensors[key + INDICES_SUFFIX], m, values.shape[1])
        positions = positions.reshape(rows, -1, levels[-1])[..., :levels[chosen]]
        kept = values.reshape(rows, -1, levels[-1])[..., :levels[chosen]]
        shape = tuple(entry["shape"])
        grouped = to_groups(torch.empty(shape, device="meta"), m, entry["layout"])
        dense = torch.zeros(rows, grouped.shape[-2], m, dtype=values.dtype)
        dense.scatter_(-1, positions, kept)
        state[key] = from_groups(dense.reshape(grouped.shape), torch.Size(shape),
                                 entry["layout"])
    return state


def _level(levels: list[int], m: int, level: int | str, key: str) -> int:
    specs = [f"{n}:{m}" for n in levels]
    if isinstance(level, str):
        if level.replace(" ", "") not in specs:
            raise ValueError(f"{key}: no level {level!r} in the file; its levels are "
                             f"{', '.join(specs)}")
        return specs.index(level.replace(" ", ""))
    if isinstance(level, bool) or not isinstance(level, int) \
            or not -len(levels) <= level < len(levels):
        raise ValueError(f"{key}: level must be an index in [{-len(levels)}, {len(levels)}) or "
                         f"one of {', '.join(specs)}, got {level!r}")
    return level % len(levels)


def read_nested(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of a nested file, everything validated (raises
    :class:`PackedFormatError` naming the file and the defect)."""
    safetensors = _require_safetensors()
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:
        raise _unreadable(path, error) from error
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise PackedFormatError(f"{path}: not a {FORMAT_NAME} file: no valid {HEADER_KEY!r} "
                                "header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else None
        raise PackedFormatError(f"{path}: format is {found!r}, expected {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION or sorted(header) != sorted(_HEADER_FIELDS):
        raise PackedFormatError(f"{path}: {FORMAT_NAME} version {header.get('version')!r} with "
                                f"fields {sorted(header)}; this nmsparse reads version "
                                f"{FORMAT_VERSION} with {sorted(_HEADER_FIELDS)}")
    keys, nested = header["keys"], header["nested"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
            or not isinstance(nested, dict) or not set(nested) <= set(keys):
        raise PackedFormatError(f"{path}: header 'keys'/'nested' do not match")
    expected = {k for k in keys if k not in nested}
    for key, entry in nested.items():
        error = _entry_error(entry)
        if error:
            raise PackedFormatError(f"{path}: header entry of nested weight {key!r}: {error}")
        expected |= {key + VALUES_SUFFIX, key + INDICES_SUFFIX}
    if set(tensors) != expected:
        raise PackedFormatError(f"{path}: the tensors do not match the header (missing "
                                f"{sorted(expected - set(tensors))}, unexpected "
                                f"{sorted(set(tensors) - expected)})")
    for key, entry in nested.items():
        n, m = entry["levels"][-1], entry["m"]
        values_shape, indices_shape = packed_shapes(tuple(entry["shape"]), n, m, entry["layout"])
        values, indices = tensors[key + VALUES_SUFFIX], tensors[key + INDICES_SUFFIX]
        if (_dtype_name(values.dtype) != entry["dtype"] or tuple(values.shape) != values_shape
                or indices.dtype != torch.uint8 or tuple(indices.shape) != indices_shape):
            raise PackedFormatError(f"{path}: tensors of nested weight {key!r} have the wrong "
                                    "dtype or shape")
        positions = unpack_positions(indices, m, values_shape[1]).reshape(
            values_shape[0], -1, n)
        ordered = torch.sort(positions, dim=-1).values
        if bool((positions >= m).any()) or (n > 1 and bool((ordered[..., 1:] ==
                                                             ordered[..., :-1]).any())):
            raise PackedFormatError(f"{path}: nested weight {key!r} has out-of-range or "
                                    "repeated positions in a group")
    if _digest(tensors) != header["sha256"]:
        raise PackedFormatError(f"{path}: the tensor data does not match the header's sha256 "
                                "checksum: the file is corrupted")
    return header, tensors


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "NestedReport", "load_nested", "read_nested",
           "save_nested"]
