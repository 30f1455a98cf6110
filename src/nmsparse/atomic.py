"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A crash (even SIGKILL) leaves either the old file or the new one, never half of one (plus,
at worst, the temporary file ``.NAME.XXXX.tmp``, which a run folder removes when it is claimed
again). The new file gets the permissions of the user's umask (``mkstemp`` alone would make it
0600), and replacing a symbolic link replaces the link, never the file it points to.
:func:`write_files` writes several files all or nothing (a run's checkpoint, its
``config.json`` and report): a full disk leaves none of them, and the error names the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO


def _umask() -> int:
    try:  # Linux reports it without changing it (thread-safe)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_temp(fd: int, mode: str, **kwargs) -> IO:
    """The file object every atomic write goes through (a test makes it fail as a full disk
    would)."""
    return os.fdopen(fd, mode, **kwargs)


def _naming(error: OSError, path: str, tmp: str | None = None) -> OSError:
    """``error`` naming ``path`` when it names no file (a failed write names none) or only the
    temporary file ``tmp``."""
    if error.errno and error.strerror and error.filename in (None, tmp):
        return OSError(error.errno, error.strerror, path)
    return error


@contextlib.contextmanager
def _staged(path: str, mode: str, **kwargs) -> Iterator[tuple[IO, str]]:
    """``(file, temporary path)``: the file is flushed to disk when the block ends; the
    temporary file is removed if the block fails. Nothing replaces ``path`` yet."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with _open_temp(fd, mode, **kwargs) as file:
            yield file, tmp
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _naming(error, path, tmp) from error
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only if the block succeeds."""
    path = os.fspath(path)
    with _staged(path, mode, **kwargs) as (file, tmp):
        yield file
    try:
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _naming(error, path, tmp) from error


Content = bytes | Callable[[str], None]


def write_files(folder: str | os.PathLike[str], files: Mapping[str, Content]) -> list[Path]:
    """Write ``{name: bytes, or a callable writing the file at the path it is given}`` into
    ``folder``, all or nothing: every file is staged and flushed to disk first, and only then
    are they renamed into place, in the given order (put the file that marks the whole as
    complete last). A failure (a full disk) removes what was staged and leaves the folder as
    it was; its error names the file."""
    staged: list[tuple[str, str]] = []
    try:
        for name, content in files.items():
            target = os.path.join(os.fspath(folder), name)
            if callable(content):
                with _staged(target, "wb") as (_, tmp):
                    pass
                staged.append((tmp, target))
                try:
                    content(tmp)
                except OSError as error:
                    raise _naming(error, target, tmp) from error
            else:
                with _staged(target, "wb") as (file, tmp):
                    file.write(content)
                staged.append((tmp, target))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for tmp, target in staged:
        os.replace(tmp, target)
    return [Path(target) for _, target in staged]
