"""SPViT token pruning: kept-token counts and shapes, the package token on hand-made input,
the ratio loss, MACs of the pruned sequence in nmsparse.summary, composition with 2:4."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.app.models import create_model
from nmsparse.app.models.spvit import TokenPruningViT, keep_counts_for
from nmsparse.app.models.token_selector import keep_mask_bias, merge_package, prune_hard


def small(**options):
    base = {"dim": 16, "depth": 4, "heads": 2, "patch_size": 2, "prune_at": [1, 3],
            "keep_ratio": 0.5}
    base.update(options)
    torch.manual_seed(0)
    return create_model("spvit_tiny", input_shape=(1, 8, 8), num_classes=3, **base)


def test_keep_counts_round_and_floor_at_one():
    assert keep_counts_for(16, 2, 0.5) == [8, 4]
    assert keep_counts_for(49, 2, 0.7) == [34, 24]
    assert keep_counts_for(3, 3, 0.1) == [1, 1, 1]
    assert keep_counts_for(10, 2, [1.0, 0.3]) == [10, 3]
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_counts_for(10, 2, [0.5])
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_counts_for(10, 1, 0.0)


def test_inference_sequence_lengths_per_block():
    model = small().eval()
    seen = []
    for block in model.backbone.blocks:
        block.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 3)
    # 16 patches; block 1 keeps 8 (+ class + package), block 3 keeps 4
    assert seen == [(5, 17, 16), (5, 10, 16), (5, 10, 16), (5, 6, 16)]


def test_training_keeps_full_length_and_reports_kept_fractions():
    model = small().train()
    seen = []
    for block in model.backbone.blocks:  # training calls the block's parts, not the block
        block.norm1.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    model(torch.randn(4, 1, 8, 8))
    assert seen == [17, 18, 18, 18]  # a package token is appended once
    kept = model.kept_fractions()
    assert kept.shape == (4, 2)
    # fractions are multiples of 1/16, and a later stage never keeps more than an earlier one
    assert torch.allclose(kept * 16, (kept * 16).round())
    assert bool((kept[:, 1] <= kept[:, 0]).all())


def test_prune_hard_keeps_top_scores_in_order_and_packages_the_rest():
    # batch 1: class token, 4 candidates with 1-d features, no package yet
    x = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0]]])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.3]])
    out, mass = prune_hard(x, scores, keep=2, has_package=False, mass=None)
    # keeps candidates 0 and 2 (values 1, 3) in their order; package of 2 and 4 weighted
    # by their scores 0.1 and 0.3: (0.1 * 2 + 0.3 * 4) / 0.4 = 3.5
    assert out.shape == (1, 4, 1)
    assert torch.allclose(out[0, :, 0], torch.tensor([100.0, 1.0, 3.0, 3.5]))
    assert torch.allclose(mass, torch.tensor([0.4]))
    # second stage: the old package (mass 0.4) absorbs the newly pruned token 1.0 (score 0.6)
    out2, mass2 = prune_hard(out, torch.tensor([[0.6, 0.7]]), keep=1, has_package=True,
                             mass=mass)
    assert torch.allclose(out2[0, :, 0], torch.tensor([100.0, 3.0, (0.4 * 3.5 + 0.6) / 1.0]))
    assert torch.allclose(mass2, torch.tensor([1.0]))


def test_merge_package_with_zero_weight_is_zero_not_nan():
    package, mass = merge_package(torch.ones(2, 3, 4), torch.zeros(2, 3))
    assert torch.equal(package, torch.zeros(2, 1, 4)) and torch.equal(mass, torch.zeros(2))


def test_keep_mask_bias_hides_pruned_keys_but_not_self():
    alive = torch.tensor([[1.0, 0.0, 1.0]])
    bias = keep_mask_bias(alive, heads=2)
    assert bias.shape == (2, 3, 3)
    assert bias[0, 0, 1] < -13 and bias[0, 1, 1] == 0 and abs(bias[0, 2, 0]) < 1e-5
    scores = torch.softmax(torch.zeros(3, 3) + bias[0], dim=-1)
    assert scores[0, 1] < 1e-5 and torch.allclose(scores[0, 0], torch.tensor(0.5), atol=1e-5)


def test_ratio_loss_is_zero_at_target_and_grows_with_the_gap():
    model = small(ratio_weight=1.0)
    assert model.ratio_loss().item() == 0.0  # before any training forward
    targets = model.stage_targets  # 8/16 and 4/16
    model._kept = targets.expand(3, 2).clone()
    assert model.ratio_loss().item() == pytest.approx(0.0)
    model._kept = torch.tensor([[1.0, 1.0]])
    weights = model.stage_weights
    expected = weights[0] * 0.5 ** 2 + weights[1] * 0.75 ** 2
    assert model.ratio_loss().item() == pytest.approx(expected.item())
    # stage 0 governs blocks 1-2, stage 1 block 3 only: twice the MACs
    assert weights.tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-6)


def test_ratio_loss_drives_kept_fraction_to_target(one_thread):
    model = small(depth=2, prune_at=[1], keep_ratio=0.25, ratio_weight=10.0)
    optimizer = torch.optim.Adam(model.selectors.parameters(), lr=0.1)
    x = torch.randn(16, 1, 8, 8)
    model.train()
    model(x)
    start = model.kept_fractions().mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        # a zero task loss: only the ratio loss attached to the output trains the selector
        (model(x) * 0).sum().backward()
        optimizer.step()
    model(x)
    end = model.kept_fractions().mean().item()
    assert start > 0.4  # untrained: about half kept or more
    assert abs(end - 0.25) < 0.08


def test_summary_counts_the_pruned_sequence():
    model = small()
    table = nmsparse.summary(model, torch.randn(1, 1, 8, 8))
    rows = {row.name: row for row in table.rows}
    dim, hidden = 16, 64
    for index, tokens in ((0, 17), (1, 10), (2, 10), (3, 6)):
        prefix = f"backbone.blocks.{index}"
        assert rows[f"{prefix}.attn"].macs_dense == tokens * 3 * dim * dim
        assert rows[f"{prefix}.attn.out_proj"].macs_dense == tokens * dim * dim
        assert rows[f"{prefix}.attn:attention"].macs_dense == 2 * tokens * tokens * dim
        assert rows[f"{prefix}.mlp.0"].macs_dense == tokens * dim * hidden
    # selector 0 scores 16 candidates on 2 heads, selector 1 the 8 kept ones
    assert rows["selectors.0.local"].macs_dense == 16 * 2 * 8 * 4
    assert rows["selectors.1.local"].macs_dense == 8 * 2 * 8 * 4


def test_composes_with_2_of_4_weights():
    model = small()
    handle = nmsparse.sparsify(model, "2:4", method="srste", exclude=["backbone.head"])
    assert len(handle.layers) > 0
    model.train()
    out = model(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    table = nmsparse.summary(model, torch.randn(1, 1, 8, 8))
    rows = {row.name: row for row in table.rows}
    assert rows["backbone.blocks.3.mlp.0"].macs_sparse * 2 == rows[
        "backbone.blocks.3.mlp.0"].macs_dense
    assert rows["backbone.blocks.3.mlp.0"].macs_dense == 6 * 16 * 64
    assert nmsparse.check(model, "2:4", exclude=["backbone.head"]).ok


def test_training_needs_known_block_layout():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])

        def tokens(self, x):
            return x

        def classify(self, x):
            return x[:, 0]

    model = TokenPruningViT(Plain(), dim=4, heads=2, patches=6, prune_at=[1], keep_ratio=0.5)
    x = torch.randn(2, 7, 4)
    assert model.eval()(x).shape == (2, 4)  # inference works with any block
    with pytest.raises(ValueError, match="pre-LN blocks"):
        model.train()(x)


@pytest.mark.parametrize("options, match", [
    ({"prune_at": [0]}, "prune_at"), ({"prune_at": [4]}, "prune_at"),
    ({"prune_at": 2}, "prune_at"), ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"tau": 0}, "tau"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as error:
        small(**options)
    assert "\n" not in str(error.value)
