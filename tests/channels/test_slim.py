"""Slimming: the physically smaller copy computes what the channel-masked model computes."""

from __future__ import annotations

import pytest
import torch
from channel_models import Concat, Depthwise, Residual, randomise_norms
from torch import nn

from nmsparse.app.models import create_model
from nmsparse.channels import (
    channel_graph,
    kept_count,
    mask_channels,
    slim,
    why_not_slimmable,
)


def parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("build, shape", [
    (Residual, (2, 3, 6, 6)), (Concat, (2, 3, 5, 5)), (Depthwise, (2, 3, 6, 6)),
    (lambda: create_model("resnet20", input_shape=(1, 8, 8), num_classes=3, width=0.5),
     (2, 1, 8, 8)),
    (lambda: create_model("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=(8, 12)),
     (2, 1, 4, 4)),
])
def test_slimmed_copy_equals_the_masked_model(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    randomise_norms(model)
    x = torch.randn(shape)
    groups = channel_graph(model, x)
    keep = {}
    generator = torch.Generator().manual_seed(1)
    for index, group in enumerate(groups):
        if why_not_slimmable(group) is None and group.size >= 4:
            count = kept_count(group.size, 0.5, multiple_of=2)
            chosen = torch.randperm(group.size, generator=generator)[:count]
            keep[index] = torch.zeros(group.size, dtype=torch.bool).index_fill_(0, chosen, True)
            mask_channels(model, group, keep[index])
    assert keep
    slimmed = slim(model, groups, keep)
    with torch.no_grad():
        torch.testing.assert_close(slimmed(x), model(x), rtol=1e-5, atol=1e-5)
    assert parameters(slimmed) < parameters(model)
    for module in slimmed.modules():
        if isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_features == module.weight.shape[0]


def test_layernorm_and_attention_groups_are_not_slimmable():
    model = create_model("vit_tiny", input_shape=(1, 16, 16), num_classes=3, depth=1)
    groups = channel_graph(model, torch.randn(1, 1, 16, 16))
    stream = next(g for g in groups if any(s.tensor == "patch_embed.weight" and
                                          s.role == "producer" for s in g.members))
    assert stream.free and "layer_norm" in why_not_slimmable(stream)
    index = groups.index(stream)
    with pytest.raises(ValueError, match="cannot slim"):
        slim(model, groups, {index: torch.ones(stream.size, dtype=torch.bool)})
    hidden = next(i for i, g in enumerate(groups) if g.size == 768)
    with pytest.raises(ValueError, match="at least one"):
        slim(model, groups, {hidden: torch.zeros(768, dtype=torch.bool)})


def test_kept_count_rounds_to_a_multiple():
    assert kept_count(64, 0.5, 4) == 32
    assert kept_count(64, 0.3, 4) == 20
    assert kept_count(64, 0.01, 4) == 4
    assert kept_count(10, 1.0, 4) == 8
