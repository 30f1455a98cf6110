"""Load pickles that should hold only data (dicts, lists, bytes, numbers, numpy arrays).

A pickle can name any importable callable and have it called while loading (``os.system`` is
the classic example), so an ordinary ``pickle.load`` of a downloaded file runs whatever the file
says. This unpickler resolves only the few globals that rebuilding numpy arrays needs; anything
else is refused before it is imported, let alone called.

Allowed globals, each a pure constructor:

* ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``: how numpy arrays
  pickle at protocols 0-4 (also under numpy 2's ``numpy._core`` name);
* ``numpy.core.numeric._frombuffer``: the protocol-5 form of the same;
* ``numpy.core.multiarray.scalar``: numpy scalars;
* ``_codecs.encode``: how Python 3 writes ``bytes`` at protocols 0-2.

Dicts, lists, tuples, strings, bytes and numbers need no global at all. Persistent ids (which
``torch.save`` uses) are refused too, by the default ``persistent_load``.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing was imported or called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"global {module}.{name} is not allowed")
        self.module, self.name = module, name


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 keeps these in numpy._core; numpy.core is a deprecated alias
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only the allow-list above."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(module, name) from None


def loads(data: bytes, *, encoding: str = "bytes") -> Any:
    """Restricted ``pickle.loads``. ``encoding="bytes"`` keeps Python 2 ``str`` (as in the
    original CIFAR batches) as ``bytes``, which is what numpy arrays pickled by Python 2 need."""
    return load(io.BytesIO(data), encoding=encoding)


def load(file: BinaryIO, *, encoding: str = "bytes") -> Any:
    return RestrictedUnpickler(file, encoding=encoding).load()


def load_path(path: Path, *, encoding: str = "bytes") -> Any:
    with open(path, "rb") as f:
        return load(f, encoding=encoding)
