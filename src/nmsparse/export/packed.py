"""Packed N:M model files: ``save_packed`` / ``load_packed``.

A packed file stores every N:M weight of a model as its kept values plus bit-packed in-group
positions (:mod:`nmsparse.packing`), and every other tensor dense, so an fp16 model made of
2:4 layers takes about 9/16 of its dense size (2:8: 5/16). Loading restores the finalized
dense ``state_dict`` (zeros in place, original keys) bit for bit, ready for the unmodified
architecture.

On-disk layout (format ``"nmsparse-packed"``, version 2; version 1 files, which cannot hold
transposed weights, are read too). The file is one ordinary
safetensors file (little-endian, no pickle: loading executes nothing from the file):

* For every packed weight with state-dict key ``K`` (dense shape ``S``, pattern N:M, layout
  ``L``) two tensors:

  - ``K.nm_values``: the weight's dtype, shape ``(rows, groups_per_row * N)``;
  - ``K.nm_indices``: ``uint8``, shape ``(rows, ceil(groups_per_row * N * w / 8))``,
    ``w = index_width(M)`` bits (1, 2, 4 or 8) per position: the position of value ``j`` of
    a row sits in byte ``j * w // 8`` of that row at bit ``j * w % 8`` (little-endian inside
    each byte), unused high bits of a row's last byte zero;

  with ``rows = S[0] * prod(S[2:])`` and ``groups_per_row = S[1] / M`` for ``L = "in"``
  (groups along dim 1), ``rows = S[0]`` and ``groups_per_row = prod(S[1:]) / M`` for
  ``L = "flat"``. The N positions of a group are strictly ascending and ``< M``; the full
  contract of the two tensors is the docstring of :mod:`nmsparse.packing`.
  A weight stored ``(in, out)`` and grouped along dim 0 (Hugging Face ``Conv1D``) is packed
  as its transpose: its entry says ``"transposed": true``, ``S`` stays the stored shape and
  the two tensors are those of the ``(out, in)`` matrix ``W.T`` with layout ``"in"``.
* Every other tensor of the finalized ``state_dict()`` under its own key, unchanged (the
  ``<weight>_mask`` buffers of a live sparse model are not stored: the packing implies them).
* The safetensors metadata holds one entry, ``"nmsparse"``: a JSON object

  .. code-block:: text

      {"format": "nmsparse-packed", "version": 2, "library": "nmsparse <version>",
       "keys": [every original state-dict key, in state_dict() order],
       "packed": {K: {"shape": S, "dtype": "float16", "n": N, "m": M, "layout": L,
                      "index_bits": w[, "transposed": true]}, ...},
       "sha256": hex sha256 of the raw little-endian bytes of every tensor in the file,
                 concatenated in tensor-name order (Python str sort, i.e. by code point),
       "metadata": {user metadata (any JSON object)}}

  ``dtype`` is the torch dtype name (``str(dtype)`` without ``"torch."``). The file holds
  exactly the tensors the header implies: ``keys`` minus the packed keys, plus two tensors per
  packed key; a reader rejects anything else.

Bit-exactness: kept entries are stored with their bits (a kept ``-0.0`` included), pruned
entries come back as ``+0.0``, which is what :func:`nmsparse.finalize` writes. Only when a
group holds ``-0.0`` entries beyond its N non-zeros is it packed by value and those signs are
lost (still ``torch.equal``). The checksum detects corruption; it is no signature.

Writes are atomic (temporary file in the target folder, fsync, ``os.replace``): a failed save
leaves the previous file, if any, untouched. :func:`load_packed` raises
:class:`PackedFormatError` (a ``ValueError``) naming the file and what is wrong for anything
that is not a valid version-1 file. It reads the whole file into memory once (tensors never
stay memory-mapped) and checks, in order: safetensors structure, header JSON, format and
version, every header entry, the set of tensors, each packed tensor's dtype and shape, every
stored position, then the checksum; only then does it unpack.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_open
from ..check import check
from ..engine.selection import PatternSpec, eligible_weights, qualified
from ..engine.sparse_module import sparse_states
from ..engine.sparse_weight import refresh_stale
from ..packing import (
    PackedWeight,
    index_width,
    pack,
    pack_positions,
    packed_shapes,
    unpack,
    unpack_positions,
)
from ..patterns import NM, OnTranspose
from ..patterns.grouping import LAYOUTS, from_groups, grouping_error, to_groups
from ..tables import format_table

FORMAT_NAME = "nmsparse-packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added the optional "transposed" entry field
HEADER_KEY = "nmsparse"
VALUES_SUFFIX = ".nm_values"
INDICES_SUFFIX = ".nm_indices"

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PackedFormatError", "PackedLayer", "PackedReport",
           "load_packed", "read_packed_header", "save_packed"]

# Same-size integer views: a weight's bit pattern (so -0.0 counts as non-zero, see _keep_mask).
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PackedFormatError(ValueError):
    """A file that is not a valid packed nmsparse file (truncated, corrupted, tampered)."""


@dataclass(frozen=True)
class PackedLayer:
    """One eligible weight: packed with ``pattern``, or kept dense (``pattern`` None, ``note``)."""

    name: str
    shape: tuple[int, ...]
    pattern: NM | None
    dense_bytes: int
    packed_bytes: int
    note: str = ""
    transposed: bool = False  # stored (in, out), packed as its transpose (Conv1D)

    @property
    def packed(self) -> bool:
        return self.pattern is not None


@dataclass
class PackedReport:
    """What :func:`save_packed` wrote. Byte counts are tensor data; ``file_bytes`` is the file."""

    path: str
    layers: list[PackedLayer] = field(default_factory=list)
    other_tensors: int = 0
    other_bytes: int = 0
    file_bytes: int = 0

    @property
    def packed_layers(self) -> list[PackedLayer]:
        return [layer for layer in self.layers if layer.packed]

    @property
    def dense_bytes(self) -> int:
        """Bytes of all tensors stored dense (the finalized state dict)."""
        return sum(layer.dense_bytes for layer in self.layers) + self.other_bytes

    @property
    def packed_bytes(self) -> int:
        """Bytes of all tensors as stored in the packed file (header excluded)."""
        return sum(layer.packed_bytes for layer in self.layers) + self.other_bytes

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def __str__(self) -> str:
        def ratio(packed: int, dense: int) -> str:
            return f"{packed / dense:.3f}" if dense else "-"

        rows = [[layer.name, "x".join(map(str, layer.shape)),
                 str(layer.pattern) if layer.packed else "dense", f"{layer.dense_bytes:,}",
                 f"{layer.packed_bytes:,}", ratio(layer.packed_bytes, layer.dense_bytes),
                 layer.note] for layer in self.layers]
        rows.append([f"(other tensors: {self.other_tensors})", "", "dense",
                     f"{self.other_bytes:,}", f"{self.other_bytes:,}",
                     ratio(self.other_bytes, self.other_bytes), ""])
        rows.append(["total", "", "", f"{self.dense_bytes:,}", f"{self.packed_bytes:,}",
                     ratio(self.packed_bytes, self.dense_bytes), ""])
        title = (f"nmsparse packed: {self.path}: {len(self.packed_layers)} of {len(self.layers)} "
                 f"eligible weights packed, file {self.file_bytes:,} bytes")
        return title + "\n" + format_table(
            ["weight", "shape", "pattern", "dense bytes", "packed bytes", "ratio", "note"], rows,
            right_aligned=(3, 4, 5))


# ---------------------------------------------------------------------------------- saving


def _finalized_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` as :func:`nmsparse.finalize` would leave it, model untouched."""
    states = [state for module in model.modules() for state in sparse_states(module).values()]
    refresh_stale(states)  # the masks a forward pass (and finalize) would use
    state = model.state_dict()
    # remove_duplicate=False: a module reachable under two prefixes has keys under both
    for prefix, module in model.named_modules(remove_duplicate=False):
        for param, sparse in sparse_states(module).items():
            weight_key = qualified(prefix, param)
            mask_key = qualified(prefix, sparse.mask_name)
            if weight_key in state and mask_key in state:
                # exactly what sparse_module.detach does: +0.0 at every pruned entry
                state[weight_key] = state[weight_key].masked_fill(~state.pop(mask_key), 0)
    return state


