"""Compile the CPU kernels once per machine and load them with ctypes.

One shared library per instruction set, each from its own translation units with its own
flags, so that no AVX-512 instruction can leak into the code an AVX2-only CPU runs:

* ``avx2``: ``nm_linear.cpp`` with ``-mavx2 -mfma`` (also exports the CPU feature probe);
* ``avx512``: ``nm_linear_avx512.cpp``, ``nm_linear_bf16_avx512.cpp``,
  ``nm_prepacked_avx512.cpp`` and ``nm_amx_avx512.cpp`` with AVX-512 F/BW/VL/DQ; its bf16
  kernels carry a ``target("avx512bf16,avx512vbmi2,avx512vbmi")`` attribute and run only where
  the probe says so, its AMX functions an ``amx-tile,amx-bf16`` one;
* ``mask_avx2`` / ``mask_avx512``: ``nm_mask.cpp`` (the per-step mask pass of sparse training,
  :mod:`.mask_pass`) built with the same two sets of flags;
* ``amx_emulated``: the ``avx512`` units again with ``NMSPARSE_AMX_EMULATE``, whose AMX tile
  operations are C++ (``nm_amx_avx512.h``), so that the AMX kernel's tiling is tested on CPUs
  without AMX (the tests build it; the dispatcher never uses it).

The sources share the headers in this folder (``*.h``), which count in every library's hash.
A library of several units compiles them in parallel (one compiler per CPU, at most one per
unit) and links the objects: the AVX-512 library takes about half the time of one unit on
two cores.

Each library is built on first use with the system C++ compiler (``$CXX``, else ``g++``, else
``c++``) into a per-user cache folder (``$NMSPARSE_CACHE_DIR``, else
``$XDG_CACHE_HOME/nmsparse``, else ``~/.cache/nmsparse``), named by a hash of the sources and
the flags: a changed source gets a new file, an unchanged one is compiled once. The flags are
fixed per instruction set (no ``-march=native``), so one file serves every CPU with that set,
and a folder built ahead (``python -m nmsparse.kernels.cpu``, e.g. in a container image)
loads where no compiler is installed. A build says so once, as a warning on the
``nmsparse.kernels.cpu`` logger, since it stalls the first call for seconds. Builds run under
a file lock in that folder (``fcntl.flock``; where there is no ``fcntl`` the atomic rename
below still keeps a half-written file from being loaded), so processes starting together
compile once and the others wait and load the result; the linker writes a temporary file
that is renamed into place (``os.replace`` is atomic). After a build, the older builds of the
same library (other hashes) are deleted. Nothing from torch is compiled (no torch headers:
seconds, not a minute).

:func:`load` returns the loaded library or raises :class:`BuildError` saying why it cannot:
no compiler, a compile error, and *any* ``OSError`` on the way (a cache folder that cannot be
created, a read-only or missing home, a file in the way); the caller falls back.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c++17")
AVX2_FLAGS = ("-mavx2", "-mfma")
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mbmi2")
# The AVX-512 library's units, the longest to compile first (about 8 s, 7, 2 and 1 with g++
# 12 -O3 on a Zen 4 core): two compilers finish them in about the time of the first two.
AVX512_UNITS = ("nm_linear_bf16_avx512.cpp", "nm_prepacked_avx512.cpp", "nm_linear_avx512.cpp",
                "nm_amx_avx512.cpp")
# library -> (its sources, its flags, the cache file's name before the hash)
LIBRARIES = {
    "avx2": (("nm_linear.cpp",), AVX2_FLAGS, "nm_linear_avx2"),
    "avx512": (AVX512_UNITS, AVX512_FLAGS, "nm_linear_avx512"),
    "mask_avx2": (("nm_mask.cpp",), AVX2_FLAGS, "nm_mask_avx2"),
    "mask_avx512": (("nm_mask.cpp",), AVX512_FLAGS, "nm_mask_avx512"),
    "amx_emulated": (AVX512_UNITS, (*AVX512_FLAGS, "-DNMSPARSE_AMX_EMULATE"),
                     "nm_linear_avx512_amx_emulated"),
}
ABI = 5  # must equal NMSPARSE_CPU_ABI in nm_common.h (every library exports it)
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# function -> (argument types, result type), set on every library that exports it
SIGNATURES = {
    "nmsparse_nm_linear": ([_PTR, _INT, _I64, _I64, _PTR, _INT, _PTR, _I64, _I64, _I64, _INT,
                            _INT, _PTR, _PTR, _INT, _INT], _INT),
    "nmsparse_unpack": ([_PTR, _INT, _PTR, _I64, _I64, _INT, _INT, _I64, _I64, _I64, _PTR, _INT,
                         _INT], _INT),
    "nmsparse_lanes_bytes": ([_I64, _I64, _INT, _INT], _I64),
    "nmsparse_lanes_check": ([_PTR, _I64, _I64, _I64, _I64, _INT, _INT], _INT),
    "nmsparse_lanes_dense": ([_PTR, _I64, _I64, _INT, _INT, _I64, _I64, _PTR, _INT], _INT),
    "nmsparse_lanes_pack": ([_PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT, _PTR], _INT),
    "nmsparse_lanes_unpack": ([_PTR, _I64, _I64, _I64, _I64, _INT, _INT, _PTR, _PTR], _INT),
    "nmsparse_lanes_linear": ([_PTR, _I64, _I64, _PTR, _I64, _INT, _INT, _PTR, _PTR, _INT], _INT),
    "nmsparse_amx_emulated": ([], _INT),
    "nmsparse_amx_request": ([], _INT),
    "nmsparse_amx_selftest": ([_INT], _INT),
    "nmsparse_amx_linear": ([_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _INT, _INT, _PTR,
                             _PTR, _INT], _INT),
    "nmsparse_amx_lanes_linear": ([_PTR, _I64, _I64, _PTR, _I64, _INT, _INT, _PTR, _PTR, _INT],
                                  _INT),
    "nmsparse_mask_refresh": ([_PTR, _INT, _PTR, _PTR, _I64, _INT, _INT, _I64, _INT, _PTR], _INT),
    "nmsparse_mask_fixed": ([_PTR, _INT, _PTR, _PTR, _I64, _INT, _PTR], _INT),
    "nmsparse_mask_decay": ([_PTR, _PTR, _PTR, ctypes.c_float, _I64, _INT], _INT),
}
ENV_CACHE = "NMSPARSE_CACHE_DIR"
LOCK_NAME = "build.lock"
# A temporary file this old was left by a build that died (builds take seconds).
STALE_TEMPORARY_S = 600
LOG = logging.getLogger("nmsparse.kernels.cpu")


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
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError as error:  # no HOME and no password entry
            raise BuildError(f"no cache folder for the CPU kernels ({error}); set "
                             f"{ENV_CACHE}") from None
    return Path(base) / "nmsparse"


def _flags(name: str) -> tuple[str, ...]:
    return (*COMMON_FLAGS, *LIBRARIES[name][1])


def library_path(name: str = "avx2") -> Path:
    """Where ``name``'s library is cached: named by its sources, the headers and its flags, not
    by the compiler, so that a folder built ahead loads where no compiler is installed."""
    digest = hashlib.sha256()
    sources = [(HERE / source).read_bytes() for source in LIBRARIES[name][0]]
    headers = [header.read_bytes() for header in sorted(HERE.glob("*.h"))]
    for part in (*sources, *headers, " ".join(_flags(name)).encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"{LIBRARIES[name][2]}-{digest.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s lock file (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone
        yield
        return
    with open(folder / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_compiler(command: list[str], source: str, cxx: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.SubprocessError as error:
        raise BuildError(f"compiling {source} with {cxx} failed: {error}") from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BuildError(f"compiling {source} with {cxx} failed: {message}")


def _compile(cxx: str, name: str, target: Path) -> None:
    """Compile ``name``'s units in parallel into a temporary folder beside ``target``, link
    them into a temporary file there and rename it into place."""
    sources = LIBRARIES[name][0]
    flags = _flags(name)
    workers = max(1, min(len(sources), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix=target.stem + ".", suffix=".tmp",
                                     dir=target.parent) as folder:
        objects = [str(Path(folder) / f"{Path(source).stem}.o") for source in sources]
        with ThreadPoolExecutor(workers) as pool:  # the compilers are processes
            for done in [pool.submit(_run_compiler, [cxx, *flags, "-c", str(HERE / source),
                                                     "-o", obj], source, cxx)
                         for source, obj in zip(sources, objects, strict=True)]:
                done.result()
        temporary = str(Path(folder) / target.name)
        _run_compiler([cxx, *flags, "-shared", *objects, "-o", temporary],
                      f"(linking) {' '.join(sources)}", cxx)
        os.replace(temporary, target)


def remove_stale(target: Path, name: str) -> list[Path]:
    """Delete the other builds of ``name``'s library in ``target``'s folder, and temporary files
    of builds that died; returns what was deleted. (A process that still has an old build loaded
    keeps its mapping: unlinking a loaded library is safe.)"""
    removed = []
    now = time.time()
    for path in target.parent.glob(f"{LIBRARIES[name][2]}-*"):
        # a build's folder of objects (".tmp"), or its library before the rename (".tmp.so":
        # builds before the units were compiled apart)
        temporary = path.name.endswith((".tmp", ".tmp.so"))
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if path == target or (temporary and now - path.stat().st_mtime < STALE_TEMPORARY_S):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if name == "avx2":  # builds of nmsparse <= 0.x, named before there was more than one ISA
        for path in target.parent.glob("nm_linear_cpu-*.so"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _load(name: str) -> ctypes.CDLL:
    if name not in LIBRARIES:
        raise BuildError(f"unknown CPU kernel library {name!r}; known: {', '.join(LIBRARIES)}")
    if not cpu_supports_avx2_fma():
        raise BuildError("this CPU has no AVX2/FMA")
    target = library_path(name)
    if not target.exists():
        cxx = compiler()
        if cxx is None:
            raise BuildError("no C++ compiler found (set CXX, or install g++)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(target.parent):
            if not target.exists():  # another process may have built it while we waited
                LOG.warning("nmsparse: compiling the %s CPU kernels into %s, once per version "
                            "(seconds; `python -m nmsparse.kernels.cpu` builds them ahead)",
                            name, target.parent)
                _compile(cxx, name, target)
                remove_stale(target, name)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        raise BuildError(f"cannot load {target}: {error}") from None
    if library.nmsparse_cpu_abi() != ABI:
        raise BuildError(f"{target} has ABI {library.nmsparse_cpu_abi()}, expected {ABI}")
    for symbol, (argtypes, restype) in SIGNATURES.items():
        if hasattr(library, symbol):
            function = getattr(library, symbol)
            function.argtypes, function.restype = argtypes, restype
    return library


def load(name: str = "avx2") -> ctypes.CDLL:
    """Build (if not cached) and load ``name``'s kernels; :class:`BuildError` if impossible."""
    try:
        return _load(name)
    except OSError as error:  # any file-system failure: the caller falls back, exactly
        raise BuildError(f"cannot build the CPU kernels in {_where()}: {error}") from None


def _where() -> str:
    try:
        return str(cache_dir())
    except BuildError:
        return "(no cache folder)"
