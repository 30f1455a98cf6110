"""timm: models built by ``timm.create_model`` (no pretrained weights) train and finalize
exactly. timm needs torchvision, whose registry wheels pull a CUDA torch, so on a CPU-only
machine without a CPU torchvision these tests skip; ``make gpu-check`` runs them."""

from __future__ import annotations

import pytest
import torch

import nmsparse

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.timm  # the GPU machine has timm: the GPU check runs these

LR, DECAY = 0.1, 0.05


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_one_srste_step_is_exact_and_finalize_keeps_outputs(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()
    handle = nmsparse.sparsify(model, "2:4", decay=DECAY)
    assert len(handle.sparse_layers) > 10
    x = torch.randn(2, 3, 32, 32)
    before = {w.name: (w.dense.detach().clone(), w.mask.clone()) for w in handle}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model(x).sum().backward()
    grads = {w.name: w.dense.grad.clone() for w in handle}
    opt.step()
    for w in handle:
        dense, mask = before[w.name]
        expected = dense - LR * (grads[w.name] + DECAY * (~mask) * dense)
        torch.testing.assert_close(w.dense.detach(), expected, msg=w.name)
    expected = model(x)
    nmsparse.finalize(model)
    assert nmsparse.check(model, "2:4", include=list(before)).ok
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
