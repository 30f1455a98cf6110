"""Triton kernels for ``y = x @ W.T (+ bias)`` with W stored in the packed N:M format.

Importing this module imports Triton; only :mod:`nmsparse.kernels` imports it, lazily. The
kernels read ``values`` / ``indices`` exactly as :mod:`nmsparse.packing` writes them for a
Linear weight ``(out, in)`` (one row per output feature, ``in / M`` groups per row) and expand
the weight in registers only; the dense weight never exists in global memory.

* GEMV (decode, a handful of rows of x): a program owns ``BLOCK_O`` output features and one
  row of x; it walks a row's stored values in chunks of ``BLOCK_S`` slots, decodes each slot's
  position from its index byte (shift + mask), gathers x at ``group * M + position`` and
  accumulates ``value * x`` in fp32.
* GEMM (batches): a program owns a ``BLOCK_B x BLOCK_O`` tile of y. Per step it decodes
  ``BLOCK_G`` groups of ``BLOCK_O`` weight rows into a dense ``(BLOCK_G * M, BLOCK_O)`` tile of
  W.T with one compare-and-select per stored slot (the tile entry at position p of a group is
  the value of the slot whose position equals p: positions in a group are distinct, so at most
  one slot matches and a select chain needs no scatter), then ``tl.dot`` with fp32
  accumulation.

Supported: M in {4, 8, 16}, any 1 <= N < M, x / values in fp16, bf16 or fp32 (same dtype),
output in x's dtype. ``TRITON_INTERPRET=1`` must be set before this module is imported for the
kernels to run on CPU tensors (Triton's interpreter).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..packing import index_width

SUPPORTED_M = (4, 8, 16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows of x up to which the GEMV kernel is used: decoding the weight once per row of x is cheap
# next to reading it, and tl.dot needs tiles of at least 16 rows.
GEMV_MAX_ROWS = 8


@triton.jit
def _nm_gemv_kernel(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, OUT, SLOTS,
                    stride_xb, stride_vo, stride_io, stride_yb,
                    N: tl.constexpr, M: tl.constexpr, WBITS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // WBITS
    FIELD: tl.constexpr = (1 << WBITS) - 1
    # rows of x on axis 0 (at most 2**31 - 1 programs): the programs of one weight tile run
    # next to each other and share it through L2.
    row = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < OUT
    v_rows = v_ptr + offs_o.to(tl.int64)[:, None] * stride_vo
    i_rows = i_ptr + offs_o.to(tl.int64)[:, None] * stride_io
    x_row = x_ptr + row * stride_xb
    acc = tl.zeros((BLOCK_O, BLOCK_S), dtype=tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        slot = s0 + tl.arange(0, BLOCK_S)
        ok = o_ok[:, None] & (slot < SLOTS)[None, :]
        vals = tl.load(v_rows + slot[None, :], mask=ok, other=0.0)
        # PER_BYTE neighbouring slots share a byte: repeated loads of it hit the cache.
        byte = tl.load(i_rows + (slot // PER_BYTE)[None, :], mask=ok, other=0).to(tl.int32)
        pos = (byte >> ((slot % PER_BYTE) * WBITS)[None, :]) & FIELD
        col = (slot // N)[None, :] * M + pos
        xs = tl.load(x_row + col, mask=ok, other=0.0)
        acc += vals.to(tl.float32) * xs.to(tl.float32)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_yb + offs_o, out.to(y_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _nm_gemm_kernel(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, ROWS, OUT, GROUPS,
                    stride_xb, stride_vo, stride_io, stride_yb,
                    N: tl.constexpr, M: tl.constexpr, WBITS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
                    BLOCK_G: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    PER_BYTE: tl.constexpr = 8 // WBITS
    FIELD: tl.constexpr = (1 << WBITS) - 1
    BLOCK_K: tl.constexpr = BLOCK_G * M
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    b_ok = offs_b < ROWS
    o_ok = offs_o < OUT
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, M)
    offs_k = tl.arange(0, BLOCK_K)
    v_cols = v_ptr + offs_o.to(tl.int64)[None, :] * stride_vo
    i_cols = i_ptr + offs_o.to(tl.int64)[None, :] * stride_io
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for g0 in range(0, GROUPS, BLOCK_G):
        group = g0 + offs_g
        ok = (group < GROUPS)[:, None] & o_ok[None, :]
        # Dense W.T tile as (group, position, out): entry (g, p, o) is the value of the slot
        # of group g whose stored position is p, else 0.
        tile = tl.zeros((BLOCK_G, M, BLOCK_O), dtype=v_ptr.dtype.element_ty)
        for s in tl.static_range(N):
            slot = group * N + s
            vals = tl.load(v_cols + slot[:, None], mask=ok, other=0.0)
            byte = tl.load(i_cols + (slot // PER_BYTE)[:, None], mask=ok, other=0).to(tl.int32)
            pos = (byte >> ((slot % PER_BYTE) * WBITS)[:, None]) & FIELD
            tile = tl.where(pos[:, None, :] == offs_p[None, :, None], vals[:, None, :], tile)
        w_t = tl.reshape(tile, (BLOCK_K, BLOCK_O))
        k = g0 * M + offs_k
        xs = tl.load(x_rows + k[None, :], mask=b_ok[:, None] & (k < GROUPS * M)[None, :],
                     other=0.0)
        if DOT_FP32:
            # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton
            # #11584): upcast there. Never set for compiled kernels.
            acc = tl.dot(xs.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xs, w_t.to(xs.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_b.to(tl.int64)[:, None] * stride_yb + offs_o[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & o_ok[None, :])


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return not isinstance(_nm_gemv_kernel, triton.runtime.JITFunction)


def unsupported_reason(x: torch.Tensor, values: torch.Tensor, m: int) -> str | None:
    """Why the Triton kernels cannot compute this call, or None if they can."""
    if m not in SUPPORTED_M:
        return f"M={m} (the kernels support M in {SUPPORTED_M})"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (the kernels support fp16, bf16 and fp32)"
    if x.device.type == "cpu" and not interpreted():
        return "a CPU tensor without TRITON_INTERPRET=1 set before Triton kernels were built"
    return None


def nm_linear_triton(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int,
                     m: int, bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """``x @ W.T + bias`` with the Triton kernels; ``path``: "auto", "gemv" or "gemm".

    Arguments are validated by the caller (:func:`nmsparse.kernels.nm_linear`).
    """
    reason = unsupported_reason(x, values, m)
    if reason:
        raise ValueError(f"the Triton N:M kernels do not support {reason}")
    out_features, slots = values.shape
    groups = slots // n
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    values = values.contiguous()
    indices = indices.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0 or out_features == 0:
        return y.reshape(*lead, out_features)
    if groups == 0:  # in_features == 0: the product is empty, only the bias remains
        y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
        return y.reshape(*lead, out_features)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else values  # never read without a bias
    if path == "auto":
        path = "gemv" if rows <= GEMV_MAX_ROWS else "gemm"
    if path not in ("gemv", "gemm"):
        raise ValueError(f"unknown path {path!r}; accepted: 'auto', 'gemv', 'gemm'")
    # Triton launches on the current CUDA device, not on the tensors' one.
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _launch(path, x2, values, indices, bias_arg, y, n, m, has_bias)
    return y.reshape(*lead, out_features)


def _launch(path: str, x2: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            bias_arg: torch.Tensor, y: torch.Tensor, n: int, m: int, has_bias: bool) -> None:
    rows = x2.shape[0]
    out_features, slots = values.shape
    groups = slots // n
    width = index_width(m)
    if path == "gemv":
        block_o = 32
        block_s = 128
        grid = (rows, triton.cdiv(out_features, block_o))
        _nm_gemv_kernel[grid](
            x2, values, indices, bias_arg, y, out_features, slots,
            x2.stride(0), values.stride(0), indices.stride(0), y.stride(0),
            N=n, M=m, WBITS=width, HAS_BIAS=has_bias, BLOCK_O=block_o, BLOCK_S=block_s,
            num_warps=4)
    else:
        block_b = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_o = 64
        block_g = 64 // m  # a 64-wide reduction tile
        grid = (triton.cdiv(rows, block_b), triton.cdiv(out_features, block_o))
        _nm_gemm_kernel[grid](
            x2, values, indices, bias_arg, y, rows, out_features, groups,
            x2.stride(0), values.stride(0), indices.stride(0), y.stride(0),
            N=n, M=m, WBITS=width, HAS_BIAS=has_bias, BLOCK_B=block_b, BLOCK_O=block_o,
            BLOCK_G=block_g,
            # fp32: exact products like F.linear (no TF32); 16-bit inputs: the precision
            # argument does not apply, "tf32" is Triton's default.
            PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
            DOT_FP32=interpreted() and x2.dtype == torch.bfloat16, num_warps=4, num_stages=2)
