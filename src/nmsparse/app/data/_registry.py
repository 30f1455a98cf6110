"""The dataset registry: one small module per dataset registers a loader under its name.

A loader takes the validated :class:`LoadOptions` and returns a
:class:`~nmsparse.app.data.DataBundle`. ``takes`` says which of ``data_dir`` / ``text_file`` it
reads, so that an option given to a dataset that would ignore it is reported rather than
silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...registry import Registry
from ._base import DataBundle, DataError


@dataclass(frozen=True)
class LoadOptions:
    data_dir: Path | None
    text_file: Path | None
    seq_len: int
    augment: bool
    seed: int


Loader = Callable[[LoadOptions], DataBundle]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    load: Loader
    takes: frozenset[str]


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


REGISTRY: Registry[DatasetSpec] = Registry("dataset", normalize=_canonical, error=DataError)


def register(
    name: str, description: str, *, takes: tuple[str, ...] = ("data_dir",)
) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn`` as the loader of dataset ``name``."""
    unknown = set(takes) - {"data_dir", "text_file"}
    if unknown:
        raise ValueError(f"takes may name data_dir and text_file, not {sorted(unknown)}")

    def decorate(fn: Loader) -> Loader:
        REGISTRY.add(name, DatasetSpec(name, description, fn, frozenset(takes)), where=fn)
        return fn

    return decorate


def canonical_name(name: object) -> str:
    """``"Fashion_MNIST"`` -> ``"fashion-mnist"``; unknown names raise DataError."""
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    key = REGISTRY.key(name)
    if key not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(REGISTRY.names())}")
    return key


def as_path(value: object, what: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise DataError(f"{what} must be a non-empty path string, got {value!r}")
    return Path(value).expanduser()


def existing_dir(path: Path, dataset: str, expected: str, hint: str = "") -> Path:
    """``path`` if it is a directory, else a DataError saying what was expected there."""
    if not path.exists():
        problem = "does not exist"
    elif not path.is_dir():
        problem = "is not a directory"
    else:
        return path
    raise DataError(f"{dataset}: data directory {path} {problem}; expected {expected}{hint}")
