"""The handle owns the step: per-layer choices, attach, closures, the bypass warning, public
access to sparse weights, user-written methods, and method state that resumes."""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import SRSTE, STE, Method, Step
from nmsparse.engine import step_hooks

LR = 0.1


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def one_step(model, opt, x, closure=False):
    def compute():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    if closure:
        opt.step(compute)
    else:
        compute()
        opt.step()


def srste_expected(w0, g, m0, decay):
    return w0 - LR * (g + decay * (~m0).to(w0.dtype) * w0)


def grads_and_weights(model, x):
    """The gradient a step will use, and the weights and masks before it."""
    probe = [p.detach().clone() for p in (model[0]._parameters["weight"],
                                          model[2]._parameters["weight"])]
    masks = [model[0].weight_mask.clone(), model[2].weight_mask.clone()]
    model.zero_grad()
    model(x).square().mean().backward()
    grads = [model[i]._parameters["weight"].grad.clone() for i in (0, 2)]
    model.zero_grad()
    return probe, masks, grads


def test_per_layer_patterns_methods_and_decays():
    model = mlp()
    handle = nmsparse.sparsify(model, {"0": ("4:8", SRSTE(decay=0.05)), "2": ("2:4", "ste")})
    assert str(handle["0.weight"].pattern) == "4:8" and handle["0.weight"].method == SRSTE(0.05)
    assert handle["2.weight"].method == STE() and handle.method is None
    assert "methods per layer" in str(handle) and "SRSTE(decay=0.05)" in str(handle)
    x = torch.randn(5, 8)
    (w0, w2), (m0, m2), (g0, g2) = grads_and_weights(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    one_step(model, opt, x)
    torch.testing.assert_close(handle["0.weight"].dense.detach(),
                               srste_expected(w0, g0, m0, 0.05), rtol=0, atol=1e-7)
    torch.testing.assert_close(handle["2.weight"].dense.detach(), w2 - LR * g2,
                               rtol=0, atol=1e-7)  # STE: no term


def test_later_sparsify_on_dense_layers_and_overlap_error():
    model = mlp()
    first = nmsparse.sparsify(model, "2:4", include="0")
    second = nmsparse.sparsify(model, "1:4", "fixed", include="2")
    assert list(first.weights) == ["0.weight"] and list(second.weights) == ["2.weight"]
    with pytest.raises(ValueError, match="already sparse; call nmsparse.finalize"):
        nmsparse.sparsify(model, "2:4")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    one_step(model, opt, torch.randn(3, 8))
    assert first.steps == second.steps == 1
    second.finalize()  # only its own weights
    assert type(model[2]) is nn.Linear and "0.weight" in first and not second.weights
    assert nmsparse.check(model, {"0": "2:4", "2": "1:4"}).ok
    nmsparse.finalize(model)
    assert type(model[0]) is nn.Linear and first.finalized


def test_attach_runs_the_step_once_and_finalize_removes_the_hooks():
    model = mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    assert handle.attach(opt) is handle and handle.attach(opt) is handle  # idempotent
    assert len(opt._optimizer_step_pre_hooks) == 1
    x = torch.randn(5, 8)
    (w0, _), (m0, _), (g0, _) = grads_and_weights(model, x)
    one_step(model, opt, x)
    torch.testing.assert_close(handle["0.weight"].dense.detach(),
                               srste_expected(w0, g0, m0, 0.05), rtol=0, atol=1e-7)
    assert handle.steps == 1
    nmsparse.finalize(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(ValueError, match="finalized"):
        handle.attach(opt)
    other = nmsparse.sparsify(mlp(), "2:4")
    with pytest.raises(ValueError, match="holds none of this handle's sparse weights"):
        other.attach(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0))
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        other.attach("sgd")


def test_global_hooks_are_removed_when_the_last_handle_is_finalized():
    gc.collect()  # models of earlier tests may still hold live handles in reference cycles
    models = [mlp(), mlp()]
    handles = [nmsparse.sparsify(model, "2:4") for model in models]
    assert step_hooks.installed()
    nmsparse.finalize(models[0])
    assert handles[1] in step_hooks._live and step_hooks.installed()
    nmsparse.finalize(models[1])
    del models, handles
    gc.collect()
    assert not step_hooks._live and not step_hooks.installed()


def test_global_hooks_go_with_the_last_handle_collected_without_finalize():
    gc.collect()
    for handle in list(step_hooks._live):  # an earlier test's handle still alive: finalize it
        handle.finalize()
    model = mlp()
    nmsparse.sparsify(model, "2:4")
    assert step_hooks.installed()
    del model  # the model and its handle hold each other: only the collector frees them
    gc.collect()
    assert not step_hooks._live and not step_hooks.installed()


@pytest.mark.parametrize("attach", [False, True])
@pytest.mark.parametrize("keyword", [False, True])
def test_closure_gradient_gets_the_term(attach, keyword):
    """optimizer.step(closure): the gradient exists only after the closure ran, inside step."""
    model = mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if attach:
        handle.attach(opt)
    x = torch.randn(5, 8)
    (w0, w2), (m0, m2), (g0, g2) = grads_and_weights(model, x)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure=closure) if keyword else opt.step(closure)
    assert torch.is_tensor(loss)
    torch.testing.assert_close(handle["0.weight"].dense.detach(),
                               srste_expected(w0, g0, m0, 0.05), rtol=0, atol=1e-7)
    torch.testing.assert_close(handle["2.weight"].dense.detach(),
                               srste_expected(w2, g2, m2, 0.05), rtol=0, atol=1e-7)