def _keep_mask(weight: torch.Tensor, nm: NM, layout: str) -> torch.Tensor | None:
    """An exactly-N-per-group mask covering every non-zero *bit pattern*, or None.

    Packing by value non-zeros would turn a kept ``-0.0`` into ``+0.0``; keeping every entry
    whose bits are non-zero makes the round trip bit-exact. Groups with fewer than N such
    entries are padded with their lowest-index remaining positions (``pack``'s own rule).
    None when -0.0 entries push a group over N: the caller then packs by value.
    """
    bits = weight.detach().view(_INT_VIEW[weight.element_size()]) != 0
    keep = to_groups(bits, nm.m, layout)
    counts = keep.sum(-1)
    if bool((counts > nm.n).any()):
        return None
    free = ~keep
    rank = free.to(torch.int32).cumsum(-1) - 1
    keep = keep | (free & (rank < (nm.n - counts).unsqueeze(-1)))
    return from_groups(keep, weight.shape, layout)


def _pack_exact(weight: torch.Tensor, nm: NM, layout: str) -> PackedWeight:
    mask = _keep_mask(weight, nm, layout)
    return pack(weight.detach(), nm.n, nm.m, layout, mask=mask)


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # an own contiguous CPU copy: safetensors refuses tensors sharing storage (tied weights)
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the raw bytes of ``tensors``, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _require_safetensors():
    try:
        import safetensors.torch
    except ImportError as error:  # an optional dependency (the "train" extra)
        raise ImportError("packed files need the safetensors package: "
                          "pip install safetensors") from error
    return safetensors


