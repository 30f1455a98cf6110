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

import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..check import NMViolationError
from ..engine.sparse_module import original_class, sparse_states
from ._accelerate_report import AccelerateReport, LayerResult
from ._backend_probe import _TOLERANCE, _relative_error, _short, backend_error
from ._eligibility import not_asked, shared_parameters, structural_reason
from ._semi_linear import SemiStructuredLinear, to_semi_structured
from ._tiles import (
    BACKENDS,
    DEFAULT_MAX_PADDING,
    KERNEL_BACKENDS,
    MIN_CAPABILITY,
    SUPPORTED_DTYPES,
    ShapePlan,
    TileRule,
    _check_backend,
    capability_error,
    plan_shape,
    tile_rule,
)
from ._verify_24 import TWO_FOUR, PatternCheck, verify_2to4

# The jobs live in files of their own (verifier, tiles, module, probe, report); this file is
# the pipeline, and the names above are its public ones too.
__all__ = ["BACKENDS", "DEFAULT_MAX_PADDING", "KERNEL_BACKENDS", "MIN_CAPABILITY",
           "SUPPORTED_DTYPES", "TWO_FOUR", "AccelerateReport", "LayerResult", "PatternCheck",
           "SemiStructuredLinear", "ShapePlan", "TileRule", "accelerate", "backend_error",
           "capability_error", "plan", "plan_shape", "semi_structured_linear", "tile_rule",
           "to_semi_structured", "verify_2to4"]


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
            module = SemiStructuredLinear.from_linear(linear, shape_plan,
                                                      to_semi_structured)
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
    return SemiStructuredLinear.from_linear(linear, outcome, to_semi_structured)
