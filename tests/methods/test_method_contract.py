"""The contract every registered training method keeps, tested for each one automatically.

A method registered in nmsparse (``nmsparse.METHODS``) gets, with no test of its own:
masks that follow its layer's pattern after every optimizer step, the gradient rule it
declares on its class (with ``grows_dense`` and ``optimizers``: a method is one file plus its
registration), a handle state that survives ``torch.save`` /
``torch.load(weights_only=True)``, a resume from a checkpoint that is bit-identical to a
run never stopped, and a finalize that leaves plain modules computing the same outputs.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import step_hooks

BUILT_IN = [name for name, cls in nmsparse.METHODS.items()
            if cls.__module__.startswith("nmsparse.")]
PATTERNS = ["2:4", "1:8"]


def facts(name: str):
    """The method's class: its facts (gradient rule, grows_dense, optimizers) live there."""
    return nmsparse.METHODS.get(name)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        x = self.conv(x).relu().mean((2, 3))
        return self.fc2(self.fc1(x).relu())


def batches(seed: int, count: int):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, 5, 5, generator=generator),
             torch.randint(0, 8, (4,), generator=generator)) for _ in range(count)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def sparse_net(name: str, pattern: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    handle = nmsparse.sparsify(model, pattern, name)
    accepted = facts(name).optimizers  # e.g. STEP freezes Adam's second moment: Adam
    if accepted is None:
        return model, handle, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                                              weight_decay=1e-3)
    return model, handle, accepted[0](model.parameters(), lr=1e-3, weight_decay=1e-3)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_states_its_facts_on_its_class(name):
    cls = facts(name)
    assert cls.gradient in ("all", "kept") and isinstance(cls.grows_dense, bool)
    assert cls.optimizers is None or all(issubclass(o, torch.optim.Optimizer)
                                         for o in cls.optimizers)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", BUILT_IN)
def test_masks_follow_the_pattern_after_every_step(name, pattern):
    model, handle, opt = sparse_net(name, pattern)
    spec = nmsparse.parse_pattern(pattern)
    for x, y in batches(1, 4):
        train(model, opt, [(x, y)])
        for w in handle:
            assert w.mask.dtype == torch.bool and w.mask.shape == w.dense.shape
            assert spec.violations(w.mask).ok or (facts(name).grows_dense and w.mask.all()), \
                w.name
            # what forward uses is the dense weight with the pruned entries at zero
            assert not w.masked[~w.mask].any()
            torch.testing.assert_close(w.masked[w.mask], w.dense.detach()[w.mask],
                                       rtol=0, atol=0)
    assert handle.steps == 4


@pytest.mark.parametrize("name", BUILT_IN)
def test_gradient_rule(name):
    model, handle, _ = sparse_net(name, "2:4")
    w = handle["fc1.weight"]
    upstream = torch.randn(w.dense.shape)
    (model.fc1.weight * upstream).sum().backward()
    expected = upstream if facts(name).gradient == "all" else upstream * w.mask
    torch.testing.assert_close(w.dense.grad, expected, rtol=0, atol=0)


def same_state(a, b) -> bool:
    """Equal handle states; tensors (allowed in method state) compared exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(same_state, a, b))
    return a == b


def state_roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", BUILT_IN)
def test_resume_is_bit_identical(name):
    model, handle, opt = sparse_net(name, "2:4")
    train(model, opt, batches(1, 3))
    saved = state_roundtrip({"model": model.state_dict(), "opt": opt.state_dict(),
                             "sparsity": handle.state_dict()})
    train(model, opt, batches(2, 3))

    resumed, resumed_handle, resumed_opt = sparse_net(name, "2:4", seed=5)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_handle.load_state_dict(saved["sparsity"])
    assert resumed_handle.steps == 3
    train(resumed, resumed_opt, batches(2, 3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert same_state(resumed_handle.state_dict(), handle.state_dict())


@pytest.mark.parametrize("name", BUILT_IN)
def test_finalize_keeps_outputs_and_removes_everything(name):
    model, handle, opt = sparse_net(name, "2:4")
    handle.attach(opt)
    train(model, opt, batches(1, 2))
    x = batches(3, 1)[0][0]
    model.eval()
    expected = model(x)
    nmsparse.finalize(model)
    assert type(model.fc1) is nn.Linear and type(model.conv) is nn.Conv2d
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert handle.finalized and len(handle) == 0
    assert handle not in step_hooks._live