def save_packed(model: nn.Module, path: str | os.PathLike[str],
                pattern: PatternSpec | Mapping[str, PatternSpec], *,
                include: str | Sequence[str] | None = None,
                exclude: str | Sequence[str] | None = None, layout: str = "in",
                metadata: Mapping[str, Any] | None = None) -> PackedReport:
    """Write ``model`` to ``path`` as a packed file; the model is not modified.

    ``model`` is a live sparse model (from :func:`nmsparse.sparsify`: its masks are what is
    stored) or a finalized one (its non-zero pattern is). ``pattern`` / ``include`` /
    ``exclude`` select the layers to pack with the semantics of :func:`nmsparse.sparsify`
    (one ``"N:M"`` or ``{glob: "N:M" or None}``). A selected weight is packed when it
    passes :func:`nmsparse.check` with that pattern and ``layout``; one that does not (not
    divisible by M, more than N non-zeros in a group, not floating point) is stored dense
    and the report says why. ``metadata`` (a JSON-serialisable mapping, e.g. the
    architecture) is stored in the header. Everything is computed before the file is
    opened; the write is atomic. Raises ``ValueError`` for a model with nothing to pack or
    a non-tensor state-dict entry, ``FileNotFoundError`` when the folder does not exist.
    """
    safetensors = _require_safetensors()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # checked first: packing a large model takes a while
        raise FileNotFoundError(f"cannot write {path}: the folder {directory} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a folder; give a file path, e.g. "
                         f"{os.path.join(path, 'model.packed.safetensors')}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping (a JSON object), got "
                         f"{type(metadata).__name__}")
    try:
        user_metadata = json.loads(json.dumps(dict(metadata or {}), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from error
    if not any(True for _ in eligible_weights(model)):
        raise ValueError("the model has no layer nmsparse can pack "
                         "(nn.Linear, nn.Conv1d/2d/3d, nn.MultiheadAttention)")

    state = _finalized_state_dict(model)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a "
                             "tensor: a packed file stores tensors only")
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict entry {key!r} holds NaN or Inf: a diverged or "
                             "damaged model is not saved (check the run that produced it)")
    rows = check(model, pattern, include=include, exclude=exclude, layout=layout).rows

    report = PackedReport(path=path)
    packed: dict[str, PackedWeight] = {}
    transposed: set[str] = set()
    for row in rows:
        weight = state.get(row.name)
        if weight is None:  # a custom state_dict hook renamed or dropped it: nothing to pack
            continue
        dense_bytes = weight.numel() * weight.element_size()
        note = row.note
        nm, flipped = row.pattern, isinstance(row.pattern, OnTranspose)
        if flipped:  # a Conv1D weight (in, out): pack W.T, which is (out, in) N:M along in
            nm, weight = row.pattern.inner, weight.t()
        if nm is not None and not isinstance(nm, NM):
            note = f"pattern {nm} is not N:M: stored dense"
        elif row.status == "violation":
            note = (f"not {row.pattern}: {row.violating_groups}/{row.groups} groups keep more "
                    f"than {row.pattern.n} (up to {row.max_kept})")
        elif row.status == "ok" and not torch.is_floating_point(weight):
            note = f"dtype {weight.dtype} is not floating point"
        if row.status != "ok" or note:
            report.layers.append(PackedLayer(row.name, row.shape, None, dense_bytes,
                                             dense_bytes, note or "dense"))
            continue
        packed[row.name] = _pack_exact(weight, nm, "in" if flipped else layout)
        if flipped:
            transposed.add(row.name)
        report.layers.append(PackedLayer(row.name, row.shape, nm, dense_bytes,
                                         packed[row.name].nbytes, transposed=flipped))

    for key in packed:
        for name in (key + VALUES_SUFFIX, key + INDICES_SUFFIX):
            if name in state:
                raise ValueError(f"cannot pack {key!r}: the state dict already has a tensor "
                                 f"named {name!r}")
    layer_names = {layer.name for layer in report.layers}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in packed:
            tensors[key + VALUES_SUFFIX] = _cpu_copy(packed[key].values)
            tensors[key + INDICES_SUFFIX] = _cpu_copy(packed[key].indices)
            continue
        tensors[key] = _cpu_copy(value)
        if key not in layer_names:
            report.other_tensors += 1
            report.other_bytes += value.numel() * value.element_size()

    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "library": f"nmsparse {__version__}",
        "keys": list(state),
        "packed": {key: _entry(p, key in transposed) for key, p in packed.items()},
        "sha256": _digest(tensors),
        "metadata": user_metadata,
    }
    blob = safetensors.torch.save(
        tensors, metadata={HEADER_KEY: json.dumps(header, separators=(",", ":"))})
    with atomic_open(path, "wb") as file:
        file.write(blob)
    report.file_bytes = len(blob)
    return report


