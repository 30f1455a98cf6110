"""Compile ``nm_linear.cpp`` once per machine and load it with ctypes.

The shared library is built on first use with the system C++ compiler (``$CXX``, else ``g++``,
else ``c++``; flags ``-O3 -mavx2 -mfma -fopenmp``) into a per-user cache folder
(``$NMSPARSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/nmsparse``, else ``~/.cache/nmsparse``),
named by a hash of the source, the flags and the compiler's version: a changed source gets a
new file, an unchanged one is compiled once. The compiler writes a temporary file in that
folder which is then renamed into place (``os.replace`` is atomic), so processes that build
at the same time never load a half-written library. Nothing from torch is compiled (no torch
headers: a few seconds, not a minute) and nothing is built at package-install time.

:func:`load` returns the loaded library or raises :class:`BuildError` saying why it cannot
(no AVX2/FMA, no compiler, a compile error); the caller decides what to do with that.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("nm_linear.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ABI = 1  # must equal nmsparse_cpu_abi() in the source
ENV_CACHE = "NMSPARSE_CACHE_DIR"


class BuildError(RuntimeError):
    """The CPU kernels cannot be built or loaded on this machine (the message says why)."""


def cpu_supports_avx2_fma() -> bool:
    """Whether this CPU runs AVX2 + FMA code, as PyTorch's own dispatcher sees it."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    return capability.startswith(("AVX2", "AVX512"))


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmsparse"


def _compiler_version(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"the C++ compiler {cxx} does not run: {error}") from None
    return done.stdout.splitlines()[0] if done.stdout else ""


def library_path(cxx: str) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_version(cxx).encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"nm_linear_cpu-{digest.hexdigest()[:16]}.so"


def _compile(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so",
                                         dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise BuildError(f"compiling {SOURCE.name} with {cxx} failed: {message}")
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"compiling {SOURCE.name} with {cxx} failed: {error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load() -> ctypes.CDLL:
    """Build (if not cached) and load the kernels; :class:`BuildError` if impossible."""
    if not cpu_supports_avx2_fma():
        raise BuildError("this CPU has no AVX2/FMA")
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    target = library_path(cxx)
    if not target.exists():
        _compile(cxx, target)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        raise BuildError(f"cannot load {target}: {error}") from None
    if library.nmsparse_cpu_abi() != ABI:
        raise BuildError(f"{target} has ABI {library.nmsparse_cpu_abi()}, expected {ABI}")
    function = library.nmsparse_nm_linear
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, i64, i64, i64, ctypes.c_int,
                         ctypes.c_int, ptr, ptr, ctypes.c_int]
    function.restype = ctypes.c_int
    return library
