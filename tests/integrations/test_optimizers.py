"""Every optimizer implementation drives the sparse weights: for-loop, foreach and fused
SGD / Adam / AdamW, an optimizer that writes parameters without bumping their version
counters, a ``torch.compile``d ``optimizer.step``, GradScaler with a fused optimizer and
``ZeroRedundancyOptimizer`` (2 gloo processes). Fused kernels write in place without bumping
``_version``; the forward weight must follow every step anyway."""

from __future__ import annotations

import pytest
import torch
from process_group import spawn
from torch import nn

import nmsparse

LR, DECAY, STEPS = 0.05, 0.05, 4


class DataSGD(torch.optim.Optimizer):
    """Plain SGD written through ``param.data``: no version counter ever moves."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.data.add_(param.grad, alpha=-group["lr"])


def _flavours(cls, **options):
    return {f"{cls.__name__.lower()}-{name}": (lambda params, flags=flags: cls(
        params, **options, **flags)) for name, flags in (
        ("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
        ("fused", {"fused": True}))}


OPTIMIZERS = {
    **_flavours(torch.optim.SGD, lr=LR, momentum=0.9),
    **_flavours(torch.optim.Adam, lr=LR),
    **_flavours(torch.optim.AdamW, lr=LR, weight_decay=0.1),
    "unversioned": lambda params: DataSGD(params, lr=LR),
}


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def batch(step: int) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(100 + step))


def assert_forward_follows(handle, method: str) -> None:
    """What forward uses is dense * mask; a magnitude method's mask is the N:M mask of the
    dense weight; a fixed mask keeps the pruned dense entries at exactly zero."""
    for w in handle:
        dense = w.dense.detach()
        forward = w.module.weight.detach()
        torch.testing.assert_close(forward, dense * w.mask, rtol=0, atol=0, msg=w.name)
        if method == "fixed":
            assert not dense[~w.mask].any(), w.name
        else:
            assert torch.equal(w.mask, w.pattern.mask(dense.abs())), w.name


def train_step(model, step_fn, step: int) -> None:
    model.zero_grad()
    model(batch(step)).square().mean().backward()
    step_fn()


@pytest.mark.parametrize("method", ["srste", "ste", "fixed"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_forward_follows_every_step(kind, method):
    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "2:4", method,
                               **({"decay": DECAY} if method == "srste" else {}))
    opt = OPTIMIZERS[kind](model.parameters())
    for step in range(STEPS):
        train_step(model, opt.step, step)
        assert_forward_follows(handle, method)
    assert handle.steps == STEPS
    x = batch(99)
    expected = model(x)
    nmsparse.finalize(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_srste_update_is_the_formula_with_every_optimizer(kind):
    """The dense weight takes exactly the step the same optimizer takes on a plain tensor
    whose gradient is ``g + decay * (1 - mask) * W`` (mask and W before the step)."""
    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    opt = OPTIMIZERS[kind](model.parameters())
    twins = [nn.Parameter(w.dense.detach().clone()) for w in handle]
    twin_opt = OPTIMIZERS[kind](twins)
    for step in range(STEPS):
        model.zero_grad()
        model(batch(step)).square().mean().backward()
        for w, twin in zip(handle, twins, strict=True):
            pruned = (~w.mask).to(twin.dtype)
            # add_ with alpha rounds once, as nmsparse's decay kernel does
            twin.grad = w.dense.grad.clone().add_(pruned * twin.detach(), alpha=DECAY)
        opt.step()
        twin_opt.step()
        for w, twin in zip(handle, twins, strict=True):
            torch.testing.assert_close(w.dense.detach(), twin.detach(), rtol=0, atol=0,
                                       msg=f"{w.name} step {step}")
        assert_forward_follows(handle, "srste")


def test_compiled_optimizer_step():
    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step_fn = torch.compile(opt.step)
    for step in range(3):
        w0 = {w.name: (w.dense.detach().clone(), w.mask.clone()) for w in handle}
        model.zero_grad()
        model(batch(step)).square().mean().backward()
        grads = {w.name: w.dense.grad.clone() for w in handle}
        step_fn()
        for w in handle:
            dense, mask = w0[w.name]
            expected = dense - LR * (grads[w.name] + DECAY * (~mask) * dense)
            # inductor may fuse the update differently from eager: a few ulps
            torch.testing.assert_close(w.dense.detach(), expected, rtol=0, atol=1e-7)
        assert_forward_follows(handle, "srste")
    assert handle.steps == 3


def test_grad_scaler_with_a_fused_optimizer_adds_the_term_to_the_true_gradient():
    """GradScaler hands a fused optimizer still-scaled gradients (the kernel unscales them):
    the SR-STE term must be scaled alike, and an overflowing step changes nothing."""
    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    w = handle["0.weight"]
    for step in range(2):
        dense, mask = w.dense.detach().clone(), w.mask.clone()
        model.zero_grad()
        model(batch(step)).square().mean().backward()
        true_grad = w.dense.grad.clone()
        model.zero_grad()
        scaler.scale(model(batch(step)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        expected = dense - LR * (true_grad + DECAY * (~mask) * dense)
        torch.testing.assert_close(w.dense.detach(), expected, rtol=1e-6, atol=1e-7)
        assert_forward_follows(handle, "srste")
    assert handle.steps == 2
    before = w.dense.detach().clone()
    model.zero_grad()
    scaler.scale(model(batch(5)).square().mean() * float("inf")).backward()
    scaler.step(opt)  # overflow: the fused kernel skips the update, so do the methods
    assert torch.equal(w.dense.detach(), before)
    assert handle.steps == 2


# -- ZeroRedundancyOptimizer: each rank updates its shard of the parameters, then broadcasts ---
def _zero_worker(rank, world, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                  lr=LR, fused=True)
    for step in range(STEPS):
        train_step(model, opt.step, step)  # the same batch on both ranks: no averaging needed
        assert_forward_follows(handle, "srste")
    torch.save({"state": model.state_dict(), "steps": handle.steps,
                "forward": {w.name: w.module.weight.detach().clone() for w in handle}},
               f"{out_dir}/rank{rank}.pt")


def test_zero_redundancy_optimizer(tmp_path):
    world = 2
    spawn(_zero_worker, tmp_path, world)
    single = tiny_mlp()
    handle = nmsparse.sparsify(single, "2:4", decay=DECAY)
    opt = torch.optim.AdamW(single.parameters(), lr=LR, fused=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same reduction order, bit for bit
    try:
        for step in range(STEPS):
            train_step(single, opt.step, step)
    finally:
        torch.set_num_threads(threads)
    for rank in range(world):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["steps"] == STEPS  # the outer step ran the methods, the inner one not
        for key, value in single.state_dict().items():
            torch.testing.assert_close(saved["state"][key], value, rtol=0, atol=0, msg=key)
        for w in handle:
            torch.testing.assert_close(saved["forward"][w.name], w.module.weight.detach(),
                                       rtol=0, atol=0, msg=w.name)


def test_a_write_no_version_counter_sees_needs_refresh_force():
    """Outside a step freshness is keyed on version counters: a ``.data`` write is invisible
    to them until ``handle.refresh(force=True)`` (or the next step)."""
    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "2:4")
    w = handle["0.weight"]
    model(batch(0))  # the forward weight is built
    w.dense.data.mul_(-2.0)
    handle.refresh()
    assert not torch.equal(w.module.weight.detach(), w.dense.detach() * w.mask)
    handle.refresh(force=True)
    assert_forward_follows(handle, "srste")
