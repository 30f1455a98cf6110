"""Folders nmsparse writes into (a training run's ``--out``, an export's ``--out``), claimed
for one process at a time.

* **Ownership.** A folder nmsparse writes into holds a marker file, ``.nmsparse``, naming what
  it is (a run or an export). nmsparse writes into a new folder, an empty one, or one whose
  marker says it is of the same kind; a non-empty folder without the marker holds the user's
  own files and is refused, so nothing of theirs is ever overwritten. (A run folder written
  before markers existed, recognised by its ``config.json`` and ``latest.pt``, is adopted.)
* **Exclusive use.** The claiming process holds an exclusive ``flock`` on the marker until it
  ends (the kernel drops it even after SIGKILL), so a second process writing into the same
  folder is refused while the first runs.
* **No links.** A folder holding a symbolic link is refused: nmsparse never writes (or reads
  a run) through a link planted inside it. Files are written with ``O_NOFOLLOW`` or replaced
  atomically, which replaces a link rather than following it.
* **Interrupted writes.** The temporary files of atomic writes (``.NAME.XXXX.tmp``) that a
  killed process left behind are removed when the folder is claimed again.

New files and folders get the usual permissions of the user's umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, the other rules still hold
    fcntl = None

MARKER = ".nmsparse"
KINDS = ("run", "export")
TEMP_FILE = re.compile(r"^\..+\.tmp$")
LATEST = "latest.pt"  # a run's checkpoint: its presence makes the folder hold a run
_LEGACY_RUN = ("config.json", LATEST)


class RunFolderError(ValueError):
    """A folder nmsparse may not write into (foreign files, a link, in use)."""


@dataclass
class ClaimedFolder:
    """A folder held for writing; ``release()`` (or process exit) frees it."""

    path: Path
    kind: str
    removed_temp_files: list[str] = field(default_factory=list)
    created: bool = False
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def abandon(self) -> None:
        """Release, and remove the folder again if this claim created it and nothing but
        the marker was written (a failed export leaves no empty folder behind)."""
        self.release()
        if not self.created:
            return
        with contextlib.suppress(OSError):
            if {entry.name for entry in _entries(self.path)} <= {MARKER}:
                (self.path / MARKER).unlink(missing_ok=True)
                self.path.rmdir()


def _entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as scan:
        return list(scan)


def _read_marker(path: Path) -> dict:
    try:
        fd = os.open(path / MARKER, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, encoding="utf-8") as file:
            marker = json.loads(file.read() or "{}")
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _check_entries(path: Path, kind: str) -> bool:
    """Refuse links and foreign files; return whether the folder is already ours."""
    entries = _entries(path)
    for entry in entries:
        if entry.is_symlink():
            raise RunFolderError(f"{str(path)!r} holds a symbolic link {entry.name!r}; "
                                 "nmsparse does not write through links in its folders: "
                                 "remove the link or choose another --out")
    names = {entry.name for entry in entries}
    if MARKER in names:
        marker = _read_marker(path)
        if marker.get("kind", kind) != kind:
            raise RunFolderError(f"{str(path)!r} is an nmsparse {marker.get('kind')} folder, "
                                 f"not {'an' if kind == 'export' else 'a'} {kind} folder; "
                                 "choose another --out")
        return True
    if kind == "run" and all(name in names for name in _LEGACY_RUN):
        return True  # a run written before markers existed
    if names:
        shown = ", ".join(repr(name) for name in sorted(names)[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise RunFolderError(f"{str(path)!r} already holds files nmsparse did not write "
                             f"({shown}{more}); nmsparse writes only into a new or empty "
                             "folder or one of its own: choose another --out")
    return False


def _lock(path: Path, kind: str) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path / MARKER, flags, 0o666)
    except OSError as error:
        raise RunFolderError(f"cannot claim {str(path)!r}: {error.strerror}") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_marker(path).get("pid", "?")
            os.close(fd)
            raise RunFolderError(f"{str(path)!r} is in use by another nmsparse process (pid "
                                 f"{holder}); wait for it to end or choose another "
                                 "--out") from None
    marker = json.dumps({"written_by": "nmsparse", "kind": kind, "pid": os.getpid()})
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (marker + "\n").encode())
    return fd


def claim(path: str | os.PathLike[str], kind: str, *, resume: bool = False) -> ClaimedFolder:
    """Create or check ``path`` and hold it for this process (see the module docstring): the
    one gate of every folder nmsparse writes (``train``, ``prune`` and ``export --out``). A
    ``run`` folder must hold a run (``latest.pt``) when ``resume`` is true and must not hold
    one otherwise."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not os.fspath(path).strip():
        raise RunFolderError("--out is empty; give the folder to write into (nmsparse never "
                             "writes into the current folder for an empty name)")
    path = Path(path)
    if resume and not (path / LATEST).is_file():  # checked before anything is created
        raise RunFolderError(f"--resume {str(path)!r}: the folder holds no run (no {LATEST})")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {str(path)!r} exists and is not a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create the folder {str(path)!r}: "
                             f"{error.strerror}") from None
    _check_entries(path, kind)
    fd = _lock(path, kind)
    claimed = ClaimedFolder(path, kind, created=created, _fd=fd)
    try:
        has_run = kind == "run" and (path / LATEST).is_file()
        if resume and not has_run:  # removed while we claimed it
            raise RunFolderError(f"--resume {str(path)!r}: the folder holds no run (no "
                                 f"{LATEST})")
        if kind == "run" and not resume and has_run:
            raise RunFolderError(f"{str(path)!r} already holds a run; continue it with "
                                 "--resume or choose another --out")
    except BaseException:
        claimed.release()
        raise
    # Only now, holding the lock, is it safe to delete what an interrupted writer left.
    for entry in _entries(path):
        if TEMP_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            claimed.removed_temp_files.append(entry.name)
    return claimed


def append_text(path: Path, text: str) -> None:
    """Append to a file in a claimed folder without following a link planted there."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as file:
        file.write(text)
