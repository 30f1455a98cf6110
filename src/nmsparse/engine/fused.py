"""The two per-step tensor operations of sparse training, written into existing buffers.

* :func:`refresh_` rebuilds a layer's mask (or, for a fixed mask, re-zeroes the pruned
  weights) and the cached masked weight that forward passes use.
* :func:`add_decay_` adds the SR-STE refinement ``decay * (1 - mask) * W`` to a gradient.

Both write in place: on the CPU, allocating fresh weight-sized tensors every step costs more
than the arithmetic (page faults), so the buffers live as long as the layer.

Three implementations compute the same results:

* the eager path (plain torch ops, the reference), used for small weights and as fallback;
* the native path for CPU weights (float32 and bfloat16; the SR-STE term float32 only): a C++
  pass (:mod:`nmsparse.kernels.cpu.mask_pass`, AVX-512 or AVX2, built on first use like the
  CPU Linear kernels in ~2 s) that reads the weight once and writes mask and masked weight
  once, at about the speed of a copy of the weight (on a 2-core AMD EPYC: the refresh ~3x, the
  SR-STE term ~1.5x as fast as the compiled path below, which it replaces on the CPU, and no
  compile time). Used by default for CPU weights of any size unless the compiled path is
  forced on; ``NMSPARSE_NATIVE_MASKS=0`` (or :func:`set_native`) turns it off. Where it
  cannot build or run, the next path takes the call (:func:`status` says why);
* a fused path built with ``torch.compile`` on first use (never at import), used by default
  for CPU weights of at least :data:`COMPILE_MIN_NUMEL` elements that the native path does
  not take. One pass over the weight writes the mask, the masked weight and the finiteness
  flag, about 10x faster than eager. ``NMSPARSE_COMPILE=0`` / ``=1`` (or :func:`set_compile`)
  forces it off / on (on: every eligible weight, any size, CUDA included, before the native
  path). If compiling or running it raises, nmsparse warns once and stays on the eager path
  for the rest of the process.

How the fused mask kernel is vectorised: the weight is viewed as rows of ``C`` elements (a
multiple of ``M * K`` and of 16 when possible, ``K`` = the grouped axis' stride), so every row
holds whole groups and lane ``c`` of every row has the same position in its group. The rank
of an entry is a sum over the shifted copies ``w[x + d*K]`` (contiguous loads, ``0 < |d| <
M``), each weighted by a small ``(2M-2, C)`` table that is 1 where the neighbour lies in the
same group: no gathers, no integer index arithmetic, no bool tensors (inductor's C++ backend
handles bool vectors ~10x slower than float ones). Shifted loads of the first and last row
would leave the tensor, so those two rows are computed separately on a padded copy.

Exactness: masks are bit-identical to the eager path (same comparisons, same tie rule, same
NaN behaviour; for M > 8, where eager sorts, a non-finite weight is redone eagerly), and so
are masked weights (16-bit NaNs stay NaN but may change payload bits: inductor computes in
float32). :func:`add_decay_` computes ``grad + decay * pruned`` with an exact product
(float64 for float32; float32 for 16-bit types, whose eager kernel rounds ``decay`` to the
dtype) and rounds the sum once, like eager's fused multiply-add: the two differ only if
double rounding hits a tie (observed: 0 of 16.8M entries differ; a plain float32
multiply-then-add differs in ~5k).

Compile cost (2 cores, cold cache): ~10 s for inductor's first use in a process, then per
(N:M, dtype) ~5 s for the 2:4 mask kernel (~9 s for 1:8, ~18 s for 4:16) and ~1 s each for
the decay and fixed-mask kernels; inductor's on-disk cache cuts a warm rerun to ~4 s in all.
Shapes are dynamic: one compile serves every layer shape, layout and kernel stride.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..patterns import NM
from ..patterns.grouping import PAIRWISE_MAX_M

ENV_VAR = "NMSPARSE_COMPILE"
NATIVE_ENV_VAR = "NMSPARSE_NATIVE_MASKS"
# Below this many weight elements the eager path is fast enough; compiling costs seconds.
COMPILE_MIN_NUMEL = 1 << 18
# Each extra group member adds two shifted loads; above M=16 compile time and kernel size grow.
_COMPILE_MAX_M = 16
_COMPILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Inductor realises (writes to memory) big reused expressions; for the rank sum that means a
# weight-sized bool buffer, which costs more than recomputing it, so raise those thresholds.
_INDUCTOR_OPTIONS = {"realize_acc_reads_threshold": 1 << 20, "realize_opcount_threshold": 1 << 20,
                     "realize_reads_threshold": 1 << 20}

_forced: bool | None = None  # set_compile(); None: follow the environment variable
_native_forced: bool | None = None  # set_native(); None: follow NMSPARSE_NATIVE_MASKS
_native_module: types.ModuleType | None = None
_broken = False  # a compile or compiled call failed: eager for the rest of the process
_kernels: dict[tuple, Callable] = {}
_tables: dict[tuple, torch.Tensor] = {}
_decays: dict[tuple, torch.Tensor] = {}


def set_compile(enabled: bool | None) -> None:
    """Force the fused ``torch.compile`` path on (``True``) or off (``False``); ``None``
    restores the default (``NMSPARSE_COMPILE`` if set, else automatic by size and device)."""
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_compile takes True, False or None, got {enabled!r}")
    _forced = enabled


def compile_mode() -> bool | None:
    """``True`` (forced on), ``False`` (forced off) or ``None`` (automatic)."""
    if _forced is not None:
        return _forced
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    return None


def set_native(enabled: bool | None) -> None:
    """Turn the native C++ path for CPU weights off (``False``) or on (``True``, the default
    where it builds); ``None`` follows ``NMSPARSE_NATIVE_MASKS`` again."""
    global _native_forced
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_native takes True, False or None, got {enabled!r}")
    _native_forced = enabled


def native_mode() -> bool:
    """Whether the native path may run (it still needs a CPU it builds for)."""
    if _native_forced is not None:
        return _native_forced
    return os.environ.get(NATIVE_ENV_VAR, "").strip().lower() not in ("0", "false", "off", "no")


def status() -> dict[str, int | bool | str | None]:
    """How many compiled kernels exist, whether a failure switched them to eager for good,
    and ``native``: ``None`` if the native CPU path runs here, else why not."""
    if not native_mode():
        native = f"turned off ({NATIVE_ENV_VAR}=0 or set_native(False))"
    else:
        native = _native_pass().reason()
    return {"kernels": len(_kernels), "broken": _broken, "native": native}


def _native_pass() -> types.ModuleType:
    global _native_module
    if _native_module is None:
        # lazy: importing the CPU kernels' package costs ~60 ms; the library builds on first use
        from ..kernels.cpu import mask_pass

        _native_module = mask_pass
    return _native_module


def _wants_native(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and compile_mode() is not True and native_mode()
            and not torch.compiler.is_compiling())


def _wants_compiled(weight: torch.Tensor) -> bool:
    if _broken or torch.compiler.is_compiling():
        return False
    mode = compile_mode()
    if mode is None:
        return weight.device.type == "cpu" and weight.numel() >= COMPILE_MIN_NUMEL
    return mode


def _disable(error: BaseException) -> None:
    global _broken
    _broken = True
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    warnings.warn(f"nmsparse: the compiled mask kernels failed ({type(error).__name__}: "
                  f"{reason}); using the eager path from now on (set {ENV_VAR}=0 to skip "
                  "compiling)", RuntimeWarning, stacklevel=3)


def _flat(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` as a flat non-view alias (of ``dtype``, same element size): dynamo guards on
    a view's base shapes, which would recompile for every layer shape."""
    if dtype is not None:
        tensor = tensor.view(dtype)
    return tensor.view(-1).detach()


