"""Model-level methods (``nmsparse.methods.ModelMethod``, e.g. CHEX) run through a sparsity
handle like per-weight methods: its step hooks (index, optimizer), its ``state_dict()``, and
``finalize`` stops them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.methods import ModelMethod


class Counter(ModelMethod):
    name = "counter"

    def __init__(self):
        self.seen: list[tuple[str, int, object]] = []
        self.total = 0

    def before_step(self, step):
        self.seen.append(("before", step.index, step.optimizer))

    def after_step(self, step):
        self.seen.append(("after", step.index, step.optimizer))
        self.total += 1

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


def _steps(model, optimizer, count):
    for _ in range(count):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()


def test_a_dense_model_runs_a_model_method_at_every_optimizer_step():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = Counter()
    handle = nmsparse.drive(model, counter)
    _steps(model, optimizer, 3)
    assert counter.seen == [(when, i, optimizer) for i in range(3)
                            for when in ("before", "after")]
    state = handle.state_dict()
    assert state["steps"] == 3 and state["model_methods"] == {"counter": {"total": 3}}
    again = Counter()
    other = nmsparse.drive(nn.Sequential(nn.Linear(8, 8)), again)
    other.load_state_dict(state)
    assert other.steps == 3 and again.total == 3
    nmsparse.finalize(model)  # stops it
    _steps(model, optimizer, 1)
    assert counter.total == 3 and handle.finalized
    other.finalize()


def test_a_model_method_shares_the_step_of_a_sparse_handle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    handle = nmsparse.sparsify(model, "2:4", "srste")
    counter = Counter()
    assert nmsparse.drive(model, counter, handle=handle) is handle
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _steps(model, optimizer, 2)
    assert [i for when, i, _ in counter.seen if when == "after"] == [0, 1] == list(
        range(handle.steps))
    with pytest.raises(ValueError, match="already runs a model method named 'counter'"):
        handle.add(Counter())
    nmsparse.finalize(model)
    assert handle.model_methods == []


def test_chex_runs_through_the_global_step_hooks():
    from nmsparse.channels import Chex

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    chex = Chex(model, torch.randn(2, 8), budget=0.5, every=1, until=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = nmsparse.drive(model, chex)
    _steps(model, optimizer, 3)
    assert chex.step == 3 and chex.optimizer is optimizer
    dropped = ~chex.keep[0]
    assert not model[0].weight[dropped].any()  # re-masked after every step
    assert handle.state_dict()["model_methods"]["chex"]["step"] == 3
    nmsparse.finalize(model)
