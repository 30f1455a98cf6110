"""How every kernel entry point is called from Python: the output buffer, the fp32 bias, the
status codes and the thread count."""

from __future__ import annotations

import torch

# what a kernel entry point's non-zero status means
STATUS = {1: "the CPU N:M kernels reject pattern {n}:{m} for this kernel",
          2: "the CPU N:M kernel could not allocate its buffers",
          3: "the CPU N:M kernels were called with an input dtype they do not take"}


# Below this many multiply-adds a call runs on one thread: starting a parallel region costs
# more than the work (and on a busy machine it waits for every thread to be scheduled).
SERIAL_BELOW = 1 << 18


def threads_for(batch: int, kept: int) -> int:
    """Threads for ``batch`` rows against ``kept`` stored weights (the packed values)."""
    return 1 if batch * kept < SERIAL_BELOW else torch.get_num_threads()


def call_into_fp32(call, x: torch.Tensor, batch: int, out_features: int,
                   bias: torch.Tensor | None, rejected) -> torch.Tensor:
    """The way every kernel entry point here is run: ``call(bias pointer or None, y
    pointer)`` writes a new fp32 ``y`` (batch, out_features), with the bias in fp32; status
    2 raises MemoryError, any other non-zero status ValueError(``rejected(status)``); the
    result is cast to x's dtype and shaped as x with out_features last. Nothing is called for
    an empty product."""
    y = torch.empty(batch, out_features, dtype=torch.float32)
    if batch and out_features:
        bias32 = None if bias is None else contiguous_as(bias, torch.float32)
        status = call(None if bias32 is None else bias32.data_ptr(), y.data_ptr())
        if status == 2:
            raise MemoryError(STATUS[2])
        if status:
            raise ValueError(rejected(status))
    # each skipped no-op is a microsecond of a small layer's ~20 us call
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def contiguous_as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, contiguous (itself when it already is)."""
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor if tensor.is_contiguous() else tensor.contiguous()
