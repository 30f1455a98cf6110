"""The SR-STE update, exactly: once per optimizer step, on the true gradient."""

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.engine.masks import nm_mask

LR, DECAY = 0.1, 2e-4


def dense(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return module._parameters[name]


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def expected_step(w0, g, m0, lr=LR, decay=DECAY):
    return w0 - lr * (g + decay * (~m0).to(w0.dtype) * w0)


def loss_of(model, x):
    return model(x).square().mean()


def snapshot(model):
    layers = [model[0], model[2]]
    return ([dense(layer).detach().clone() for layer in layers],
            [layer.weight_mask.clone() for layer in layers])


def test_plain_sgd_step_matches_formula():
    model = tiny_mlp()
    nmsparse.sparsify(model, "2:4", decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x = torch.randn(5, 8)
    w0, m0 = snapshot(model)
    loss_of(model, x).backward()
    grads = [dense(model[i]).grad.clone() for i in (0, 2)]
    # the gradient before the step is the plain straight-through gradient
    reference = tiny_mlp()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "mask" not in k})
    with torch.no_grad():
        for i, m in zip((0, 2), m0, strict=True):
            reference[i].weight.mul_(m)
    loss_of(reference, x).backward()
    for i, g in zip((0, 2), grads, strict=True):
        torch.testing.assert_close(g, reference[i].weight.grad)  # reaches pruned entries too
    opt.step()
    for i, w, m, g in zip((0, 2), w0, m0, grads, strict=True):
        torch.testing.assert_close(dense(model[i]).detach(), expected_step(w, g, m),
                                   rtol=0, atol=1e-7)
        assert torch.equal(model[i].weight_mask, nm_mask(dense(model[i]).detach(), 2, 4))


