"""The loaded kernel libraries and what this CPU runs, found once per process: the state every
other module of :mod:`nmsparse.kernels.cpu` asks (tests replace ``_STATE`` to pretend another
CPU)."""

from __future__ import annotations

import ctypes
import os
import threading

from ._build import BuildError, load

ISAS = ("avx2", "avx512", "avx512bf16")  # lowest first
ENV_ISA = "NMSPARSE_CPU_ISA"
LIBRARY_OF = {"avx2": "avx2", "avx512": "avx512", "avx512bf16": "avx512"}
_FEATURE_BITS = {"avx2": 1, "avx512": 2, "avx512bf16": 4, "amx": 8}
_LOCK = threading.Lock()
# library name -> CDLL, or "error:<name>" -> message; and what was found once about this machine
_STATE: dict[str | tuple, object] = {}


def library(name: str = "avx2") -> ctypes.CDLL:
    """The loaded kernels of one library (built on the first call); :class:`BuildError` if
    they cannot be."""
    loaded = _STATE.get(name)  # the call path of every layer: no lock once loaded
    if loaded is not None:
        return loaded  # type: ignore[return-value]
    with _LOCK:
        if name not in _STATE and f"error:{name}" not in _STATE:
            try:
                _STATE[name] = load(name)
            except (BuildError, OSError) as error:
                _STATE[f"error:{name}"] = str(error)
    if f"error:{name}" in _STATE:
        raise BuildError(str(_STATE[f"error:{name}"]))
    return _STATE[name]  # type: ignore[return-value]


def build_error() -> str | None:
    """Why the kernels cannot be built or loaded on this machine, or ``None`` if they can."""
    try:
        library()
    except BuildError as error:
        return str(error)
    return None


def features() -> frozenset[str]:
    """What this CPU runs, of ``avx2``, ``avx512``, ``avx512bf16`` and ``amx`` (empty if the
    kernels cannot be built)."""
    if "features" not in _STATE:
        try:
            bits = library().nmsparse_cpu_features()
        except BuildError:
            bits = 0
        _STATE["features"] = frozenset(name for name, bit in _FEATURE_BITS.items()
                                       if bits & bit)
    return _STATE["features"]  # type: ignore[return-value]


def isa_reason(name: str) -> str | None:
    """Why instruction set ``name`` cannot run here, or ``None`` if it can (cached: a decode
    step asks for every layer)."""
    key = f"reason:{name}"
    if key not in _STATE:
        _STATE[key] = _isa_reason(name)
    return _STATE[key]  # type: ignore[return-value]


def _isa_reason(name: str) -> str | None:
    if name not in ISAS:
        return f"{ENV_ISA}={name!r} is not one of {', '.join(ISAS)}"
    error = build_error()
    if error:
        return error
    if name not in features():
        return f"this CPU has no {name.upper()} ({ENV_ISA}={name})"
    try:
        library(LIBRARY_OF[name])
    except BuildError as error:
        return str(error)
    return None


def isa() -> str:
    """The instruction set the kernels use: ``NMSPARSE_CPU_ISA`` if set, else the best one
    that runs here (``avx2`` if none does: :func:`unsupported_reason` then says why)."""
    chosen = os.environ.get(ENV_ISA, "").strip().lower()
    if chosen:
        return chosen
    if "best" not in _STATE:
        _STATE["best"] = next((name for name in reversed(ISAS) if isa_reason(name) is None),
                              "avx2")
    return str(_STATE["best"])
