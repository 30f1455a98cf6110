"""The AMX kernel (``tdpbf16ps`` tiles, ``nm_amx_avx512.h``): whether it may run here, checked
once per process in a child process, when the dispatch takes it, and its call."""

from __future__ import annotations

import ctypes
import os

import torch

from . import _library
from ._calls import call_into_fp32, contiguous_as, threads_for
from ._library import features, isa_reason, library
from ._patterns import masks_take

ENV_AMX = "NMSPARSE_CPU_AMX"
# On a CPU with AMX, oneDNN's dense bf16 product runs on tiles, and the AVX-512 kernels here
# (and the prepared one) are expected to lose to it from some tens of rows: there, from this
# many bf16 rows, the dense path runs (the weight expanded tile by tile for F.linear: dense
# speed less the expansion). NOT MEASURED, no AMX machine was at hand; the figure is
# arithmetic, for a run of benchmarks/cpu_kernels.py on such a machine to replace: on
# 11008x4096 (2:4) the prepared kernel takes ~4 / 13 / 43 ms at 16 / 64 / 256 rows on Zen 4
# and will not be faster on a Xeon's AVX-512; AMX's dense product is bound by reading the
# 90 MB weight (~6 ms) up to ~100 rows; expanding the layout costs ~8-12 ms (measured), so
# the dense path is expected to pass the prepared kernel near 64 rows. Without AMX the
# measured table (DISPATCH in nmsparse.kernels.cpu) decides.
AMX_DENSE_ROWS = 64
# From this many bf16 rows the AMX kernel runs where it can (amx_reason() is None). NOT
# MEASURED either: at 16 rows oneDNN's dense product on AMX tiles already beat the AVX-512
# kernels here 3x on a Xeon (the table: 2:4 at 0.34x of dense bf16), and the AMX
# kernel, expanding a 1 KiB tile with 16 vpexpandw for each 16 x 16 x 32 tile product, should
# be bound by reading the packed weight from there on; below it the dot and lanes kernels keep
# the few-row work, where a tile would be mostly padding.
AMX_ROWS = 16


def amx_rows(rows: int) -> bool:
    """Whether ``rows`` bf16 rows take the AMX kernel (:data:`AMX_ROWS`, where it runs:
    :func:`amx_reason`), for patterns it takes: plain and prepared layers alike."""
    return rows >= AMX_ROWS and "amx" in features() and amx_reason() is None


def amx_dense(rows: int) -> bool:
    """Whether ``rows`` bf16 rows take the dense path because the CPU has AMX, where oneDNN's
    product runs on tiles (:data:`AMX_DENSE_ROWS`), and the AMX kernel did not take them:
    plain and prepared layers alike."""
    return rows >= AMX_DENSE_ROWS and "amx" in features()


def amx_reason() -> str | None:
    """Why the AMX kernel cannot run here, or ``None`` if it can (checked once per process):
    the CPU needs AMX-BF16 and the bf16 kernels' instruction set, Linux must grant the tile
    state, ``NMSPARSE_CPU_AMX`` must not be ``0``, and the kernel's self-check must pass in a
    child process (it has not run on AMX hardware before; a crash there does not reach this
    process). A CPU with AMX whose kernel cannot run warns once, saying why."""
    if "amx_reason" not in _library._STATE:
        reason = _amx_reason()
        if reason is not None and "amx" in features() and os.environ.get(ENV_AMX) != "0":
            import warnings

            warnings.warn(f"nmsparse: the AMX kernel is not used: {reason}; bf16 layers run "
                          "the AVX-512 kernels and, from "
                          f"{AMX_DENSE_ROWS} rows, oneDNN on AMX tiles (exact either way)",
                          RuntimeWarning, stacklevel=2)
        _library._STATE["amx_reason"] = reason
    return _library._STATE["amx_reason"]  # type: ignore[return-value]


AMX_SELFTEST = ("import ctypes, sys; "
                "sys.exit(ctypes.CDLL(sys.argv[1]).nmsparse_amx_selftest(int(sys.argv[2])))")


def _amx_reason() -> str | None:
    if os.environ.get(ENV_AMX) == "0":
        return f"{ENV_AMX}=0"
    if "amx" not in features():
        return "this CPU has no AMX-BF16"
    reason = isa_reason("avx512bf16")
    if reason:
        return f"the AMX kernel expands the weight with AVX512_BF16 and VBMI code: {reason}"
    import subprocess
    import sys

    loaded = library("avx512")
    if loaded.nmsparse_amx_emulated() < 0:
        return "the C++ compiler that built the kernels cannot build AMX code (GCC >= 11 or " \
               "Clang >= 12 can)"
    try:
        done = subprocess.run([sys.executable, "-c", AMX_SELFTEST, loaded._name, "2"],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        return f"its self-check could not run ({error})"
    if done.returncode == 1:
        return "its self-check gave a wrong result (please report it with this CPU's model)"
    if done.returncode == 2:
        return "Linux did not grant the AMX tile state to a child process"
    if done.returncode == 3:
        return "its self-check ran out of memory"
    if done.returncode:
        return f"its self-check ended with status {done.returncode} (a fault: please report it)"
    if loaded.nmsparse_amx_request():
        return "Linux did not grant this process the AMX tile state"
    return None


def amx_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
               bias: torch.Tensor | None = None, *, emulated: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` on AMX tiles for a bf16 packed weight with M a power of two up to
    64 (x rounded to bf16, as the other bf16 kernels do; fp32 accumulation; the result in x's
    dtype). ``emulated``: the build whose tile operations are C++ (any CPU with AVX512_BF16:
    for tests; slow)."""
    if values.dtype != torch.bfloat16 or not masks_take(n, m):
        raise ValueError(f"the AMX kernel takes bf16 weights with M a power of two up to 64, "
                         f"got {values.dtype} {n}:{m}")
    function = amx_library(emulated).nmsparse_amx_linear
    out_features, slots = values.shape
    flat = contiguous_as(x.reshape(-1, x.shape[-1]), torch.bfloat16)
    values, indices = values.contiguous(), indices.contiguous()

    def call(bias32, y):
        return function(flat.data_ptr(), flat.shape[0], flat.shape[1], values.data_ptr(),
                        indices.data_ptr(), out_features, slots, indices.shape[1], n, m, bias32,
                        y, threads_for(flat.shape[0], values.numel()))

    return call_into_fp32(call, x, flat.shape[0], out_features, bias,
                          lambda status: f"the AMX kernel rejects pattern {n}:{m}")


def amx_library(emulated: bool) -> ctypes.CDLL:
    if emulated:
        reason = isa_reason("avx512bf16")
        if reason:
            raise ValueError(f"the emulated AMX kernel needs AVX512_BF16 and VBMI: {reason}")
        return library("amx_emulated")
    reason = amx_reason()
    if reason:
        raise ValueError(f"the AMX kernel cannot run here: {reason}")
    return library("avx512")