def _row_plan(weight: torch.Tensor, m: int, layout: str) -> tuple[int, int] | None:
    """``(K, C)``: the grouped axis' stride and the row length, or None if not eligible."""
    k = math.prod(weight.shape[2:]) if layout == "in" else 1
    base = m * k
    numel = weight.numel()
    if numel % base:
        return None
    row = math.lcm(base, 16)  # whole vectors per row when the size allows it
    if numel % row:
        row = base
    # >= 2 interior rows: a size of 1 would make dynamo specialise and recompile.
    return (k, row) if numel // row >= 4 else None


def _fits(weight: torch.Tensor, mask: torch.Tensor, other: torch.Tensor) -> bool:
    """The kernels' layout assumptions: contiguous, same shape and device, a bool mask."""
    return (weight.dtype in _COMPILE_DTYPES and other.dtype == weight.dtype
            and mask.dtype == torch.bool
            and all(t.shape == weight.shape and t.device == weight.device and t.is_contiguous()
                    for t in (weight, mask, other)))


def _table(m: int, k: int, row: int, device: torch.device) -> torch.Tensor:
    """``(2m-2, row)`` float: 1 where lane c's neighbour at shift d*k is in c's group."""
    key = (m, k, row, device)
    if key not in _tables:
        position = (torch.arange(row) // k) % m
        shifts = [d for d in range(1 - m, m) if d]
        _tables[key] = torch.stack([((position + d >= 0) & (position + d < m)).float()
                                    for d in shifts]).to(device)
    return _tables[key]


def _kernel(kind: str, dtype: torch.dtype, *params) -> Callable:
    """The compiled kernel ``kind`` for ``dtype`` and ``params``, built on first use."""
    full_key = (kind, dtype, *params)
    if full_key not in _kernels:
        source = {"refresh": _refresh_source, "fixed": _fixed_source, "decay": _decay_source}
        fn = source[kind](torch.finfo(dtype).max, dtype, *params)
        # A fresh code object per key: dynamo caps cache entries per code object (8), and
        # patterns x dtypes x layouts could exceed that and silently run uncompiled.
        fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, f"nmsparse_{kind}",
                                fn.__defaults__, fn.__closure__)
        _kernels[full_key] = torch.compile(fn, dynamic=True, fullgraph=True,
                                           options=_inductor_options())
    return _kernels[full_key]


