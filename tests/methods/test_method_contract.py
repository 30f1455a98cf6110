"""The contract every registered training method keeps, tested for each one automatically.

A method registered in nmsparse (``nmsparse.METHODS``) gets, with no test of its own:
masks that follow its layer's pattern after every optimizer step, the gradient rule it
declares on its class (with ``masks_beyond_pattern`` and ``optimizers``: a method is one file
plus its registration), a handle state that survives ``torch.save`` /
``torch.load(weights_only=True)``, a resume from a checkpoint that is bit-identical to a
run never stopped, and a finalize that leaves plain modules computing the same outputs.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.engine import step_hooks

BUILT_IN = [name for name, cls in nmsparse.METHODS.items()
            if cls.__module__.startswith("nmsparse.")]
PATTERNS = ["2:4", "1:8"]


def facts(name: str):
    """The method's class: its facts (gradient rule, masks_beyond_pattern, optimizers)."""
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


def sparse_net(name: str, pattern: str, seed: int = 0, **flags):
    """The method's network, handle and optimizer (``flags``: e.g. ``fused=True``)."""
    torch.manual_seed(seed)
    model = Net()
    handle = nmsparse.sparsify(model, pattern, name)
    accepted = facts(name).optimizers  # e.g. STEP freezes Adam's second moment: Adam
    if accepted is None:
        return model, handle, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                                              weight_decay=1e-3, **flags)
    return model, handle, accepted[0](model.parameters(), lr=1e-3, weight_decay=1e-3, **flags)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_states_its_facts_on_its_class(name):
    cls = facts(name)
    assert cls.gradient in ("all", "kept", "none") and isinstance(cls.masks_beyond_pattern, bool)
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
            assert spec.violations(w.mask).ok or facts(name).masks_beyond_pattern, \
                w.name
            # what forward uses is the dense weight with the pruned entries at zero
            assert not w.masked[~w.mask].any()
            torch.testing.assert_close(w.masked[w.mask], w.dense.detach()[w.mask],
                                       rtol=0, atol=0)
    assert handle.steps == 4


@pytest.mark.parametrize("name", BUILT_IN)
def test_forward_follows_a_fused_optimizer_step(name):
    """Fused kernels write the weights without bumping their version counters: the forward
    weights must follow each step exactly as with the for-loop implementation."""
    runs = []
    for flags in ({"foreach": False}, {"fused": True}):
        model, handle, opt = sparse_net(name, "2:4", **flags)
        forward = []
        for x, y in batches(1, 4):
            train(model, opt, [(x, y)])
            forward += [(w.name, w.module.weight.detach().clone()) for w in handle]
        runs.append(forward)
    for (name_a, a), (_, b) in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name_a)


@pytest.mark.parametrize("name", BUILT_IN)
def test_gradient_rule(name):
    model, handle, _ = sparse_net(name, "2:4")
    w = handle["fc1.weight"]
    upstream = torch.randn(w.dense.shape)
    (model.fc1.weight * upstream).sum().backward()
    if facts(name).gradient == "none":
        assert w.dense.grad is None
        return
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


class Wrapper(torch.optim.Optimizer):
    """Steps an inner optimizer inside its own step on the same gradients, as accelerate's
    AcceleratedOptimizer and ZeroRedundancyOptimizer do."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.optimizer = inner  # accelerate's name, which STEP looks through for Adam
        super().__init__(inner.param_groups, {})

    def step(self, closure=None):
        return self.optimizer.step(closure)


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_wrapping_optimizer_runs_the_methods_once_per_step(name):
    plain, plain_handle, plain_opt = sparse_net(name, "2:4")
    train(plain, plain_opt, batches(1, 3))
    model, handle, opt = sparse_net(name, "2:4")
    train(model, Wrapper(opt), batches(1, 3))
    assert handle.steps == 3
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert same_state(handle.state_dict(), plain_handle.state_dict())
