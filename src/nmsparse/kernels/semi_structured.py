"""2:4 sparse tensor cores for finalized models: ``accelerate(model)``.

PyTorch ships 2:4 ("semi-structured") sparse matmuls for NVIDIA GPUs with compute capability
8.0 or newer through a tensor subclass (``torch.sparse.to_sparse_semi_structured``), with two
backends: cuSPARSELt (``SparseSemiStructuredTensorCUSPARSELT``, the default) and CUTLASS
(``SparseSemiStructuredTensorCUTLASS``, what ``SparseSemiStructuredTensor._FORCE_CUTLASS = True``
selects). :func:`accelerate` replaces, in place, the eligible ``nn.Linear`` layers of a
*finalized* 2:4 model (``nmsparse.finalize``: pruned weights are exact zeros) by
:class:`SemiStructuredLinear`, which holds the compressed weight of the chosen backend.

    nmsparse.finalize(model)
    model.to("cuda", torch.bfloat16)
    report = accelerate(model)             # backend="auto" | "cusparselt" | "cutlass"
    print(report)                          # per layer: converted / skipped and why, backend

What is checked, and why:

* PyTorch's compression does not check the pattern: a group of 4 with 3 non-zeros is silently
  compressed into garbage. Every weight is verified first (:func:`verify_2to4`: at most 2
  non-zeros in every group of 4 along the input dim); a violating layer stays dense with the
  reason, or ``strict=True`` raises :class:`nmsparse.NMViolationError` before anything changed.
* The kernels take fp16 / bf16 and weights whose rows and columns are multiples of a
  per-backend, per-dtype tile (:func:`tile_rule`, read from PyTorch's
  ``_DTYPE_SHAPE_CONSTRAINTS`` with the 2.13 values as fallback: cuSPARSELt 16 x 16, CUTLASS
  32 x 64). Other shapes are zero-padded when that adds at most ``max_padding`` (default 12.5 %)
  to the weight (zero rows and columns keep the 2:4 pattern; the extra outputs are sliced off
  and the input is zero-padded per call), else the layer stays dense with the reason. The rows
  of the input (tokens) are padded to the backend's multiple (8) here, whatever the PyTorch
  version does internally.
* Each backend is probed once per device and dtype with a tiny matmul against the dense result
  (PyTorch's CUTLASS kernel source checks for compute capability 8.x, so on H100 that backend
  is expected to be reported unusable rather than to give results),
  and, with ``check_outputs=True``, every converted layer is compared with its dense product
  on random input: a mismatch keeps the layer dense.
* ``backend="auto"`` times both backends on each distinct weight shape (``tune_tokens`` rows of
  input, default 16, median of CUDA-event timings; the choice is cached per shape) and keeps
  the faster; the report records the choice and the timings per layer. Pass the row count
  that matters (``tune_tokens=1`` for decoding) since the faster backend can depend on it.

:class:`SemiStructuredLinear` takes inputs of any number of leading dims (reshaped to 2-D
around the sparse matmul). It is for inference: the weight gets no gradient.

The pure parts (verification, tile and padding rules, the plan, the report) run on any device
and are what :func:`plan` returns without a GPU. On a machine without CUDA, or a GPU older than
compute capability 8.0, :func:`accelerate` raises ``RuntimeError`` saying so.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..check import NMViolationError
from ..engine.sparse_module import original_class, sparse_states
from ..patterns import NM
from ..tables import format_table
from ._eligibility import not_asked, shared_parameters, structural_reason

BACKENDS = ("auto", "cusparselt", "cutlass")
KERNEL_BACKENDS = ("cusparselt", "cutlass")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
DEFAULT_MAX_PADDING = 0.125
# Normalised error (max |sparse - dense| / max |dense|) a converted layer may show. Both paths
# accumulate in fp32, so the difference is output rounding: far below these; garbage from a
# wrong compression is of order 1.
_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
_PROTOTYPE_WARNING = "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"


# --------------------------------------------------------------------------------------------
# 2:4 verification


@dataclass(frozen=True)
class PatternCheck:
    """Result of :func:`verify_2to4` on one weight."""

    groups: int
    violating: int
    max_nonzeros: int
    first: tuple[int, int] | None = None  # (row, first column) of the first bad group

    @property
    def ok(self) -> bool:
        return self.violating == 0

    def __bool__(self) -> bool:
        return self.ok

    def describe(self) -> str:
        if self.ok:
            return f"2:4 along the input dim ({self.groups} groups of 4)"
        row, col = self.first or (0, 0)
        return (f"not 2:4 along the input dim: {self.violating} of {self.groups} groups of 4 "
                f"hold more than 2 non-zeros (up to {self.max_nonzeros}), the first at row "
                f"{row}, columns {col}..{col + 3}")


TWO_FOUR = NM(2, 4)


def verify_2to4(weight: torch.Tensor) -> PatternCheck:
    """Count the groups of 4 consecutive entries along dim 1 of a 2-D ``weight`` that hold more
    than 2 non-zeros (NaN counts as non-zero). Works on any device."""
    if weight.dim() != 2:
        raise ValueError(f"verify_2to4 takes a 2-D (out, in) weight, got shape "
                         f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"input dim {cols} of weight shape {tuple(weight.shape)} is not a "
                         "multiple of 4: it has no 2:4 groups")
    if weight.numel() == 0:
        return PatternCheck(0, 0, 0)
    counts = TWO_FOUR.kept_per_group(weight.detach())  # (rows, cols // 4): the pattern's groups
    bad = counts > 2
    # One device-to-host copy for both numbers.
    violating, worst = torch.stack([bad.sum(), counts.max()]).tolist()
    first = None
    if violating:
        row, group = bad.nonzero()[0].tolist()
        first = (row, 4 * group)
    return PatternCheck(counts.numel(), violating, worst, first)


# --------------------------------------------------------------------------------------------
# Tile and padding rules


@dataclass(frozen=True)
class TileRule:
    """Shape constraints of one backend for one dtype."""

    rows: int  # weight rows (output features): a positive multiple of this
    cols: int  # weight columns (input features): a positive multiple of this
    tokens: int  # input rows are padded to a multiple of this


# PyTorch 2.13's SparseSemiStructuredTensor{CUSPARSELT,CUTLASS}._DTYPE_SHAPE_CONSTRAINTS for
# fp16 / bf16, used when the class or its table is missing (a future PyTorch).
_FALLBACK_RULES = {
    "cusparselt": {torch.float16: TileRule(16, 16, 8), torch.bfloat16: TileRule(16, 16, 8)},
    "cutlass": {torch.float16: TileRule(32, 64, 8), torch.bfloat16: TileRule(32, 64, 8)},
}
_CLASS_NAMES = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
                "cutlass": "SparseSemiStructuredTensorCUTLASS"}


def _backend_class(backend: str) -> type | None:
    return getattr(torch.sparse, _CLASS_NAMES[backend], None)


def _check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> str:
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; accepted: "
                         f"{', '.join(repr(b) for b in allowed)}")
    return backend


def tile_rule(backend: str, dtype: torch.dtype) -> TileRule | None:
    """The tile of ``backend`` ("cusparselt" or "cutlass") for ``dtype``, or None if
    :func:`accelerate` does not convert that dtype (only fp16 and bf16)."""
    _check_backend(backend, KERNEL_BACKENDS)
    if dtype not in SUPPORTED_DTYPES:
        return None
    table = getattr(_backend_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    entry = table.get(dtype)
    if entry is not None:
        try:
            return TileRule(int(entry.sparse_min_rows), int(entry.sparse_min_cols),
                            int(entry.dense_min_rows))
        except AttributeError:  # the table changed shape: fall back to the known values
            pass
    return _FALLBACK_RULES[backend].get(dtype)


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


@dataclass(frozen=True)
class ShapePlan:
    """How one weight goes to one backend: its shape and the padded shape the kernel gets."""

    backend: str
    shape: tuple[int, int]  # (out, in)
    padded: tuple[int, int]
    rule: TileRule

    @property
    def is_padded(self) -> bool:
        return self.padded != self.shape

    @property
    def overhead(self) -> float:
        """Extra weight entries from padding, as a fraction of the weight."""
        return math.prod(self.padded) / math.prod(self.shape) - 1.0


def plan_shape(shape: tuple[int, int], dtype: torch.dtype, backend: str,
               max_padding: float = DEFAULT_MAX_PADDING) -> ShapePlan | str:
    """A :class:`ShapePlan` for a weight of ``shape`` (out, in) and ``dtype`` on ``backend``,
    or the reason it cannot be converted (a string)."""
    rows, cols = shape
    if dtype not in SUPPORTED_DTYPES:
        return (f"dtype {str(dtype).removeprefix('torch.')}: the 2:4 kernels take float16 or "
                "bfloat16 (cast the model, e.g. model.to(torch.bfloat16))")
    rule = tile_rule(backend, dtype)
    if rule is None:
        return f"the {backend} backend has no kernel for {dtype}"
    if rows == 0 or cols == 0:
        return "empty weight"
    if cols % 4:
        return f"input dim {cols} is not a multiple of 4, so it has no 2:4 groups"
    padded = (_round_up(rows, rule.rows), _round_up(cols, rule.cols))
    plan = ShapePlan(backend, (rows, cols), padded, rule)
    if plan.overhead > max_padding:
        return (f"too small for {backend} tiles ({rule.rows}x{rule.cols}): {rows}x{cols} would "
                f"be padded to {padded[0]}x{padded[1]} (+{plan.overhead:.1%} > max_padding "
                f"{max_padding:.1%})")
    return plan


def capability_error(capability: tuple[int, int], name: str = "this GPU") -> str | None:
    """Why a GPU of ``capability`` cannot run the 2:4 kernels, or None if it can."""
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"{name} has compute capability {capability[0]}.{capability[1]}; 2:4 sparse tensor "
            f"cores need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (A100, A10, L4, "
            "H100, ...)")


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class LayerResult:
    """One ``nn.Linear`` of the model: converted (with its backend) or why it stayed dense."""

    name: str
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype
    status: str = "skipped"  # "converted", "eligible" (plan only) or "skipped"
    backend: str = ""
    reason: str = ""
    padded: tuple[int, int] | None = None
    timings_us: dict[str, float] = field(default_factory=dict)

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    def note(self) -> str:
        parts = [self.reason] if self.reason else []
        if self.padded and self.padded != self.shape:
            parts.append(f"padded to {self.padded[0]}x{self.padded[1]}")
        if self.timings_us:
            parts.append("timed " + ", ".join(f"{b} {t:.1f} us"
                                              for b, t in self.timings_us.items()))
        return "; ".join(parts)


@dataclass
class AccelerateReport:
    """What :func:`accelerate` (or :func:`plan`) did with every ``nn.Linear`` of the model."""

    backend: str
    layers: list[LayerResult] = field(default_factory=list)
    device: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. a backend that cannot run here

    @property
    def converted(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.status == "skipped"]

    def table(self) -> str:
        rows = [[layer.name, "x".join(map(str, layer.shape)),
                 str(layer.dtype).removeprefix("torch."), layer.status,
                 layer.backend or "-", layer.note()] for layer in self.layers]
        return format_table(["layer", "shape", "dtype", "status", "backend", "note"], rows)

    def __str__(self) -> str:
        done = len(self.converted)
        eligible = sum(layer.status == "eligible" for layer in self.layers)
        what = (f"{done} of {len(self.layers)} Linear layer(s) converted to 2:4 "
                f"semi-structured" if not eligible else
                f"{eligible} of {len(self.layers)} Linear layer(s) eligible for 2:4 "
                "semi-structured (plan only, nothing converted)")
        where = f" on {self.device}" if self.device else ""
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return f"accelerate: {what}, backend={self.backend}{where}{notes}\n{self.table()}"


# --------------------------------------------------------------------------------------------
# The module


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """Compress a 2:4 CUDA ``weight`` with ``backend``: ``<class>.from_dense``, the same as
    ``to_sparse_semi_structured`` with ``SparseSemiStructuredTensor._FORCE_CUTLASS`` set for
    CUTLASS, without touching that global flag. Does not check the pattern."""
    cls = _backend_class(_check_backend(backend, KERNEL_BACKENDS))
    if cls is None:
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no "
                           f"torch.sparse.{_CLASS_NAMES[backend]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PROTOTYPE_WARNING)
        return cls.from_dense(weight.contiguous())


class SemiStructuredLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` a (padded) PyTorch semi-structured sparse tensor.

    ``x`` may have any number of leading dims; it is reshaped to 2-D, its rows padded to the
    backend's multiple and its columns to the padded weight, and the result sliced back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int, backend: str, token_multiple: int = 8) -> None:
        super().__init__()
        padded_out, padded_in = weight.shape
        if padded_out < out_features or padded_in < in_features:
            raise ValueError(f"weight of shape {tuple(weight.shape)} is smaller than "
                             f"{out_features}x{in_features}")
        if bias is not None and tuple(bias.shape) != (padded_out,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match the padded "
                             f"weight's {padded_out} rows")
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in = padded_in
        self.padded_out = padded_out
        self.backend = backend
        self.token_multiple = max(1, int(token_multiple))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: ShapePlan,
                    convert: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                    ) -> SemiStructuredLinear:
        """Pad ``linear``'s weight (and bias) to ``plan.padded`` and compress it with
        ``convert(weight, backend)`` (default :func:`to_semi_structured`). The weight is not
        verified here (see :func:`accelerate`).
        """
        convert = convert or to_semi_structured
        weight = linear.weight.detach()
        rows, cols = plan.shape
        if tuple(weight.shape) != (rows, cols):
            raise ValueError(f"plan for {rows}x{cols} given a weight of shape "
                             f"{tuple(weight.shape)}")
        padded_rows, padded_cols = plan.padded
        if plan.is_padded:
            # Zero rows / columns keep every group of 4 at <= 2 non-zeros.
            weight = F.pad(weight, (0, padded_cols - cols, 0, padded_rows - rows))
        bias = None
        if linear.bias is not None:
            bias = linear.bias.detach().to(weight.dtype)  # the kernels want one dtype
            bias = F.pad(bias, (0, padded_rows - rows)).contiguous()
        return cls(convert(weight.contiguous(), plan.backend), bias, cols, rows,
                   plan.backend, plan.rule.tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(x.shape)} does not match in_features="
                             f"{self.in_features}")
        dtype = self.weight.dtype
        if x.dtype != dtype:
            if not _autocast_enabled(x.device.type):
                raise RuntimeError(f"input dtype {x.dtype} differs from the layer's {dtype} "
                                   "(semi-structured kernels take one dtype)")
            x = x.to(dtype)  # what autocast does for the dense layer
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if rows == 0:
            return x.new_zeros(*lead, self.out_features, dtype=dtype)
        pad_cols = self.padded_in - self.in_features
        pad_rows = -rows % self.token_multiple
        if pad_cols or pad_rows:
            x2 = F.pad(x2, (0, pad_cols, 0, pad_rows))
        y = F.linear(x2.contiguous(), self.weight, self.bias)
        if pad_rows or self.padded_out != self.out_features:
            y = y[:rows, :self.out_features]
        # Some backends return a transposed view; nn.Linear's output is contiguous and code
        # after it may .view() it.
        return y.contiguous().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        padded = (f", padded={self.padded_out}x{self.padded_in}"
                  if (self.padded_out, self.padded_in) != (self.out_features, self.in_features)
                  else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}{padded}")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # an older signature without the device type (CUDA only)
        return device_type == "cuda" and bool(torch.is_autocast_enabled())


# --------------------------------------------------------------------------------------------
# Planning (pure: no GPU needed)


@dataclass
class _Job:
    result: LayerResult
    module: nn.Linear
    plans: list[ShapePlan]


def _check_finalized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if sparse_states(module) or original_class(module) is not type(module):
            raise ValueError(f"layer {name or '(model)'!r} is still sparsified by nmsparse "
                             "(masks not baked in): call nmsparse.finalize(model) first")


def _plan(model: nn.Module, backend: str, left_out: dict[str, str], strict: bool,
          max_padding: float, devices: bool) -> tuple[AccelerateReport, list[_Job]]:
    _check_backend(backend)
    if not max_padding >= 0:
        raise ValueError(f"max_padding must be >= 0, got {max_padding!r}")
    _check_finalized(model)
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to accelerate")
    parents = dict(model.named_modules())
    shared = shared_parameters(model)
    candidates = list(KERNEL_BACKENDS) if backend == "auto" else [backend]
    report = AccelerateReport(backend)
    jobs: list[_Job] = []
    violations: list[str] = []
    for name, module in linears:
        weight = module.weight
        result = LayerResult(name or "(model)", tuple(weight.shape), weight.dtype)
        report.layers.append(result)
        if name in left_out:
            result.reason = left_out[name]
            continue
        parent = parents.get(name.rpartition(".")[0]) if name else None
        reason = (structural_reason(module, parent, shared) if name else
                  "the model itself is an nn.Linear: wrap it in a container (nn.Sequential)")
        if reason is None and devices and weight.device.type != "cuda":
            reason = f"weight is on {weight.device}, not on a CUDA device"
        if reason:
            result.reason = reason
            continue
        plans, reasons = [], []
        for choice in candidates:
            outcome = plan_shape(result.shape, weight.dtype, choice, max_padding)
            if isinstance(outcome, ShapePlan):
                plans.append(outcome)
            elif outcome not in reasons:
                reasons.append(outcome)
        if not plans:
            # With "auto" the first (cuSPARSELt, the smaller tile) reason is the binding one.
            result.reason = reasons[0]
            continue
        check = verify_2to4(weight)
        if not check.ok:
            result.reason = check.describe()
            violations.append(f"{result.name}: {check.describe()}")
            continue
        result.status = "eligible"
        if len(plans) == 1:
            result.backend, result.padded = plans[0].backend, plans[0].padded
        jobs.append(_Job(result, module, plans))
    if strict and violations:
        raise NMViolationError("accelerate(strict=True): nothing was converted, "
                               f"{len(violations)} layer(s) are not 2:4:\n" + "\n".join(violations))
    return report, jobs


def plan(model: nn.Module, *, backend: str = "auto",
         filter_fn: Callable[[str, nn.Module], bool] | None = None, strict: bool = False,
         max_padding: float = DEFAULT_MAX_PADDING, include: str | Sequence[str] | None = None,
         exclude: str | Sequence[str] | None = None) -> AccelerateReport:
    """What :func:`accelerate` would convert, computed on any device without changing the
    model: every ``nn.Linear`` is "eligible" or "skipped" with the reason (2:4 verification,
    dtype, tile and padding rules, include/exclude, structure). Backend availability and
    timing need the GPU and are not part of the plan."""
    left_out = not_asked(model, TWO_FOUR, include, exclude, filter_fn, "plan")
    report, _ = _plan(model, backend, left_out, strict, max_padding, devices=False)
    return report


# --------------------------------------------------------------------------------------------
# GPU parts

_PROBES: dict[tuple[str, str, torch.dtype], str | None] = {}


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.float().abs().max().clamp_min(1e-6)
    return float((out.float() - ref.float()).abs().max() / scale)


def backend_error(backend: str, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why ``backend`` cannot run 2:4 matmuls of ``dtype`` on ``device`` (a CUDA device,
    default the current one), or None if it can: a tiny compress + matmul compared with the
    dense product, cached per (backend, device, dtype)."""
    _check_backend(backend, KERNEL_BACKENDS)
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    device = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (backend, str(device), dtype)
    if key not in _PROBES:
        _PROBES[key] = _probe(backend, device, dtype)
    return _PROBES[key]