def test_decay_is_applied_to_pruned_weights_only():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, -3.0, 2.0, 1.0]]))
    nmsparse.sparsify(layer, "2:4", decay=0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.weight.sum().mul(0).backward()  # zero loss gradient: only the refinement acts
    opt.step()
    assert dense(layer).tolist() == [[4.0, -3.0, 1.0, 0.5]]


def test_ste_has_no_decay_and_matches_plain_gradient():
    model = tiny_mlp()
    nmsparse.sparsify(model, "2:4", method="ste")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    w0, m0 = snapshot(model)
    loss_of(model, torch.randn(5, 8)).backward()
    g = dense(model[0]).grad.clone()
    opt.step()
    torch.testing.assert_close(dense(model[0]).detach(), w0[0] - LR * g, rtol=0, atol=1e-7)


@pytest.mark.parametrize("scale", [2.0**4, 2.0**16])
def test_grad_scaler_does_not_divide_the_term(scale):
    x = torch.randn(6, 8)
    results = []
    for use_scaler in (False, True):
        torch.manual_seed(1)
        model = tiny_mlp()
        nmsparse.sparsify(model, "2:4", decay=DECAY)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=use_scaler)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(loss_of(model, x)).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_applies_term_once():
    x = torch.randn(8, 8)
    model = tiny_mlp()
    nmsparse.sparsify(model, "2:4", decay=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    w0, m0 = snapshot(model)
    for chunk in x.chunk(4):
        (loss_of(model, chunk) / 4).backward()
    g = dense(model[0]).grad.clone()
    opt.step()
    torch.testing.assert_close(dense(model[0]).detach(), expected_step(w0[0], g, m0[0],
                                                                       decay=0.05),
                               rtol=0, atol=1e-7)


def test_layer_called_twice_gets_term_once():
    layer = nn.Linear(8, 8)
    nmsparse.sparsify(layer, "2:4", decay=0.05)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    w0, m0 = dense(layer).detach().clone(), layer.weight_mask.clone()
    layer(layer(torch.randn(3, 8))).square().mean().backward()
    g = dense(layer).grad.clone()
    opt.step()
    torch.testing.assert_close(dense(layer).detach(), expected_step(w0, g, m0, decay=0.05),
                               rtol=0, atol=1e-7)


def test_nested_optimizer_step_adds_term_once():
    """A wrapper optimizer that steps an inner one on the same gradients."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, params):
            self.inner = torch.optim.SGD(params, lr=LR)
            super().__init__(self.inner.param_groups, {})

        def step(self, closure=None):
            return self.inner.step(closure)

    layer = nn.Linear(8, 4)
    handle = nmsparse.sparsify(layer, "2:4", decay=0.05)
    opt = Wrapper(layer.parameters())
    w0, m0 = dense(layer).detach().clone(), layer.weight_mask.clone()
    layer(torch.randn(3, 8)).sum().backward()
    g = dense(layer).grad.clone()
    opt.step()
    torch.testing.assert_close(dense(layer).detach(), expected_step(w0, g, m0, decay=0.05),
                               rtol=0, atol=1e-7)
    assert handle.steps == 1  # the outer step ran the methods; the inner one did not again

    def failing(closure=None):
        raise RuntimeError("boom")

    opt.inner.step, real_step = failing, opt.inner.step
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    opt.inner.step = real_step
    layer(torch.randn(3, 8)).sum().backward()
    opt.step()  # a step that raised does not leave the handle stuck
    assert handle.steps == 2


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=0.05),
    lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
], ids=["sgd-momentum-wd", "adamw", "adam", "rmsprop"])
def test_fixed_keeps_pruned_weights_exactly_zero(make_opt):
    model = tiny_mlp()
    nmsparse.sparsify(model, "2:4", method="fixed")
    masks = {i: model[i].weight_mask.clone() for i in (0, 2)}
    for i in (0, 2):
        assert not dense(model[i])[~masks[i]].any()
    opt = make_opt(model.parameters())
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, torch.randn(4, 8)).backward()
        opt.step()
    for i in (0, 2):
        assert torch.equal(model[i].weight_mask, masks[i])  # the mask never moves
        assert not dense(model[i])[~masks[i]].any()
        assert dense(model[i])[masks[i]].ne(0).any()


def test_masks_follow_weights_after_each_step_and_not_in_eval():
    model = tiny_mlp()
    handle = nmsparse.sparsify(model, "1:4")
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    before = handle.masks()["0.weight"].clone()
    loss_of(model, torch.randn(16, 8)).backward()
    opt.step()
    now = dense(model[0]).detach()
    assert torch.equal(handle.masks()["0.weight"], nm_mask(now, 1, 4))
    assert not torch.equal(before, handle.masks()["0.weight"])  # lr 5 moves the mask
    model.eval()
    state = model[0].__dict__["_nmsparse"]["weight"]
    cached = state.masked
    with torch.no_grad():
        model(torch.randn(2, 8))
        model(torch.randn(2, 8))
    assert state.masked is cached and state.is_fresh()


def test_forward_uses_masked_weight():
    layer = nn.Linear(8, 3)
    nmsparse.sparsify(layer, "2:4")
    x = torch.randn(5, 8)
    masked = dense(layer).detach() * layer.weight_mask
    torch.testing.assert_close(layer(x), x @ masked.T + layer.bias, rtol=0, atol=0)


def test_manual_edit_of_dense_weight_is_picked_up():
    layer = nn.Linear(4, 1, bias=False)
    nmsparse.sparsify(layer, "1:4")
    with torch.no_grad():
        dense(layer).copy_(torch.tensor([[0.0, 0.0, 5.0, 0.0]]))
    assert layer.weight.tolist() == [[0.0, 0.0, 5.0, 0.0]]
    assert layer.weight_mask.tolist() == [[False, False, True, False]]


def test_in_place_edit_of_masked_view_is_an_error():
    layer = nn.Linear(4, 2)
    nmsparse.sparsify(layer, "2:4")
    with torch.no_grad():
        layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        layer(torch.randn(1, 4))


def test_nonfinite_weight_names_the_layer():
    model = tiny_mlp()
    nmsparse.sparsify(model, "2:4")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_of(model, torch.randn(2, 8)).backward()
    dense(model[2]).grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight' contains NaN"):
        opt.step()


def test_handle_refresh_and_decay_for_hand_written_updates():
    layer = nn.Linear(8, 2)
    handle = nmsparse.sparsify(layer, "2:4", decay=0.05)
    w0, m0 = dense(layer).detach().clone(), layer.weight_mask.clone()
    layer(torch.randn(3, 8)).sum().backward()
    g = dense(layer).grad.clone()
    handle.before_step()
    with torch.no_grad():
        dense(layer).sub_(LR * dense(layer).grad)
    handle.after_step()
    torch.testing.assert_close(dense(layer).detach(), expected_step(w0, g, m0, decay=0.05),
                               rtol=0, atol=1e-7)
    assert torch.equal(layer.weight_mask, nm_mask(dense(layer).detach(), 2, 4))


def test_torch_compile_trains_like_eager():
    models = [tiny_mlp() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        nmsparse.sparsify(model, "1:4", decay=0.05)
    runs = [torch.compile(models[0]), models[1]]
    opts = [torch.optim.SGD(model.parameters(), lr=20.0) for model in models]
    initial_mask = models[1][0].weight_mask.clone()
    x = torch.randn(8, 8)
    for _ in range(3):  # lr 20 moves masks between steps: the compiled graph must see them
        for run, opt in zip(runs, opts, strict=True):
            opt.zero_grad()
            loss_of(run, x).backward()
            opt.step()
    assert not torch.equal(models[1][0].weight_mask, initial_mask)
    compiled, eager = (model.state_dict() for model in models)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_fp32_dense_gradients():
    model = tiny_mlp()
    nmsparse.sparsify(model, "2:4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert dense(model[0]).grad.dtype == torch.float32
