"""The ``nmsparse::nm_linear`` custom op: ``x @ W.T + bias`` with W packed N:M.

Schema: ``nm_linear(Tensor x, Tensor values, Tensor indices, int n, int m, Tensor? bias=None)
-> Tensor``. ``values`` / ``indices`` are a Linear weight ``(out, in)`` packed by
:func:`nmsparse.packing.pack` (one row per output feature), ``x`` is ``(..., in)`` with
``in = values.shape[1] // n * m``; the result is ``(..., out)`` in x's dtype.

Which implementation runs (``NMSPARSE_KERNELS`` environment variable, read at every call):

* ``auto`` (default): the Triton kernels for CUDA tensors, and for CPU tensors when
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests), if Triton is installed and the call
  is supported (M in {4, 8, 16}; fp16, bf16, fp32); else, for CPU tensors, the AVX2 / AVX-512
  kernels of :mod:`nmsparse.kernels.cpu` (fp32, bf16; any N < M <= 256, N not dividing 8 and
  M > 16 only with AVX-512; compiled on first use; they pick their kernel by the row count,
  see there);
  otherwise unpack + ``F.linear`` (exact same math as the dense layer, any device, any M).
  When the CPU kernels cannot be built (no AVX2/FMA, no compiler, a cache folder that cannot
  be written) a one-line warning says so, once.
* ``triton``: the Triton kernels or a ``ValueError`` saying why not.
* ``cpu``: the CPU kernels or a ``ValueError`` saying why not.
* ``torch``: always unpack + ``F.linear``.

A fake (meta) implementation makes the op traceable by ``torch.compile``; the backward gives
the gradient for ``x`` and ``bias`` (the packed weight is a constant).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from ..packing import index_width, unpack_rows

BACKENDS = ("auto", "triton", "cpu", "torch")
ENV_BACKEND = "NMSPARSE_KERNELS"


def backend() -> str:
    choice = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={choice!r} is not one of {BACKENDS}")
    return choice


def triton_available() -> bool:
    """Whether Triton is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _check(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
           bias: torch.Tensor | None) -> None:
    if values.dim() != 2 or indices.dim() != 2 or indices.dtype != torch.uint8:
        raise ValueError("nm_linear needs 2-D values and 2-D uint8 indices (a packed Linear "
                         f"weight), got {tuple(values.shape)} and {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if not 1 <= n < m or values.shape[1] % n:
        raise ValueError(f"values of shape {tuple(values.shape)} do not hold {n}:{m} groups")
    slots = values.shape[1]
    in_features = slots // n * m
    expected = (values.shape[0], -(-slots * index_width(m) // 8))
    if tuple(indices.shape) != expected:
        raise ValueError(f"indices of shape {tuple(indices.shape)} do not match values of shape "
                         f"{tuple(values.shape)} for {n}:{m}: expected {expected}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match the packed weight's "
                         f"{in_features} input features")
    others = [values, indices] + ([] if bias is None else [bias])
    if any(t.device != x.device for t in others):
        raise ValueError(f"input on {x.device} but the packed weight on {values.device}"
                         + ("" if bias is None else f" and the bias on {bias.device}"))
    if x.dtype != values.dtype:
        raise ValueError(f"input dtype {x.dtype} differs from the weight's {values.dtype}")
    if bias is not None and (bias.shape != (values.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} of shape ({values.shape[0]},), got "
                         f"{bias.dtype} {tuple(bias.shape)}")


def _triton_reason(x: torch.Tensor, values: torch.Tensor, m: int) -> str | None:
    """Why the Triton path is not taken for this call, or None if it is."""
    # The environment first: find_spec walks sys.path (hundreds of microseconds), which a
    # CPU decode step calling this op ~100 times could not afford.
    if x.is_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return "a CPU tensor without TRITON_INTERPRET=1"
    if not triton_available():
        return "Triton is not installed"
    if x.device.type not in ("cpu", "cuda"):
        return f"device {x.device}"
    from . import _triton  # lazy: the only import of Triton in nmsparse

    return _triton.unsupported_reason(x, values, m)


_CPU_WARNED: list[str] = []  # the build error already warned about (once per process)
_CPU_MODULE: list = []


def _cpu():
    """:mod:`nmsparse.kernels.cpu`, imported on the first CPU call (``import nmsparse`` does
    not import it) and then held: an import statement costs about a microsecond on each of
    the ~100 layer calls of a decode step."""
    if not _CPU_MODULE:
        from . import cpu

        _CPU_MODULE.append(cpu)
    return _CPU_MODULE[0]


def _cpu_reason(x: torch.Tensor, values: torch.Tensor, n: int, m: int) -> str | None:
    """Why the CPU kernels do not take this call, or None if they do."""
    if not x.is_cpu:
        return f"device {x.device}"
    return _cpu().unsupported_reason(x, values, n, m)


def _warn_cpu_fallback() -> None:
    cpu = _cpu()
    error = cpu.isa_reason(cpu.isa())  # a build error, or a forced NMSPARSE_CPU_ISA missing here
    if error and not _CPU_WARNED:
        _CPU_WARNED.append(error)
        warnings.warn(f"nmsparse: the CPU N:M kernels are unavailable ({error}); nm_linear "
                      "falls back to unpack + F.linear (exact, no speedup)", stacklevel=3)


def reference(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack + ``F.linear``: the fallback, and the ground truth of the tests."""
    return F.linear(x, unpack_rows(values, indices, n, m), bias)


# Defined with torch.library.Library rather than torch.library.custom_op: custom_op wraps the
# kernel so that its first call imports torch._dynamo (and with it Triton) even in eager CPU
# inference. The Library object must stay alive: its registrations die with it.
_LIB = torch.library.Library("nmsparse", "FRAGMENT")  # FRAGMENT: other modules may add ops
_LIB.define("nm_linear(Tensor x, Tensor values, Tensor indices, int n, int m, Tensor? bias=None)"
            " -> Tensor")


def _nm_linear_impl(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int,
                    m: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check(x, values, indices, n, m, bias)
    return run_checked(x, values, indices, n, m, bias)


def run_checked(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's implementation for arguments that pass ``_check`` (NMLinear calls it with its
    own buffers once x matches them: ``NMLinear.fits``)."""
    choice = backend()
    if choice in ("auto", "triton"):
        reason = _triton_reason(x, values, m)
        if reason is None:
            from ._triton import nm_linear_triton

            return nm_linear_triton(x, values, indices, n, m, bias)
        if choice == "triton":
            raise ValueError(f"{ENV_BACKEND}=triton but the Triton kernels cannot run: {reason}")
    if choice in ("auto", "cpu"):
        reason = _cpu_reason(x, values, n, m)
        if reason is None:
            return _cpu().run_checked(x, values, indices, n, m, bias)
        if choice == "cpu":
            raise ValueError(f"{ENV_BACKEND}=cpu but the CPU kernels cannot run: {reason}")
        if x.device.type == "cpu":
            _warn_cpu_fallback()
    return reference(x, values, indices, n, m, bias)


torch.library.impl("nmsparse::nm_linear", "default", lib=_LIB)(_nm_linear_impl)


@torch.library.register_fake("nmsparse::nm_linear", lib=_LIB)
def _nm_linear_fake(x, values, indices, n, m, bias=None):
    torch._check(values.dim() == 2 and indices.dim() == 2)
    torch._check(x.shape[-1] == values.shape[1] // n * m,
                 lambda: "input features do not match the packed weight")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, values, indices, n, m, bias = inputs
    ctx.save_for_backward(values, indices)
    ctx.n, ctx.m = n, m
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    values, indices = ctx.saved_tensors
    grad_x = grad @ unpack_rows(values, indices, ctx.n, ctx.m).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias


torch.library.register_autograd("nmsparse::nm_linear", _backward,
                                setup_context=_setup_context, lib=_LIB)


def call_directly(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a module may call an op's implementation itself instead of through the
    dispatcher, which costs 20-30 us a call (measured on a 256x2048 layer, about 5 % of a
    decode step of the 0.84B Llama at batch 1): eager CPU code with no gradient to record, on
    a plain tensor (not fake, not a subclass, not inside a torch.func transform). The result
    is the same function's."""
    return (type(x) is torch.Tensor and x.is_cpu
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled()
                     and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed N:M Linear weight: ``torch.ops.nmsparse.nm_linear``."""
    return torch.ops.nmsparse.nm_linear(x, values, indices, n, m, bias)