def _probe(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    error = capability_error(torch.cuda.get_device_capability(device),
                             torch.cuda.get_device_name(device))
    if error:
        return error
    if backend == "cusparselt":
        available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", None)
        if available is not None and not available():
            return ("this PyTorch build has no cuSPARSELt "
                    "(torch.backends.cusparselt.is_available() is False)")
    rule = tile_rule(backend, dtype)
    if rule is None:
        return f"no {backend} kernel for {dtype}"
    rows, cols = _round_up(64, rule.rows), _round_up(128, rule.cols)
    generator = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator)
    weight = (weight * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(cols // 4)).to(device, dtype)
    x = torch.randn(rule.tokens, cols, generator=generator).to(device, dtype)
    try:
        with torch.no_grad():
            out = F.linear(x, to_semi_structured(weight, backend))
            error_value = _relative_error(out, F.linear(x, weight))
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure means "this backend cannot run here"
        return f"{backend} failed on {torch.cuda.get_device_name(device)}: {_short(exc)}"
    if not error_value <= _TOLERANCE[dtype]:
        return f"{backend} gave wrong results on a test matmul (relative error {error_value:.2g})"
    return None


def _require_cuda(model: nn.Module) -> list[torch.device]:
    devices = {module.weight.device for module in model.modules()
               if isinstance(module, nn.Linear)
               and not isinstance(module.weight, nn.parameter.UninitializedParameter)}
    if not devices:
        raise ValueError("the model has no (initialized) nn.Linear layer to accelerate")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "accelerate needs an NVIDIA GPU with compute capability >= 8.0 (2:4 sparse tensor "
            f"cores), but torch.cuda.is_available() is False (torch {torch.__version__}); the "
            "model is left unchanged")
    cuda = sorted((d for d in devices if d.type == "cuda"), key=str)
    if not cuda:
        where = ", ".join(sorted(str(d) for d in devices))
        raise RuntimeError(f"accelerate needs the model on a CUDA GPU, its Linear layers are on "
                           f"{where}: move it first (model.cuda()); the model is left unchanged")
    for device in cuda:
        error = capability_error(torch.cuda.get_device_capability(device),
                                 f"{torch.cuda.get_device_name(device)} ({device})")
        if error:
            raise RuntimeError(f"accelerate: {error}; the model is left unchanged")
    return cuda


def _time_us(module: nn.Module, x: torch.Tensor, iterations: int = 20) -> float:
    """Median CUDA-event time of ``module(x)`` in microseconds, after a warm-up."""
    with torch.no_grad():
        for _ in range(3):
            module(x)
        samples = []
        for _ in range(iterations):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            module(x)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(samples)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # Every place the module sits (a module reused under two names is replaced in both).
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)


