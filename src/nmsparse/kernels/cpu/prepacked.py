"""The prepared CPU layout of a bf16 N:M weight (``nm_prepacked_avx512.h``) and its kernel.

The lanes kernel (:mod:`nmsparse.kernels.cpu`) lays the packed rows out lane by lane on every
call, and at a few rows that costs as much as the product. :func:`prepack` does it once: the
same bytes as the packed format (bf16 pairs of kept weights, the position bits), reordered so
that 16 outputs sit in the lanes of a vector. :func:`nm_linear_prepacked` then reads that
layout straight into ``vpshufb`` + ``vdpbf16ps``, for any number of rows.

Only where the CPU has AVX512_BF16 and VBMI (:func:`prepack_reason` says why not), bf16
weights, and every N:M with M in {2, 4, 8} (:func:`prepacked_take`: 2:4, 1:4, 3:4, 1:2, 1:8 ...
7:8; a window's odd count of kept values pairs its last one with a zero weight), and 1:16 ...
7:16 (each group's two halves laid out as windows of N slots, padded with zero weights).
:func:`unprepack` gives the packed ``(values, indices)`` back, bit for bit.
"""

from __future__ import annotations

import functools

import torch

from ...packing import packed_shapes
from . import tiled_linear
from ._calls import STATUS, call_into_fp32, contiguous_as, threads_for
from ._library import isa, library
from .amx import amx_dense, amx_library, amx_rows

_BF16 = torch.bfloat16


def prepacked_take(n: int, m: int) -> bool:
    """Whether the prepared layout holds N:M: M in {2, 4, 8} and 1 <= N < M, or M = 16 and
    1 <= N <= 7 (laid out as two windows of 8 per group, each with N slots)."""
    return (m in (2, 4, 8) and 1 <= n < m) or (m == 16 and 1 <= n <= 7)


_ORDER = ("its positions are not in the order pack() writes (in each group of 16, those "
          "below 8 first), which the layout could not give back bit for bit")


def prepack_reason(values: torch.Tensor, n: int, m: int,
                   indices: torch.Tensor | None = None) -> str | None:
    """Why a packed weight cannot take the prepared layout here, or ``None`` if it can
    (with ``indices``, M = 16 also checks the order of each group's positions)."""
    if values.device.type != "cpu":
        return f"device {values.device} (the prepared layout is for the CPU)"
    if values.dtype != _BF16:
        return f"dtype {values.dtype} (the prepared layout holds bfloat16 weights)"
    if not prepacked_take(n, m):
        return (f"pattern {n}:{m} (the prepared layout takes M in {{2, 4, 8}} with any N < M, "
                "and N <= 7 of 16)")
    name = isa()
    if name != "avx512bf16":
        return f"this CPU's kernels are {name}: the prepared layout needs AVX512_BF16 and VBMI"
    if indices is not None and m == 16:
        slots = values.shape[1]
        status = _library().nmsparse_lanes_check(
            indices.contiguous().data_ptr(), values.shape[0], slots // n * m, slots,
            indices.shape[1], n, m)
        if status:
            return _ORDER
    return None


def _library():
    return library("avx512")


def prepack(values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
            in_features: int) -> torch.Tensor:
    """The prepared layout (a 1-D ``uint8`` tensor) of a packed bf16 ``(out, in)`` weight."""
    reason = prepack_reason(values, n, m)
    if reason:
        raise ValueError(f"cannot prepare this weight for the CPU kernel: {reason}")
    out_features = values.shape[0]
    expected = packed_shapes((out_features, in_features), n, m, "in")
    if (tuple(values.shape), tuple(indices.shape)) != expected or indices.dtype != torch.uint8:
        raise ValueError(f"values {tuple(values.shape)} and indices {indices.dtype} "
                         f"{tuple(indices.shape)} are not a packed {n}:{m} weight of "
                         f"{in_features} inputs (expected {expected[0]} and uint8 {expected[1]})")
    lib = _library()
    layout = torch.empty(_layout_bytes(out_features, in_features, n, m), dtype=torch.uint8)
    values, indices = values.contiguous(), indices.contiguous()
    status = lib.nmsparse_lanes_pack(values.data_ptr(), indices.data_ptr(), out_features,
                                     in_features, values.shape[1], indices.shape[1], n, m,
                                     layout.data_ptr())
    if status == 4:
        raise ValueError(f"cannot prepare this weight for the CPU kernel: {_ORDER}")
    if status == 2:
        raise MemoryError(STATUS[2])
    if status:
        raise ValueError(STATUS[1].format(n=n, m=m))
    return layout