def _inductor_options() -> dict:
    from torch._inductor import config  # lazy: importing inductor takes ~1 s

    return {k: v for k, v in _INDUCTOR_OPTIONS.items() if hasattr(config, k)}


def _bad_entries(values: torch.Tensor, fmax: float) -> torch.Tensor:
    # 1.0 for NaN/Inf, else 0.0; float arithmetic vectorises, bool isfinite does not. Not
    # w * 0: inductor folds that to 0.
    return torch.where(values.float().abs() <= fmax, 0.0, 1.0)


def _rank_keep(center: torch.Tensor, neighbours: list[tuple[int, torch.Tensor]],
               table: torch.Tensor, n: int) -> torch.Tensor:
    """keep = rank < n, rank = #group members that beat the entry (larger, or equal and
    earlier): the comparisons of masks.keep_largest, so ties and NaN behave the same."""
    a = center.float().abs()
    rank = None
    for row, (d, neighbour) in enumerate(neighbours):
        b = neighbour.float().abs()
        beats = (b >= a) if d < 0 else (b > a)
        term = torch.where(beats, table[row], 0.0)
        rank = term if rank is None else rank + term
    return rank < n


def _refresh_source(fmax: float, dtype: torch.dtype, n: int, m: int) -> Callable:
    def refresh(flat, mask8, masked, table, k: int):
        # flat: (L,) weight; mask8 / masked: rows 1..R-2 of the outputs as (R-2, C). All
        # sizes derive from mask8's so that every row loop has the same symbolic bounds.
        length = flat.shape[0]
        rows, row = mask8.shape
        center = flat[row:row + rows * row].view(rows, row)
        neighbours = [(d, flat[row + d * k:row + d * k + rows * row].view(rows, row))
                      for d in range(1 - m, m) if d]
        keep = _rank_keep(center, neighbours, table, n)
        mask8.copy_(torch.where(keep, 1.0, 0.0).to(torch.uint8))
        masked.copy_(torch.where(keep, center, 0))
        # First and last row: neighbours from a zero-padded copy (the table masks them).
        edges = torch.cat([flat[:row], flat[length - row:]]).view(2, row)
        pad = (m - 1) * k
        padded = F.pad(edges, (pad, pad))
        edge_neighbours = [(d, padded[:, pad + d * k:pad + d * k + row])
                           for d in range(1 - m, m) if d]
        edge_keep = _rank_keep(edges, edge_neighbours, table, n)
        bad = torch.maximum(_bad_entries(center, fmax).amax(1).amax(),
                            _bad_entries(edges, fmax).amax())
        return (bad == 0, torch.where(edge_keep, 1.0, 0.0).to(torch.uint8),
                torch.where(edge_keep, edges, 0))

    return refresh


def _fixed_source(fmax: float, dtype: torch.dtype) -> Callable:
    def fixed(flat, mask8, masked):
        finite = _bad_entries(flat, fmax).amax() == 0
        kept = torch.where(mask8.float() != 0, flat, 0)
        masked.copy_(kept)
        flat.copy_(kept)
        return finite

    return fixed


def _decay_source(fmax: float, dtype: torch.dtype) -> Callable:
    # decay * pruned must be exact, so that the sum is rounded once as in eager's fused
    # multiply-add: float64 for float32; for 16-bit types eager rounds decay to the dtype
    # and float32 holds the product of two 8/11-bit mantissas exactly.
    wide = torch.float64 if dtype == torch.float32 else torch.float32

    def decay_(grad, flat, mask8, decay):
        pruned = torch.where(mask8.float() != 0, 0.0, flat.float())
        total = grad.to(wide) + pruned.to(wide) * decay.to(wide)
        grad.copy_(total.float().to(grad.dtype))

    return decay_