def accelerate(model: nn.Module, *, backend: str = "auto",
               filter_fn: Callable[[str, nn.Module], bool] | None = None, strict: bool = False,
               max_padding: float = DEFAULT_MAX_PADDING, tune_tokens: int = 16,
               check_outputs: bool = True, include: str | Sequence[str] | None = None,
               exclude: str | Sequence[str] | None = None) -> AccelerateReport:
    """Convert, in place, the eligible ``nn.Linear`` layers of a finalized 2:4 ``model`` (on a
    CUDA GPU of compute capability >= 8.0) to :class:`SemiStructuredLinear`.

    Args:
        backend: ``"cusparselt"``, ``"cutlass"`` or ``"auto"`` (time both on each distinct
            weight shape with ``tune_tokens`` input rows, keep the faster).
        include / exclude: globs on layer names, as in every verb (a glob matching no
            eligible layer is an error); ``filter_fn(name, module)`` is deprecated.
        strict: raise :class:`nmsparse.NMViolationError` (before converting anything) when a
            candidate layer is not 2:4, instead of leaving it dense.
        max_padding: largest fraction of zero rows/columns added to fit the kernels' tiles.
        check_outputs: compare every converted layer with its dense product on random input;
            a mismatch keeps the layer dense.

    Returns an :class:`AccelerateReport` (``print`` it). Raises ``RuntimeError`` without CUDA,
    when the model is not on a CUDA device, on a GPU older than compute capability 8.0, or when
    the explicitly requested backend cannot run there; ``ValueError`` for a model that is still
    sparsified (not finalized) or has no ``nn.Linear``. Nothing is changed when it raises.
    """
    _check_backend(backend)
    if tune_tokens < 1:
        raise ValueError(f"tune_tokens must be >= 1, got {tune_tokens}")
    left_out = not_asked(model, TWO_FOUR, include, exclude, filter_fn, "accelerate")
    devices = _require_cuda(model)
    report, jobs = _plan(model, backend, left_out, strict, max_padding, devices=True)
    report.device = ", ".join(f"{torch.cuda.get_device_name(d)} ({d})" for d in devices)
    # Probe what the jobs need before converting anything: an explicit backend that cannot run
    # here is an error, not a model that silently stays dense.
    for job in jobs:
        device, dtype = job.module.weight.device, job.result.dtype
        usable = []
        for shape_plan in job.plans:
            error = backend_error(shape_plan.backend, device, dtype)
            if error is None:
                usable.append(shape_plan)
                continue
            if backend != "auto":
                raise RuntimeError(f"accelerate(backend={backend!r}): {error}; the model is "
                                   "left unchanged (try backend='auto')")
            note = f"{shape_plan.backend} not used for {str(dtype).removeprefix('torch.')} " \
                   f"on {device}: {error}"
            if note not in report.notes:
                report.notes.append(note)
        if not usable:
            job.result.reason = "no backend can run here (see the notes above)"
        job.plans = usable
    choices: dict[tuple, tuple[str, str]] = {}
    for job in jobs:
        _convert(model, job, choices, tune_tokens, check_outputs)
    if not report.converted:
        warnings.warn(f"accelerate converted no layer:\n{report}", stacklevel=2)
    return report