@functools.lru_cache(maxsize=1024)
def _layout_bytes(out_features: int, in_features: int, n: int, m: int) -> int:
    return _library().nmsparse_lanes_bytes(out_features, in_features, n, m)


def _check_layout(layout: torch.Tensor, n: int, m: int, in_features: int,
                  out_features: int) -> None:
    size = _layout_bytes(out_features, in_features, n, m)
    if layout.dtype != torch.uint8 or layout.dim() != 1 or layout.numel() != size:
        raise ValueError(f"a prepared {n}:{m} layout of a {out_features}x{in_features} weight "
                         f"is {size} uint8 bytes, got {layout.dtype} {tuple(layout.shape)}")
    if layout.device.type != "cpu":
        raise ValueError(f"the prepared layout is on {layout.device}; it is read on the CPU")


def unprepack(layout: torch.Tensor, n: int, m: int, in_features: int,
              out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed ``(values, indices)`` (bf16, uint8) the layout was prepared from."""
    _check_layout(layout, n, m, in_features, out_features)
    values_shape, indices_shape = packed_shapes((out_features, in_features), n, m, "in")
    values = torch.empty(values_shape, dtype=_BF16)
    indices = torch.empty(indices_shape, dtype=torch.uint8)
    status = _library().nmsparse_lanes_unpack(
        layout.contiguous().data_ptr(), out_features, in_features, values_shape[1],
        indices_shape[1], n, m, values.data_ptr(), indices.data_ptr())
    if status == 2:
        raise MemoryError(STATUS[2])
    if status:
        raise ValueError(f"a prepared {n}:{m} layout that does not hold {n} kept weights in "
                         "every group (corrupt)" if m == 16 else STATUS[1].format(n=n, m=m))
    return values, indices


def dense_rows(layout: torch.Tensor, n: int, m: int, in_features: int, out_features: int,
               begin: int = 0, end: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense bf16 rows ``[begin, end)`` (``begin`` a multiple of 16) of the weight, zeros
    at the pruned positions, expanded from the layout by vector code (into ``out`` if given)."""
    _check_layout(layout, n, m, in_features, out_features)
    end = out_features if end is None else end
    rows = end - begin
    if out is None:
        out = torch.empty(rows, in_features, dtype=_BF16)
    status = _library().nmsparse_lanes_dense(layout.data_ptr(), out_features, in_features, n,
                                             m, begin, end, out.data_ptr(),
                                             threads_for(rows, rows * in_features // 4))
    if status:
        raise ValueError(f"rows [{begin}, {end}) of a {out_features}-row prepared weight "
                         "(the first must be a multiple of 16)")
    return out[:rows]


KERNELS = ("auto", "lanes", "dense", "amx")


def kernel_for(rows: int) -> str:
    """The prepared kernel ``rows`` rows run on this CPU, as for plain layers: on a CPU with
    AMX the AMX kernel from :data:`nmsparse.kernels.cpu.AMX_ROWS` rows where it runs, else
    the dense path (tiles expanded from the layout for F.linear) from
    :data:`nmsparse.kernels.cpu.AMX_DENSE_ROWS` rows (neither measured: see there); else
    ``"lanes"``, the prepared kernel, at every row count (measured ahead of dense bf16 up to
    512 rows for 2:4 on Zen 4)."""
    if amx_rows(rows):
        return "amx"
    return "dense" if amx_dense(rows) else "lanes"


def amx_prepacked(x: torch.Tensor, layout: torch.Tensor, n: int, m: int, in_features: int,
                  out_features: int, bias: torch.Tensor | None = None, *,
                  emulated: bool = False) -> torch.Tensor:
    """:func:`nm_linear_prepacked` on AMX tiles (:func:`nmsparse.kernels.cpu.amx_linear`):
    each block of 16 outputs expanded from the layout into the thread's panel. ``emulated``:
    the build whose tile operations are C++ (tests)."""
    _check_layout(layout, n, m, in_features, out_features)
    return _amx_checked(x, layout, n, m, in_features, out_features, bias, emulated)


def _amx_checked(x: torch.Tensor, layout: torch.Tensor, n: int, m: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None, emulated: bool) -> torch.Tensor:
    """:func:`amx_prepacked` for a layout already checked (by :func:`nm_linear_prepacked`)."""
    function = amx_library(emulated).nmsparse_amx_lanes_linear
    flat = contiguous_as(x.reshape(-1, in_features), _BF16)

    def call(bias32, y):
        return function(flat.data_ptr(), flat.shape[0], in_features, layout.data_ptr(),
                        out_features, n, m, bias32, y,
                        threads_for(flat.shape[0], out_features * (in_features // m * n)))

    return call_into_fp32(call, x, flat.shape[0], out_features, bias,
                          lambda status: f"the AMX kernel rejects pattern {n}:{m}")


def _dense_tiles(flat: torch.Tensor, layout: torch.Tensor, n: int, m: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The dense path (:func:`nmsparse.kernels.cpu.tiled_linear` over :func:`dense_rows`):
    bf16 x meets the tiles in bf16 (fp32 accumulation, as oneDNN does); other x is rounded
    to bf16 as the kernel rounds it and multiplied in fp32, so that the result keeps fp32's
    precision as the kernel's does."""
    rows = flat.to(_BF16).to(_BF16 if flat.dtype == _BF16 else torch.float32)
    return tiled_linear(rows, out_features, _BF16,
                        lambda first, last, buffer: dense_rows(
                            layout, n, m, in_features, out_features, first, last, buffer),
                        bias)


def nm_linear_prepacked(x: torch.Tensor, layout: torch.Tensor, n: int, m: int,
                        in_features: int, out_features: int,
                        bias: torch.Tensor | None = None, *, kernel: str = "auto") -> torch.Tensor:
    """``x @ W.T + bias`` with W in the prepared layout; x of any floating dtype (multiplied
    in bf16, accumulated in fp32), the result in x's dtype. ``kernel``: ``"lanes"`` (the
    prepared kernel) or ``"dense"`` (tiles expanded for F.linear, bf16 out) force one;
    ``"auto"`` follows :func:`kernel_for`."""
    _check_layout(layout, n, m, in_features, out_features)
    if not x.is_cpu or x.shape[-1] != in_features:
        raise ValueError(f"x of shape {tuple(x.shape)} on {x.device} does not meet a prepared "
                         f"weight of {in_features} inputs on the CPU")
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {KERNELS}")
    flat = x.reshape(-1, in_features)
    batch = flat.shape[0]
    chosen = kernel_for(batch) if kernel == "auto" else kernel
    if chosen == "amx":
        return _amx_checked(x, layout, n, m, in_features, out_features, bias, False)
    if chosen == "dense":
        y = _dense_tiles(flat, layout, n, m, in_features, out_features, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
    rows = contiguous_as(flat, _BF16)

    def call(bias32, y):
        return _library().nmsparse_lanes_linear(
            rows.data_ptr(), batch, in_features, layout.data_ptr(), out_features, n, m, bias32,
            y, threads_for(batch, out_features * (in_features // m * n)))

    return call_into_fp32(call, x, batch, out_features, bias,
                          lambda status: STATUS[1].format(n=n, m=m))