def _entry(p: PackedWeight, transposed: bool) -> dict[str, Any]:
    """The header entry of one packed weight (the module docstring)."""
    shape = list(p.shape)[::-1] if transposed else list(p.shape)
    entry = {"shape": shape, "dtype": _dtype_name(p.values.dtype), "n": p.n, "m": p.m,
             "layout": p.layout, "index_bits": index_width(p.m)}
    if transposed:
        entry["transposed"] = True
    return entry


def _matrix_shape(entry: Mapping[str, Any]) -> list[int]:
    """The shape that was packed: the stored shape, or its transpose for a Conv1D weight."""
    return entry["shape"][::-1] if entry.get("transposed") else entry["shape"]


# --------------------------------------------------------------------------------- loading

_ENTRY_FIELDS = ("shape", "dtype", "n", "m", "layout", "index_bits")
_HEADER_FIELDS = ("format", "version", "library", "keys", "packed", "sha256", "metadata")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(entry: Any, version: int) -> str | None:
    """Why a header entry of a packed weight is invalid, or None."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    optional = ("transposed",) if version >= 2 else ()
    if sorted(set(entry) - set(optional)) != sorted(_ENTRY_FIELDS):
        return (f"has fields {sorted(entry)}, expected {sorted(_ENTRY_FIELDS)}"
                + (f" and optionally {list(optional)}" if optional else ""))
    shape, dtype, n, m = entry["shape"], entry["dtype"], entry["n"], entry["m"]
    if (not isinstance(shape, list) or not 2 <= len(shape) <= 5
            or not all(_is_int(s) and s > 0 for s in shape)):
        return f"shape {shape!r} is not a list of 2 to 5 positive integers"
    if "transposed" in entry and (entry["transposed"] is not True
                                  or len(entry["shape"]) != 2 or entry["layout"] != "in"):
        return ("has 'transposed' but is not a 2-D weight with layout 'in' (transposed must "
                "be true, or absent)")
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        return f"dtype {dtype!r} is not a torch floating-point dtype name"
    if not (_is_int(n) and _is_int(m)):
        return f"n={n!r}, m={m!r} are not integers"
    try:
        NM(n, m)
        width = index_width(m)
    except ValueError as error:
        return str(error)
    if entry["layout"] not in LAYOUTS:
        return f"layout {entry['layout']!r} is not one of {list(LAYOUTS)}"
    error = grouping_error(tuple(_matrix_shape(entry)), m, entry["layout"])
    if error:
        return error
    if entry["index_bits"] != width:
        return f"index_bits={entry['index_bits']!r} but M={m} is stored in {width} bits"
    return None


def _parse_header(path: str, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """The validated JSON header of a packed file."""
    if not metadata or HEADER_KEY not in metadata:
        raise PackedFormatError(f"{path}: not a packed nmsparse file: the safetensors metadata "
                                f"has no {HEADER_KEY!r} entry (a plain safetensors file? load "
                                "it with safetensors.torch.load_file)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise PackedFormatError(f"{path}: the {HEADER_KEY!r} header is not valid JSON: "
                                f"{error}") from error
    if not isinstance(header, dict):
        raise PackedFormatError(f"{path}: the {HEADER_KEY!r} header is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise PackedFormatError(f"{path}: format is {header.get('format')!r}, expected "
                                f"{FORMAT_NAME!r}")
    version = header.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise PackedFormatError(f"{path}: packed format version {version!r} is not supported: "
                                f"this nmsparse ({__version__}) reads versions {readable}")
    if sorted(header) != sorted(_HEADER_FIELDS):
        raise PackedFormatError(f"{path}: header has fields {sorted(header)}, version "
                                f"{FORMAT_VERSION} has {sorted(_HEADER_FIELDS)}")
    keys, packed = header["keys"], header["packed"]
    if (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
            or len(set(keys)) != len(keys)):
        raise PackedFormatError(f"{path}: header 'keys' is not a list of distinct strings")
    if not isinstance(packed, dict):
        raise PackedFormatError(f"{path}: header 'packed' is not a JSON object")
    known = set(keys)
    for key, entry in packed.items():
        if key not in known:
            raise PackedFormatError(f"{path}: packed weight {key!r} is not in the header's "
                                    "'keys'")
        error = _check_entry(entry, version)
        if error:
            raise PackedFormatError(f"{path}: header entry of packed weight {key!r} {error}")
    digest = header["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise PackedFormatError(f"{path}: header 'sha256' is not a sha256 hex digest")
    if not isinstance(header["metadata"], dict):
        raise PackedFormatError(f"{path}: header 'metadata' is not a JSON object")
    return header


def _unreadable(path: str, error: Exception) -> PackedFormatError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return PackedFormatError(f"{path}: not a readable safetensors file: {reason}")


def _a_file(path: str | os.PathLike[str]) -> str:
    """``path`` as a string; a folder is a one-line error (not a raw IsADirectoryError)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise PackedFormatError(f"{path} is a folder, not a packed file; give the file's path "
                                "(nmsparse export --packed writes model.packed.safetensors "
                                "into its folder)")
    return path