def _build(linear: nn.Linear, plans: list[ShapePlan], x: torch.Tensor,
           reference: torch.Tensor | None, dtype: torch.dtype,
           ) -> tuple[dict[str, tuple[SemiStructuredLinear, ShapePlan]], list[str]]:
    built, failures = {}, []
    for shape_plan in plans:
        try:
            module = SemiStructuredLinear.from_linear(linear, shape_plan)
            if reference is not None:
                error = _relative_error(module(x), reference)
                if not error <= _TOLERANCE[dtype]:
                    raise ValueError(f"output differs from the dense layer (relative error "
                                     f"{error:.2g})")
        except Exception as exc:  # noqa: BLE001 - reported, the layer stays dense
            failures.append(f"{shape_plan.backend}: {_short(exc)}")
            continue
        built[shape_plan.backend] = (module, shape_plan)
    return built, failures


def _convert(model: nn.Module, job: _Job, choices: dict[tuple, tuple[str, str]],
             tune_tokens: int, check_outputs: bool) -> None:
    result, linear = job.result, job.module
    result.status, result.backend, result.padded = "skipped", "", None
    if not job.plans:
        return
    weight = linear.weight.detach()
    key = (result.shape, result.dtype, linear.bias is not None, str(weight.device))
    x = torch.randn(tune_tokens, result.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        reference = F.linear(x, weight, linear.bias) if check_outputs else None
        tried: list[ShapePlan] = []
        built, failures = {}, []
        if key in choices:  # this shape was timed already: build the winner only
            tried = [p for p in job.plans if p.backend == choices[key][0]]
            built, failures = _build(linear, tried, x, reference, result.dtype)
        if not built:
            rest = [p for p in job.plans if p not in tried]
            built, more_failures = _build(linear, rest, x, reference, result.dtype)
            failures += more_failures
    if not built:
        result.reason = "; ".join(failures)
        return
    if len(built) > 1:
        result.timings_us = {name: _time_us(module, x) for name, (module, _) in built.items()}
        choices[key] = (min(result.timings_us, key=result.timings_us.get), result.name)
        chosen = choices[key][0]
        result.reason = f"auto: faster at {tune_tokens} tokens"
    else:
        chosen = next(iter(built))
        if key in choices and chosen == choices[key][0]:
            result.reason = f"auto: as timed on {choices[key][1]}"
    module, shape_plan = built[chosen]
    module.train(linear.training)
    _replace(model, linear, module)
    result.status, result.backend, result.padded = "converted", chosen, shape_plan.padded
    if failures:
        result.reason = "; ".join(filter(None, [result.reason, *failures]))


def semi_structured_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           backend: str = "cusparselt",
                           max_padding: float = DEFAULT_MAX_PADDING) -> SemiStructuredLinear:
    """One :class:`SemiStructuredLinear` from a 2:4 ``(out, in)`` CUDA weight (verified,
    padded by the tile rules); raises ``ValueError`` if it is not 2:4 or cannot be padded."""
    _check_backend(backend, KERNEL_BACKENDS)
    check = verify_2to4(weight)
    if not check.ok:
        raise NMViolationError(check.describe())
    outcome = plan_shape(tuple(weight.shape), weight.dtype, backend, max_padding)
    if isinstance(outcome, str):
        raise ValueError(outcome)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return SemiStructuredLinear.from_linear(linear, outcome)
