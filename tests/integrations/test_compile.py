"""torch.compile: a compiled sparse model never reads a stale masked weight, and a compiled
full train step has no more graph breaks or graphs than the same dense step."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import nmsparse


@pytest.fixture(autouse=True)
def _forget_compiled_code():
    """Compiled code holds the model, optimizer and sparsity handle it was traced with until
    dynamo's caches are reset: reset them after each test, so that no handle outlives its
    test (a later test counting live handles failed depending on the suite's order)."""
    yield
    torch._dynamo.reset()
    gc.collect()

WIDTHS = [16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104]  # 11 layer shapes, > dynamo's 8


def deep_mlp(sparse: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers)
    if sparse:
        nmsparse.sparsify(model, "2:4", decay=1e-2)
    return model


def test_compiled_forward_is_never_stale():
    model = deep_mlp(True).eval()
    compiled = torch.compile(model)
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    state = {k: v * 1.5 if v.dtype != torch.bool else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        nmsparse.handles_of(model)[0]["0.weight"].dense.mul_(2)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    model.double()
    torch.testing.assert_close(compiled(x.double()), model(x.double()), rtol=0, atol=0)


def compiled_steps(sparse: bool, steps: int = 3):
    torch._dynamo.reset()
    counters.clear()
    model = deep_mlp(sparse)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.compile
    def step(x):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        step(x)
    breaks = sum(counters["graph_break"].values())
    return model, breaks, counters["stats"]["unique_graphs"], x


def test_compiled_train_step_adds_no_graph_breaks_or_graphs():
    _, dense_breaks, dense_graphs, _ = compiled_steps(False)
    model, breaks, graphs, x = compiled_steps(True)
    assert breaks <= dense_breaks and graphs <= dense_graphs, (breaks, dense_breaks, graphs,
                                                                dense_graphs)
    eager = deep_mlp(True)
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        eager(x).square().mean().backward()
        opt.step()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                   msg=key)
    assert nmsparse.handles_of(model)[0].steps == 3