def test_lbfgs_trains_with_valid_masks():
    model = mlp()
    handle = nmsparse.sparsify(model, "2:4", decay=1e-3)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(3):
        opt.step(closure)
    assert closure().item() < first
    assert nmsparse.check(model, "2:4").ok and handle.steps == 3


def manual_update(model, x):
    model.zero_grad()
    model(x).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad


def test_update_loop_bypassing_torch_optim_warns_once():
    model = mlp()
    nmsparse.sparsify(model, "2:4", decay=0.05)
    x = torch.randn(3, 8)
    manual_update(model, x)
    with pytest.warns(RuntimeWarning, match="outside a torch.optim step.*SRSTE"):
        model(x)
    manual_update(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once per handle


def test_no_warning_when_the_loop_calls_the_handle_or_the_method_has_no_step_hooks():
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = mlp()
        handle = nmsparse.sparsify(model, "2:4", decay=0.05)
        for _ in range(2):
            model.zero_grad()
            model(x).square().mean().backward()
            handle.before_step()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
            handle.after_step()
            model(x)
        assert handle.steps == 2
        plain = mlp()
        nmsparse.sparsify(plain, "2:4", "ste")
        manual_update(plain, x)
        plain(x)
        with torch.no_grad():  # a manual edit after a hooked step is not an update loop
            torch.optim.SGD(model.parameters(), lr=LR).step()
            handle["0.weight"].dense.mul_(0.5)
        model(x)


def test_public_access_to_dense_and_mask():
    model = mlp()
    handle = nmsparse.sparsify(model, "2:4")
    w = handle["0.weight"]
    assert w.dense is model[0]._parameters["weight"] and isinstance(w.dense, nn.Parameter)
    assert w.mask is model[0].weight_mask and w.name == "0.weight"
    assert [x.name for x in handle] == ["0.weight", "2.weight"] and len(handle) == 2
    with pytest.raises(KeyError, match="'fc.weight' is not a sparse weight.*0.weight"):
        handle["fc.weight"]
    mask = torch.zeros_like(w.mask)
    mask[:, 0::4] = mask[:, 1::4] = True
    w.set_mask(mask)
    assert torch.equal(model[0].weight_mask, mask)
    with pytest.raises(ValueError, match="breaks pattern 2:4 in 32 of 32 groups"):
        w.set_mask(torch.ones_like(mask))
    with pytest.raises(ValueError, match="torch.bool"):
        w.set_mask(mask.float())


# -- user-written methods ---------------------------------------------------------------------
@dataclass(frozen=True)
class WeightTimesGradient(STE):
    """The README's example: rank by |w * grad| once a gradient exists."""

    name: ClassVar[str] = "test-w-times-grad"

    def score(self, w):
        grad = w.dense.grad
        return (w.dense * (grad if grad is not None else 1)).detach().abs()


def test_user_method_in_a_few_lines():
    model = mlp()
    handle = nmsparse.sparsify(model, "2:4", method="test-w-times-grad")
    assert isinstance(handle.method, WeightTimesGradient)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    one_step(model, opt, torch.randn(4, 8))
    w = handle["0.weight"]
    model(torch.randn(1, 8))  # the forward rebuilt nothing: the step already did
    expected = w.pattern.mask((w.dense * w.dense.grad).detach().abs())
    assert torch.equal(w.mask, expected)
    assert not torch.equal(expected, w.pattern.mask(w.dense.detach().abs()))


def test_registry_clash_abstract_intermediates_and_subclasses():
    with pytest.raises(ValueError, match="method name 'srste' is already registered"):
        @dataclass(frozen=True)
        class Impostor(Method):
            name: ClassVar[str] = "srste"

    @dataclass(frozen=True)
    class Intermediate(Method):  # no name: abstract, not registered
        pass

    @dataclass(frozen=True)
    class Tweaked(SRSTE):  # inherits SRSTE's name but does not replace it
        pass

    assert nmsparse.METHODS.get("srste") is SRSTE
    assert Intermediate not in dict(nmsparse.METHODS.items()).values()
    assert Tweaked not in dict(nmsparse.METHODS.items()).values()
    with pytest.raises(ValueError, match="unknown method 'nope'; accepted: asp, .*fixed"):
        nmsparse.make_method("nope")
    with pytest.raises(ValueError, match="method 'srste' takes no rate"):
        nmsparse.make_method("srste", rate=1)


# -- a method with state: resumes bit-identically -------------------------------------------------
@dataclass(frozen=True)
class NoisyEvery(SRSTE):
    """Every ``period`` steps, add noise from a saved generator to the dense weights and count
    it per weight; the refinement grows with the count. Wrong state -> different weights."""

    name: ClassVar[str] = "test-noisy-every"
    period: int = 2

    def before_step(self, weights, step: Step) -> None:
        for w in weights:
            if w.dense.grad is not None:
                w.add_pruned_to_grad(self.decay * (1 + w.state.get("count", 0)))

    def after_step(self, weights, step: Step) -> None:
        if step.index % self.period:
            return
        generator = torch.Generator()
        if "rng" in step.state:
            generator.set_state(step.state["rng"])
        else:
            generator.manual_seed(1234)
        with torch.no_grad():
            for w in weights:
                w.dense.add_(torch.randn(w.dense.shape, generator=generator) * 1e-3)
                w.state["count"] = w.state.get("count", 0) + 1
        step.state["rng"] = generator.get_state()


def test_stateful_method_state_round_trips():
    model = mlp()
    handle = nmsparse.sparsify(model, "2:4", "test-noisy-every", decay=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(3):
        one_step(model, opt, torch.randn(2, 8))
    state = handle.state_dict()
    assert state["steps"] == 3 and state["weights"]["0.weight"]["count"] == 2
    assert "rng" in state["methods"]["NoisyEvery(decay=0.01, period=2)"]
    with pytest.raises(ValueError, match="does not have"):
        nmsparse.sparsify(mlp(), "2:4", include="0").load_state_dict(state)
    with pytest.raises(ValueError, match="not a sparsity handle state"):
        handle.load_state_dict({"steps": 1})


def test_trainer_resume_with_a_stateful_method_is_bit_identical(tmp_path):
    from resumed_run import straight_and_resumed

    from nmsparse.app.train.config import TrainConfig

    def config(out):
        return TrainConfig(method="test-noisy-every", method_options={"period": 3, "decay": 0.01},
                           epochs=3, batch_size=64, limit_train_batches=5,
                           limit_test_batches=2, model_options={"hidden": [32]}, plots=False,
                           out=str(out)).validate()

    a, b = straight_and_resumed(config, tmp_path)
    assert a["sparsity"]["steps"] == b["sparsity"]["steps"] == 15
    assert a["sparsity"]["weights"]["features.1.weight"]["count"] == 5
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
