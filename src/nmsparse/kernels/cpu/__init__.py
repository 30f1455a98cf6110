"""CPU kernels of the packed N:M Linear (AVX2 + FMA + OpenMP, compiled on first use).

``nm_linear_cpu(x, values, indices, n, m, bias)`` computes ``x @ W.T + bias`` reading only the
packed weight (:mod:`nmsparse.packing` format, unchanged: the positions are decoded in
registers), with fp32 accumulation, on ``torch.get_num_threads()`` threads. Supported: CPU
tensors, fp32 or bf16 weights and inputs, N dividing 8 and M at most 16 with N < M (2:4, 4:8,
1:4, 2:8, 1:8, 1:16, 1:2, ...), any batch (one input row uses a gather loop, 2..64 rows a
broadcast loop over x transposed, larger batches 64 rows at a time). The result is in x's
dtype: fp32 accumulation rounded once (bf16 output rounded to nearest even by torch).

:func:`unsupported_reason` says why a call cannot run here (``None`` if it can), building the
library on the first call (:mod:`._build`). Imported lazily by :mod:`nmsparse.kernels._op`;
the core of nmsparse never imports it.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ._build import BuildError, load

DTYPES = (torch.float32, torch.bfloat16)
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def library() -> ctypes.CDLL:
    """The loaded kernels (built on the first call); :class:`BuildError` if they cannot be."""
    with _LOCK:
        if "library" not in _STATE and "error" not in _STATE:
            try:
                _STATE["library"] = load()
            except BuildError as error:
                _STATE["error"] = str(error)
    if "error" in _STATE:
        raise BuildError(str(_STATE["error"]))
    return _STATE["library"]  # type: ignore[return-value]


def build_error() -> str | None:
    """Why the kernels cannot be built or loaded on this machine, or ``None`` if they can."""
    try:
        library()
    except BuildError as error:
        return str(error)
    return None


def pattern_reason(n: int, m: int) -> str | None:
    if m > 16 or 8 % n or not 1 <= n < m:
        return f"pattern {n}:{m} (the CPU kernels need N dividing 8 and M <= 16)"
    return None


def unsupported_reason(x: torch.Tensor, values: torch.Tensor, n: int, m: int) -> str | None:
    """Why :func:`nm_linear_cpu` cannot take this call, or ``None`` if it can."""
    if x.device.type != "cpu":
        return f"device {x.device}"
    if values.dtype not in DTYPES:
        return f"dtype {values.dtype} (the CPU kernels take float32 and bfloat16)"
    return pattern_reason(n, m) or build_error()


def nm_linear_cpu(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed N:M weight; arguments as checked by ``nm_linear``."""
    reason = unsupported_reason(x, values, n, m)
    if reason:
        raise ValueError(f"the CPU N:M kernels cannot run this call: {reason}")
    out_features, slots = values.shape
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features).to(torch.float32).contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    if rows.shape[0] and out_features:
        values = values.contiguous()
        indices = indices.contiguous()
        bias32 = None if bias is None else bias.to(torch.float32).contiguous()
        status = library().nmsparse_nm_linear(
            rows.data_ptr(), rows.shape[0], in_features, values.data_ptr(),
            int(values.dtype == torch.bfloat16), indices.data_ptr(), out_features, slots,
            indices.shape[1], n, m, None if bias32 is None else bias32.data_ptr(),
            y.data_ptr(), torch.get_num_threads())
        if status == 2:
            raise MemoryError("the CPU N:M kernel could not allocate its input buffer")
        if status:
            raise ValueError(f"the CPU N:M kernels reject pattern {n}:{m}")
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
