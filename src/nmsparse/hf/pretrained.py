"""``nmsparse.load_pretrained(DIR)``: a pruned Hugging Face causal LM, on the N:M kernels.

The folder is read as :mod:`nmsparse.hf.folder` reads any (local files, safetensors, no
remote code) and then made fast, the function unchanged:

* GPT-2's ``Conv1D`` layers (weight stored ``(in, out)``) become equal ``nn.Linear`` layers,
  so that every projection can be swapped;
* on a CUDA GPU, a 2:4 model in bf16 / fp16 goes onto the sparse tensor cores
  (:func:`nmsparse.kernels.accelerate`); otherwise (the CPU, other N:M patterns, fp32) every
  ``nn.Linear`` whose weight is N:M becomes an :class:`~nmsparse.kernels.NMLinear`
  (:func:`nmsparse.kernels.swap_linear_layers`: the CPU kernels, Triton on a GPU), and on a
  CPU with AVX512_BF16 a bf16 model's NMLinear layers are then laid out for the CPU kernel
  once (:func:`nmsparse.kernels.prepare_cpu`: ``PreparedNMLinear``, the same checkpoint
  bytes, faster at every batch size). Layers that are not N:M (the head, kept dense) stay as
  they are; the report says why.

The pattern is the one ``nmsparse prune`` recorded in the folder's ``prune.json``, or
``pattern=`` for a folder pruned some other way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..engine.selection import is_hf_conv1d
from ..patterns import NM, parse_pattern
from .folder import REPORT, load_causal_lm


def recorded_pattern(path: str | os.PathLike[str]) -> str | None:
    """The pattern ``nmsparse prune`` wrote into the folder, or ``None``."""
    try:
        report = json.loads((Path(path) / REPORT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    pattern = report.get("pattern") if isinstance(report, dict) else None
    return pattern if isinstance(pattern, str) else None


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every Hugging Face ``Conv1D`` by the equal ``nn.Linear``; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_hf_conv1d(module):
            continue
        weight = module.weight.detach()  # (in, out)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.train(module.training)
        model.set_submodule(name, linear)
        replaced += 1
    return replaced


def swap_kernels(model: nn.Module, pattern: str | NM, device: torch.device):
    """Put ``model`` (finalized, on ``device``) onto the fastest N:M layers there; returns
    the kernels' report, or ``None`` when the pattern is not N:M (nothing to swap)."""
    from ..kernels import accelerate, prepare_cpu, swap_linear_layers

    pattern = parse_pattern(pattern)
    if not isinstance(pattern, NM):
        return None
    conv1d_to_linear(model)
    dtype = next(model.parameters()).dtype
    if device.type == "cuda" and (pattern.n, pattern.m) == (2, 4) \
            and dtype in (torch.float16, torch.bfloat16):
        return accelerate(model)
    report = swap_linear_layers(model, pattern)
    if device.type == "cpu":
        report.prepared = prepare_cpu(model).prepared
    return report


def load_sparse(path: str | os.PathLike[str], *, dtype: str = "auto",
                device: str | torch.device | None = None, pattern: str | None = None):
    """``(model, report)``: :func:`load_pretrained` and the kernels' report."""
    pattern = pattern or recorded_pattern(path)
    if pattern is None:
        raise ValueError(f"{str(path)!r} has no {REPORT} saying its pattern (it was not "
                         "written by 'nmsparse prune'): pass its pattern (pattern='2:4', or "
                         "--pattern 2:4)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = load_causal_lm(path, dtype, device)
    return model, swap_kernels(model, pattern, device)


def load_pretrained(path: str | os.PathLike[str], *, dtype: str = "auto",
                    device: str | torch.device | None = None,
                    pattern: str | None = None) -> nn.Module:
    """The causal LM in ``path`` with its N:M layers on the N:M kernels (see the module
    docstring); ``dtype``: ``"auto"`` (the folder's), ``"float32"``, ``"bfloat16"`` or
    ``"float16"``; ``device``: default CUDA when there is one, else the CPU."""
    return load_sparse(path, dtype=dtype, device=device, pattern=pattern)[0]
