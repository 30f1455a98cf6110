"""MaskLLM: the candidate masks, one exact step by hand (fixed Gumbel noise), the prior, the
regulariser, frozen and trained weights, refusal of huge candidate sets, Hugging Face models."""

from __future__ import annotations

import math

import pytest
import torch
from linear_step import IN, OUT, grad_of_forward_weight, layer, step
from torch import nn

import nmsparse
from nmsparse.methods.maskllm import BETAS, EPS, LOGITS, MaskLLM, candidates, gumbel_noise

TWO_FOUR = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


def test_candidates_are_every_way_to_keep_n_of_m_in_order():
    assert candidates(2, 4).tolist() == TWO_FOUR
    eight = candidates(4, 8)
    assert eight.shape == (70, 8) and (eight.sum(1) == 4).all()
    assert len({tuple(row) for row in eight.tolist()}) == 70


def test_the_noise_is_reproducible_and_gumbel():
    a = gumbel_noise(3, 7, "fc.weight", (20000,))
    assert torch.equal(a, gumbel_noise(3, 7, "fc.weight", (20000,)))
    assert not torch.equal(a, gumbel_noise(3, 7, "fc2.weight", (20000,)))
    assert not torch.equal(a, gumbel_noise(3, 8, "fc.weight", (20000,)))
    assert not torch.equal(a, gumbel_noise(4, 7, "fc.weight", (20000,)))
    assert float(a.mean()) == pytest.approx(0.5772, abs=0.03)  # Euler-Mascheroni
    assert float(a.var()) == pytest.approx(math.pi ** 2 / 6, abs=0.08)


def by_hand_soft(logits, noise, scale, temperature):
    """``sum_c softmax((scale * pi + g) / tau)_c S_c`` for a 2:4 Linear, in plain ops."""
    table = torch.tensor(TWO_FOUR, dtype=torch.float32)
    y = torch.softmax((scale * logits + noise) / temperature, dim=-1)
    return (y @ table).reshape(OUT, IN), y


