"""Whether a 2:4 backend really runs on a device: a tiny compress + matmul compared with the
dense product, cached per (backend, device, dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._semi_linear import to_semi_structured
from ._tiles import KERNEL_BACKENDS, _check_backend, _round_up, capability_error, tile_rule

# Normalised error (max |sparse - dense| / max |dense|) a converted layer may show. Both paths
# accumulate in fp32, so the difference is output rounding: far below these; garbage from a
# wrong compression is of order 1.
_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}

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
