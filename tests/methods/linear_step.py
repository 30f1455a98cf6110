"""A one-layer model whose gradient is known by hand, for the exact-update tests.

``Linear(IN, OUT, bias=False)`` under the loss ``sum(model(x) * u)``: the gradient with respect
to the weight that forward uses is ``G = u^T x`` whatever the weights are, so one optimizer
step has a closed-form result that each method's test writes down.
"""

from __future__ import annotations

import torch
from torch import nn

import nmsparse

IN, OUT, BATCH, LR = 8, 4, 5, 0.1


def layer(pattern: str, method, seed: int = 0, out: int = OUT, inp: int = IN,
          dtype: torch.dtype = torch.float32):
    """A sparsified bias-free Linear, its handle, and a fixed input ``x`` and upstream ``u``
    (float64 where a test's hand value needs more than float32's digits)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(inp, out, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(out, inp, generator=generator))
    handle = nmsparse.sparsify(model, pattern, method)
    x = torch.randn(BATCH, inp, generator=generator).to(dtype)
    u = torch.randn(BATCH, out, generator=generator).to(dtype)
    return model, handle["0.weight"], x, u


def grad_of_forward_weight(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``G = u^T x``: the loss gradient with respect to the weight forward uses."""
    return u.t() @ x


def step(model, opt, x, u) -> torch.Tensor:
    """One optimizer step on ``sum(model(x) * u)``; returns the forward output it used."""
    opt.zero_grad()
    y = model(x)
    (y * u).sum().backward()
    opt.step()
    return y.detach()


def snapshot(w) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense weight and the mask before a step."""
    return w.dense.detach().clone(), w.mask.clone()
