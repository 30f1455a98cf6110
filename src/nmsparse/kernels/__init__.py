"""N:M inference kernels: ``accelerate`` (2:4 on sparse tensor cores through PyTorch's
semi-structured sparse tensors), the packed N:M Linear op, ``NMLinear`` and
``swap_linear_layers``.

The only part of nmsparse that uses Triton, and only lazily: importing this package imports
no Triton and initialises no CUDA. It registers the custom op ``torch.ops.nmsparse.nm_linear``
(``x @ W.T + bias`` with W in the :mod:`nmsparse.packing` format; Triton kernels on CUDA,
the AVX2 / AVX-512 kernels of :mod:`nmsparse.kernels.cpu` on the CPU (compiled on first use),
unpack + ``F.linear`` elsewhere, see :mod:`nmsparse.kernels._op`).

    from nmsparse.kernels import swap_linear_layers
    nmsparse.finalize(model)
    report = swap_linear_layers(model, "2:4")   # N:M nn.Linear -> NMLinear
    print(report)
    print(prepare_cpu(model))   # bf16 on an AVX512_BF16 CPU: NMLinear -> PreparedNMLinear

``nm_linear_triton`` (the kernels called directly, ``path="gemv"|"gemm"|"auto"``) is loaded on
first access, importing Triton then.
"""

from __future__ import annotations

from typing import Any

from ._module import NMLinear, SwapReport, SwapRow, swap_linear_layers
from ._op import BACKENDS, ENV_BACKEND, nm_linear, reference, triton_available
from ._prepared import PreparedNMLinear, PrepareReport, prepare_cpu, unprepare_cpu
from .semi_structured import AccelerateReport, SemiStructuredLinear, accelerate, plan

__all__ = [
    "BACKENDS", "ENV_BACKEND", "AccelerateReport", "NMLinear", "PrepareReport",
    "PreparedNMLinear", "SemiStructuredLinear", "SwapReport", "SwapRow", "accelerate",
    "nm_linear", "nm_linear_triton", "plan", "prepare_cpu", "reference", "swap_linear_layers",
    "triton_available", "unprepare_cpu",
]


def __getattr__(name: str) -> Any:
    if name == "nm_linear_triton":
        from ._triton import nm_linear_triton

        return nm_linear_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