def test_one_step_by_hand_with_fixed_noise():
    method = MaskLLM(steps=10, lr=0.05, weight_reg=0.0, init_std=0.05, seed=4)
    model, w, x, u = layer("2:4", method)
    w0 = w.dense.detach().clone()
    pi0 = w.state[LOGITS].detach().clone()
    assert pi0.shape == (OUT, IN // 4, 6)
    table = torch.tensor(TWO_FOUR, dtype=torch.bool)
    assert torch.equal(w.mask, table[pi0.argmax(-1)].reshape(OUT, IN))  # the start mask

    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    noise = gumbel_noise(4, 0, "0.weight", tuple(pi0.shape))
    soft, y = by_hand_soft(pi0, noise, 100.0, 4.0)
    out = step(model, opt, x, u)
    torch.testing.assert_close(out, x @ (w0 * soft).t(), rtol=0, atol=1e-5)

    # the logits' gradient: d loss / d soft = G * W; through y @ S and the softmax
    upstream = (grad_of_forward_weight(x, u) * w0).reshape(OUT, IN // 4, 4)
    a = upstream @ torch.tensor(TWO_FOUR, dtype=torch.float32).t()  # d loss / d y
    grad = 100.0 / 4.0 * y * (a - (y * a).sum(-1, keepdim=True))
    # first Adam step: m_hat = g, v_hat = g^2
    expected = pi0 - 0.05 * grad / (grad.abs() + EPS)
    torch.testing.assert_close(w.state[LOGITS].detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(w.dense.detach(), w0)  # frozen: no gradient, no weight decay
    assert torch.equal(w.mask, table[expected.argmax(-1)].reshape(OUT, IN))

    # the second step's forward: step 1 of the schedules, noise of step 1
    noise = gumbel_noise(4, 1, "0.weight", tuple(pi0.shape))
    tau, kappa = 4.0 + (0.05 - 4.0) / 10, 100.0 + (500.0 - 100.0) / 10
    soft, _ = by_hand_soft(w.state[LOGITS].detach(), noise, kappa, tau)
    torch.testing.assert_close(model(x).detach(), x @ (w0 * soft).t(), rtol=0, atol=1e-5)


def test_adam_matches_torch_adam_over_several_steps():
    method = MaskLLM(steps=5, lr=0.02, weight_reg=0.0, init_std=0.1)
    model, w, x, u = layer("2:4", method)
    reference = w.state[LOGITS].detach().clone().requires_grad_()
    adam = torch.optim.Adam([reference], lr=0.02, betas=BETAS, eps=EPS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for index in range(4):
        opt.zero_grad()
        (model(x) * u).sum().backward()
        reference.grad = w.state[LOGITS].grad.clone()
        for group in adam.param_groups:
            group["lr"] = method.learning_rate(index)
        adam.step()
        opt.step()
        torch.testing.assert_close(w.state[LOGITS].detach(), reference.detach(),
                                   rtol=1e-5, atol=1e-6)
    assert method.learning_rate(0) == 0.02 and method.learning_rate(5) == pytest.approx(0.002)


def test_the_regulariser_adds_its_gradient_and_fades():
    plain = MaskLLM(steps=4, weight_reg=0.0, init_std=0.05)
    regular = MaskLLM(steps=4, weight_reg=0.3, init_std=0.05)
    grads = {}
    for method in (plain, regular):
        model, w, x, u = layer("2:4", method)
        (model(x) * u).sum().backward()
        grads[method.weight_reg] = w.state[LOGITS].grad.clone()
        w0, pi0 = w.dense.detach(), w.state[LOGITS].detach()
    noise = gumbel_noise(0, 0, "0.weight", tuple(pi0.shape))
    soft, y = by_hand_soft(pi0, noise, 100.0, 4.0)
    pull = (-2 * 0.3 * w0.square() * soft).reshape(OUT, IN // 4, 4)
    a = pull @ torch.tensor(TWO_FOUR, dtype=torch.float32).t()
    extra = 100.0 / 4.0 * y * (a - (y * a).sum(-1, keepdim=True))
    torch.testing.assert_close(grads[0.3] - grads[0.0], extra, rtol=1e-4, atol=1e-6)
    assert [regular.regularisation(k) for k in (0, 2, 4, 9)] == [0.3, 0.15, 0.0, 0.0]


def test_the_prior_raises_the_agreeing_candidates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    free = nmsparse.sparsify(model, "2:4", MaskLLM(init_std=0.1))["0.weight"]
    start = free.state[LOGITS].detach().clone()  # the same seed and name: the same start
    prior = ~free.mask  # what the start logits would prune
    nmsparse.finalize(model)
    w = nmsparse.sparsify(model, "2:4", MaskLLM(init_std=0.1, prior_strength=3.0),
                          masks={"0.weight": prior.clone()})["0.weight"]
    overlap = prior.float().reshape(OUT, IN // 4, 4) @ torch.tensor(TWO_FOUR).float().t()
    expected = start + 3.0 * start.std() * (overlap - 1.0)  # N^2 / M = 1 for 2:4
    torch.testing.assert_close(w.state[LOGITS].detach(), expected, rtol=0, atol=1e-6)
    agree = (w.mask == prior).reshape(OUT, IN // 4, 4).all(-1).float().mean()
    assert agree > 0.8  # argmax of the boosted logits: mostly the prior's choice


def test_eval_and_finalize_use_the_hard_mask_and_leave_a_plain_model():
    method = MaskLLM(steps=3, lr=0.1)
    model, w, x, u = layer("2:4", method)
    plain_keys = set(nn.Sequential(nn.Linear(IN, OUT, bias=False)).state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        step(model, opt, x, u)
    handle = w.handle
    table = torch.tensor(TWO_FOUR, dtype=torch.bool)
    hard = table[w.state[LOGITS].detach().argmax(-1)].reshape(OUT, IN)
    assert torch.equal(handle.masks()["0.weight"], hard)
    model.eval()
    expected = x @ (w.dense.detach() * hard).t()
    torch.testing.assert_close(model(x).detach(), expected, rtol=0, atol=1e-6)
    nmsparse.finalize(model)
    assert type(model[0]) is nn.Linear and set(model.state_dict()) == plain_keys
    torch.testing.assert_close(model(x).detach(), expected, rtol=0, atol=1e-6)


def test_train_weights_gives_the_weight_the_soft_mask_gradient():
    method = MaskLLM(train_weights=True, weight_reg=0.0)
    model, w, x, u = layer("2:4", method)
    pi0 = w.state[LOGITS].detach().clone()
    (model(x) * u).sum().backward()
    soft, _ = by_hand_soft(pi0, gumbel_noise(0, 0, "0.weight", tuple(pi0.shape)),
                           100.0, 4.0)
    torch.testing.assert_close(w.dense.grad, grad_of_forward_weight(x, u) * soft,
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_model_keeps_bfloat16_logits():
    model = nn.Sequential(nn.Linear(IN, OUT)).to(torch.bfloat16)
    w = nmsparse.sparsify(model, "2:4", "maskllm")["0.weight"]
    assert w.state[LOGITS].dtype == torch.bfloat16
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step(model, opt, torch.randn(3, IN, dtype=torch.bfloat16),
         torch.randn(3, OUT, dtype=torch.bfloat16))
    assert w.state[LOGITS].dtype == torch.bfloat16 and w.handle.steps == 1


def test_too_many_candidates_are_refused_in_one_line_and_nothing_changes():
    model = nn.Sequential(nn.Linear(32, 4))
    with pytest.raises(ValueError, match=r"C\(16,8\) = 12870 .* refused above 1000") as info:
        nmsparse.sparsify(model, "8:16", "maskllm")
    assert "\n" not in str(info.value)
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "weight_mask")
    with pytest.raises(ValueError, match="needs a pattern of kind N:M"):
        nmsparse.sparsify(model, "unstructured:0.5", "maskllm")


@pytest.mark.parametrize("bad", [{"temperature_end": 0}, {"steps": 0}, {"lr": -1},
                                 {"logit_dtype": "int8"}, {"train_weights": "yes"}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        MaskLLM(**bad)


def test_a_hand_written_update_loop_drives_it_through_the_handle():
    model, w, x, u = layer("2:4", MaskLLM(steps=4, lr=0.05))
    handle = w.handle
    start = w.state[LOGITS].detach().clone()
    for _ in range(2):
        (model(x) * u).sum().backward()
        handle.before_step()  # the logits' Adam step
        handle.after_step()  # the mask follows the new logits
    assert handle.steps == 2 and not torch.equal(w.state[LOGITS].detach(), start)
    table = torch.tensor(TWO_FOUR, dtype=torch.bool)
    assert torch.equal(w.mask, table[w.state[LOGITS].detach().argmax(-1)].reshape(OUT, IN))


def test_one_noise_sample_per_step_for_every_forward_of_that_step():
    model, w, x, u = layer("2:4", MaskLLM(steps=4, lr=0.05))
    first, again = model(x), model(x)  # micro-batches, a checkpointed recompute
    assert torch.equal(first, again)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    (first * u).sum().backward()
    opt.step()
    assert not torch.equal(model(x), first)  # the next step draws afresh
