"""with_auxiliary: the output's value is unchanged, backward adds the term's gradient once,
and a sparsified SPViT left after a training forward keeps no handle alive."""

from __future__ import annotations

import gc
import weakref

import torch

import nmsparse
from nmsparse.app.models import create_model
from nmsparse.app.models._auxiliary import with_auxiliary
from nmsparse.engine import step_hooks


def test_value_unchanged_and_gradient_is_the_sum():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    output = w * 3
    term = (w ** 2).sum()
    attached = with_auxiliary(output, term)
    assert torch.equal(attached, output)
    (attached * torch.tensor([1.0, 10.0])).sum().backward()
    # d/dw [3 w0 + 30 w1] + d/dw [w0^2 + w1^2] = [3 + 2, 30 + 4]
    assert torch.equal(w.grad, torch.tensor([5.0, 34.0]))
    with torch.no_grad():
        assert with_auxiliary(output, term) is output


def test_training_forward_without_backward_leaks_no_handle():
    # This test's own handle must die; counting all live handles would depend on what
    # earlier tests left alive (a compiled step's cache kept one, freed at a random later
    # point: the test failed or passed by suite order).
    model = create_model("spvit_tiny", input_shape=(1, 8, 8), num_classes=3, dim=16, depth=2,
                         heads=2, patch_size=2, prune_at=[1])
    handle = nmsparse.sparsify(model, "2:4")
    assert handle in step_hooks._live
    model.train()(torch.randn(2, 1, 8, 8))
    alive = weakref.ref(handle)
    del model, handle
    gc.collect()
    assert alive() is None
