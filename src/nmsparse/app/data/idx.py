"""A reader for the IDX format of MNIST and Fashion-MNIST, gzipped or not, with numpy only.

IDX: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``d``, then
``d`` big-endian uint32 sizes, then the values in C order. Every check (magic number, header,
exact payload size) is made before any value is used, and each failure is a one-line
:class:`~nmsparse.app.data.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ._base import DataError

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupted or truncated gzip data ({exc})") from exc


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a (read-only) numpy array in native byte order."""
    if len(raw) < 4:
        raise DataError(
            f"{path}: truncated IDX file: {len(raw)} bytes, shorter than its 4-byte magic"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{raw[:4].hex()}; expected 0x0000, a type "
            "code (08 for uint8) and the number of dimensions, e.g. 0x00000803 for images"
        )
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated IDX file: {len(raw)} bytes, shorter than its {header}-byte header"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(shape)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "corrupted (trailing bytes)"
        raise DataError(
            f"{path}: {what} IDX file: {len(raw)} bytes, expected {expected} for shape "
            f"{'x'.join(map(str, shape))} of {dtype.name}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array; DataError on any problem."""
    return parse_idx(read_bytes(path), path)