def _read(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(path, validated header, tensors)`` from one read of the whole file.

    Not ``safe_open``: its tensors stay memory-mapped, so a file changed after validation
    would be used unvalidated, and one truncated later would crash the process (SIGBUS)
    when a tensor is touched. Tensors made from the bytes own their memory.
    """
    safetensors = _require_safetensors()
    path = _a_file(path)
    with open(path, "rb") as file:  # a missing or unreadable file: the usual OSError
        data = file.read()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors' own error (truncated, garbled header, ...)
        raise _unreadable(path, error) from error
    # safetensors accepted the file, so its 8-byte little-endian length and JSON header are
    # sound; the library has no call that returns the metadata of in-memory bytes.
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length]).get("__metadata__")
    return path, _parse_header(path, metadata), tensors


def _read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated header alone (``safe_open`` reads no tensor data)."""
    _require_safetensors()
    from safetensors import safe_open

    path = _a_file(path)
    with open(path, "rb"):  # a missing or unreadable file: the usual OSError
        pass
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
    except Exception as error:
        raise _unreadable(path, error) from error
    return _parse_header(path, metadata)


def _check_tensors(path: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Everything the header implies about the tensors, before any is unpacked."""
    packed = header["packed"]
    declared = {}
    for key in header["keys"]:
        if key in packed:
            declared[key + VALUES_SUFFIX] = f" (values of packed weight {key!r})"
            declared[key + INDICES_SUFFIX] = f" (indices of packed weight {key!r})"
        else:
            declared[key] = ""
    missing = [name for name in declared if name not in tensors]
    if missing:
        raise PackedFormatError(f"{path}: missing tensor {missing[0]!r}{declared[missing[0]]}"
                                + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(tensors) - set(declared))
    if extra:
        raise PackedFormatError(f"{path}: tensor {extra[0]!r} is not declared in the header"
                                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key, entry in packed.items():
        n, m = entry["n"], entry["m"]
        values_shape, indices_shape = packed_shapes(_matrix_shape(entry), n, m,
                                                     entry["layout"])
        implied = (f"the header (shape {entry['shape']}, {n}:{m}, layout {entry['layout']!r}, "
                   f"{entry['dtype']})")
        for suffix, dtype, shape in ((VALUES_SUFFIX, entry["dtype"], values_shape),
                                     (INDICES_SUFFIX, "uint8", indices_shape)):
            tensor = tensors[key + suffix]
            found = (_dtype_name(tensor.dtype), tuple(tensor.shape))
            if found != (dtype, shape):
                raise PackedFormatError(
                    f"{path}: packed weight {key!r}: {key}{suffix} is {found[0]} of shape "
                    f"{found[1]}, but {implied} implies {dtype} of shape {shape}")
        _check_positions(path, key, tensors[key + INDICES_SUFFIX], n, m, values_shape[1])


def _check_positions(path: str, key: str, indices: torch.Tensor, n: int, m: int,
                     count: int) -> None:
    """Every stored position < M, strictly ascending in its group, padding bits zero."""
    positions = unpack_positions(indices, m, count)
    where = f"{path}: packed weight {key!r}: corrupted indices:"
    bad = (positions >= m).nonzero()
    if len(bad):
        row, j = bad[0].tolist()
        raise PackedFormatError(f"{where} row {row}, group {j // n} stores position "
                                f"{int(positions[row, j])}, not < M={m}")
    grouped = positions.view(positions.shape[0], -1, n)
    bad = (grouped.diff(dim=-1) <= 0).nonzero()
    if len(bad):
        row, group, i = bad[0].tolist()
        raise PackedFormatError(f"{where} row {row}, group {group} stores positions "
                                f"{grouped[row, group].tolist()}, not strictly ascending")
    if not torch.equal(pack_positions(positions, m), indices):
        raise PackedFormatError(f"{where} padding bits after the last position of a row are "
                                "not zero")


def read_packed_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON header of a packed file (format, keys, packed entries, metadata).

    Reads no tensor data: use :func:`load_packed` to validate and load the weights.
    """
    return _read_header(path)


def load_packed(path: str | os.PathLike[str], model: nn.Module | None = None, *,
                strict: bool = True) -> dict[str, torch.Tensor] | nn.Module:
    """Read a file written by :func:`save_packed`, validating all of it.

    Returns the finalized dense ``state_dict`` (original keys and order, CPU tensors, pruned
    entries zero), or, with ``model`` (a plain instance of the architecture, not sparsified),
    loads it with ``model.load_state_dict(state, strict=strict)`` and returns the model.
    Raises :class:`PackedFormatError` naming the file and the defect for a truncated or
    corrupted file, another format or version, a header that does not match the tensors or
    an out-of-range index; ``OSError`` when the file cannot be opened.
    """
    path, header, tensors = _read(path)
    _check_tensors(path, header, tensors)
    if _digest(tensors) != header["sha256"]:
        raise PackedFormatError(f"{path}: the tensor data does not match the header's sha256 "
                                "checksum: the file is corrupted")
    state: dict[str, torch.Tensor] = {}
    for key in header["keys"]:
        entry = header["packed"].get(key)
        if entry is None:
            state[key] = tensors[key]
            continue
        weight = unpack(PackedWeight(tensors[key + VALUES_SUFFIX],
                                     tensors[key + INDICES_SUFFIX], entry["n"], entry["m"],
                                     tuple(_matrix_shape(entry)), entry["layout"]))
        state[key] = weight.t().contiguous() if entry.get("transposed") else weight
    if model is None:
        return state
    if any(sparse_states(module) for module in model.modules()):
        raise ValueError("load_packed loads into a plain (unsparsified) model, but this one has "
                         "live nmsparse masks: pass a fresh instance of the architecture or "
                         "call nmsparse.finalize(model) first")
    model.load_state_dict(state, strict=strict)
    return model
