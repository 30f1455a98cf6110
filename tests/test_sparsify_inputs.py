"""What ``sparsify`` and ``prune`` take from the caller: given masks are copied (never the
live buffers), and both verbs work under ``torch.inference_mode()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 8))


def train(model: nn.Module, steps: int, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(8, 8, generator=generator)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 16, generator=generator)
        (model(x) - target).square().mean().backward()
        opt.step()


def test_given_masks_are_copied_not_kept_as_the_live_mask():
    model = mlp()
    given = nmsparse.parse_pattern("2:4").mask(torch.rand(16, 16))
    original = given.clone()
    handle = nmsparse.sparsify(model, "2:4", "rigl", every=1, fraction=0.5,
                               masks={"0.weight": given})
    assert torch.equal(handle["0.weight"].mask, original)  # it starts from the given mask
    train(model, 3)
    assert not torch.equal(handle["0.weight"].mask, original)  # RigL exchanged entries
    assert torch.equal(given, original)  # ... in its own buffer, not in the caller's tensor


def test_one_mask_given_for_two_layers_gives_two_masks():
    model = mlp()
    given = nmsparse.parse_pattern("2:4").mask(torch.rand(16, 16))
    handle = nmsparse.sparsify(model, "2:4", "srste", include=["0", "2"],
                               masks={"0.weight": given, "2.weight": given})
    first, second = handle["0.weight"], handle["2.weight"]
    assert first.mask.data_ptr() != second.mask.data_ptr()
    train(model, 5)
    for w in (first, second):  # each mask follows its own weight
        assert torch.equal(w.mask, w.pattern.mask(w.dense.detach().abs())), w.name
    assert not torch.equal(first.mask, second.mask)


def test_prune_result_keeps_the_one_shot_masks_after_training():
    model = mlp()
    result = nmsparse.prune(model, "2:4", "magnitude", then="srste")
    one_shot = {name: mask.clone() for name, mask in result.masks.items()}
    train(model, 20)
    assert any(not torch.equal(w.mask, one_shot[w.name]) for w in result.handle)
    for name, mask in result.masks.items():
        assert torch.equal(mask, one_shot[name]), name


@pytest.mark.parametrize("verb", ["sparsify", "magnitude", "wanda"])
def test_sparsify_and_prune_work_under_inference_mode(verb):
    model = mlp()
    x = torch.randn(4, 16)
    with torch.inference_mode():
        if verb == "sparsify":
            handle = nmsparse.sparsify(model, "2:4")
        else:
            handle = nmsparse.prune(model, "2:4", verb, calibration=[x], then="srste").handle
        expected = model(x)
    assert nmsparse.check(model).ok
    assert not any(w.mask.is_inference() for w in handle)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    train(model, 2)  # trains afterwards as usual
    for w in handle:
        torch.testing.assert_close(w.module.weight.detach(), w.dense.detach() * w.mask,
                                   rtol=0, atol=0)


def test_a_model_made_under_inference_mode_is_one_clear_error():
    with torch.inference_mode():
        model = mlp()
    with pytest.raises(ValueError, match=r"inference tensor .*torch\.no_grad\(\)"):
        nmsparse.sparsify(model, "2:4")


def test_prune_of_a_model_made_under_inference_mode_changes_nothing():
    with torch.inference_mode():
        model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"inference tensor .*torch\.no_grad\(\)"):
        nmsparse.prune(model, "2:4", "magnitude")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was written before the refusal"