def _refresh_compiled(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor,
                      pattern: NM, plan: tuple[int, int]) -> torch.Tensor:
    k, row = plan
    flat, mask8, masked_flat = _flat(weight), _flat(mask, torch.uint8), _flat(masked)
    length = flat.numel()
    kernel = _kernel("refresh", weight.dtype, pattern.n, pattern.m)
    finite, edge_mask, edge_masked = kernel(
        flat, mask8[row:length - row].view(-1, row).detach(),
        masked_flat[row:length - row].view(-1, row).detach(),
        _table(pattern.m, k, row, weight.device), k)
    mask8[:row].copy_(edge_mask[0])
    mask8[length - row:].copy_(edge_mask[1])
    masked_flat[:row].copy_(edge_masked[0])
    masked_flat[length - row:].copy_(edge_masked[1])
    if pattern.m > PAIRWISE_MAX_M and not bool(finite):
        # Eager's stable sort ranks NaN above +inf, pairwise comparisons cannot; the step is
        # about to fail on the NaN anyway, so redo it eagerly for identical masks.
        return _refresh_eager(weight, mask, masked, pattern, True)
    return finite


def _refresh_eager(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor,
                   pattern: NM, recompute: bool) -> torch.Tensor:
    finite = torch.isfinite(weight).all()
    if recompute:
        mask.copy_(pattern.mask(weight.abs()))
    else:
        weight.masked_fill_(mask.logical_not(), 0)
    torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device),
                out=masked)
    return finite


def _refresh_native(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor,
                    pattern: NM, recompute: bool) -> torch.Tensor | None:
    native = _native_pass()
    if not recompute:
        return native.fixed(weight, mask, masked)
    stride = math.prod(weight.shape[2:]) if pattern.layout == "in" else 1
    finite = native.refresh(weight, mask, masked, pattern.n, pattern.m, stride)
    if finite is not None and pattern.m > PAIRWISE_MAX_M and not bool(finite):
        # as in _refresh_compiled: eager's sort ranks NaN above +inf, comparisons cannot
        return _refresh_eager(weight, mask, masked, pattern, True)
    return finite


def refresh_(weight: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, pattern: NM,
             recompute: bool) -> torch.Tensor:
    """Update ``mask`` (if ``recompute``) and ``masked = W * mask``; returns "all finite".

    With ``recompute=False`` the mask is authoritative and pruned weights are set to 0.
    The returned 0-d bool tensor lets callers check many layers with one host sync.
    """
    with torch.no_grad():
        if _wants_native(weight) and _fits(weight, mask, masked):
            finite = _refresh_native(weight, mask, masked, pattern, recompute)
            if finite is not None:
                return finite
        if _wants_compiled(weight) and _fits(weight, mask, masked):
            try:
                if not recompute:
                    kernel = _kernel("fixed", weight.dtype)
                    return kernel(_flat(weight), _flat(mask, torch.uint8), _flat(masked))
                plan = _row_plan(weight, pattern.m, pattern.layout)
                if plan is not None and pattern.m <= _COMPILE_MAX_M:
                    return _refresh_compiled(weight, mask, masked, pattern, plan)
            except Exception as error:  # any compile/runtime failure: eager for good
                _disable(error)
        return _refresh_eager(weight, mask, masked, pattern, recompute)


def _decay_tensor(decay: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (decay, dtype, device)
    if key not in _decays:
        # Eager CPU add_(alpha=) rounds alpha to the tensor's dtype (bf16 too) first.
        _decays[key] = torch.tensor(decay, dtype=dtype).double().to(device)
    return _decays[key]


def add_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
               decay: float) -> None:
    """``grad += decay * (1 - mask) * weight``, in place."""
    with torch.no_grad():
        if (_wants_native(weight) and _fits(weight, mask, grad)
                and _native_pass().add_decay(grad, weight, mask, decay)):
            return
        if _wants_compiled(weight) and _fits(weight, mask, grad):
            try:
                _kernel("decay", weight.dtype)(_flat(grad), _flat(weight),
                                               _flat(mask, torch.uint8),
                                               _decay_tensor(decay, grad.dtype, weight.device))
                return
            except Exception as error:
                _disable(error)
        pruned_weight = torch.where(mask, torch.zeros((), dtype=weight.dtype,
                                                      device=weight.device), weight)
        grad.add_(pruned_weight.to(grad.dtype), alpha=decay)
