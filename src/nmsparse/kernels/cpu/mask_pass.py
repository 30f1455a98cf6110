"""The per-step mask pass of sparse training in C++ (``nm_mask.cpp``), for CPU weights.

:mod:`nmsparse.engine.fused` calls these first for CPU tensors (float32 and bfloat16; the
SR-STE term float32 only): one pass over the weight that reads it once and writes the mask and
the masked weight once, bit-identical to the eager torch ops (same comparisons, ties to the
lower index, NaN as eager; the SR-STE term one fused multiply-add per entry like eager's
``add_(alpha=)``). Each function returns ``None`` where it cannot run (no compiler, no AVX2,
a dtype or geometry it does not take), and the caller takes its next path.

The library is built on first use like the Linear kernels (:mod:`._build`; about 2 s, and
nothing else is built for it). Its instruction set is the best of AVX-512 (F/BW/VL/DQ, 16
lanes) and AVX2 (8 lanes) that PyTorch's dispatcher sees on this CPU; ``NMSPARSE_CPU_ISA``
forces one as for the Linear kernels (``avx2``: the 8-lane build; ``avx512``/``avx512bf16``:
the 16-lane one, which needs no BF16).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch.autograd.graph import increment_version

from ._build import BuildError
from ._library import ENV_ISA, ISAS, library

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Below this many elements one thread: starting a parallel region costs more than the pass.
SERIAL_BELOW = 1 << 16
_CHOICE: dict[tuple[str, str], tuple[str | None, str | None]] = {}


def _choose(forced: str, capability: str) -> tuple[str | None, str | None]:
    """``(library, None)`` or ``(None, why not)`` for a forced set and torch's capability."""
    has_avx512 = capability.startswith("AVX512")
    if not (has_avx512 or capability.startswith("AVX2")):
        return None, f"this CPU has no AVX2/FMA (PyTorch's CPU capability: {capability})"
    if forced and forced not in ISAS:
        return None, f"{ENV_ISA}={forced!r} is not one of {', '.join(ISAS)}"
    wide = forced != "avx2" if forced else has_avx512
    if wide and not has_avx512:
        return None, f"this CPU has no AVX-512 ({ENV_ISA}={forced})"
    name = "mask_avx512" if wide else "mask_avx2"
    try:
        library(name)
    except BuildError as error:
        return None, str(error)
    return name, None


def _chosen() -> tuple[str | None, str | None]:
    key = (os.environ.get(ENV_ISA, "").strip().lower(),
           torch.backends.cpu.get_cpu_capability())
    if key not in _CHOICE:
        _CHOICE[key] = _choose(*key)
    return _CHOICE[key]


def reason() -> str | None:
    """Why the mask pass cannot run on this machine, or ``None`` if it can."""
    return _chosen()[1]


def _library() -> ctypes.CDLL | None:
    name = _chosen()[0]
    return None if name is None else library(name)


def _threads(tensor: torch.Tensor) -> int:
    return 1 if tensor.numel() < SERIAL_BELOW else torch.get_num_threads()


def refresh(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, n: int, m: int,
            stride: int) -> torch.Tensor | None:
    """``mask`` = top ``n`` of ``|w|`` in every group of ``m`` (members ``stride`` apart in the
    flat weight), ``masked`` = the kept weights; returns the 0-d "all finite" flag. Contiguous
    CPU tensors of one shape, ``mask`` bool, ``masked`` of the weight's dtype."""
    lib = _library() if weight.dtype in DTYPES else None
    if lib is None:
        return None
    finite = torch.zeros((), dtype=torch.uint8)
    status = lib.nmsparse_mask_refresh(weight.data_ptr(), DTYPES[weight.dtype], mask.data_ptr(),
                                       masked.data_ptr(), weight.numel(), n, m, stride,
                                       _threads(weight), finite.data_ptr())
    if status:
        return None
    # writes through a pointer: tell autograd, as torch's in-place ops do
    increment_version((mask, masked))
    return finite.view(torch.bool)


def fixed(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor | None:
    """With the mask given: ``masked`` = the kept weights and the pruned weights set to 0;
    returns "all finite" (of the weight before)."""
    lib = _library() if weight.dtype in DTYPES else None
    if lib is None:
        return None
    finite = torch.zeros((), dtype=torch.uint8)
    lib.nmsparse_mask_fixed(weight.data_ptr(), DTYPES[weight.dtype], mask.data_ptr(),
                            masked.data_ptr(), weight.numel(), _threads(weight),
                            finite.data_ptr())
    increment_version((weight, masked))
    return finite.view(torch.bool)


def add_decay(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
              decay: float) -> bool:
    """``grad += decay * w`` where ``mask`` is 0 (float32); False where it cannot run."""
    lib = _library() if weight.dtype == torch.float32 else None
    if lib is None:
        return False
    # eager's add_(alpha=) rounds alpha to the tensor's dtype first: ctypes' c_float does too
    lib.nmsparse_mask_decay(grad.data_ptr(), weight.data_ptr(), mask.data_ptr(), decay,
                            weight.numel(), _threads(weight))
    increment_version(grad)
    return True
