"""Block-DCT input: DCT against scipy and a loop reference, round trip, YCbCr, the adapted
ResNets (shapes, MACs against the downsampled baseline), the channel gate reaching its
target and picking the informative channels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn

import nmsparse
from nmsparse.app.data.frequency import BlockDCT, dct_matrix
from nmsparse.app.models import create_model
from nmsparse.app.models.frequency import ChannelGate, top_channels


def test_dct_matrix_matches_the_formula_and_is_orthonormal():
    d = dct_matrix(4, torch.float64)
    assert d[0, 2].item() == pytest.approx(0.5)
    assert d[1, 0].item() == pytest.approx(math.sqrt(0.5) * math.cos(math.pi / 8))
    assert torch.allclose(d @ d.T, torch.eye(4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("block", [2, 4, 8])
def test_block_dct_matches_scipy_per_block(block):
    torch.manual_seed(block)
    images = torch.randn(2, 1, 2 * block, 3 * block, dtype=torch.float64)
    coeffs = BlockDCT(block)(images)
    assert coeffs.shape == (2, block * block, 2, 3)
    for b in range(2):
        for gy in range(2):
            for gx in range(3):
                tile = images[b, 0, gy * block:(gy + 1) * block, gx * block:(gx + 1) * block]
                reference = dctn(tile.numpy(), type=2, norm="ortho")
                got = coeffs[b, :, gy, gx].reshape(block, block).numpy()
                np.testing.assert_allclose(got, reference, atol=1e-10)


def test_dc_channel_is_block_times_block_mean():
    images = torch.arange(64.0).reshape(1, 1, 8, 8)
    coeffs = BlockDCT(4)(images)
    means = images.reshape(1, 2, 4, 2, 4).mean(dim=(2, 4))
    assert torch.allclose(coeffs[:, 0], 4 * means)


def test_colour_goes_through_ycbcr_and_round_trips():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 8, dtype=torch.float64)
    dct = BlockDCT(8)
    coeffs = dct(images)
    assert coeffs.shape == (3, 192, 2, 1)
    # channel 0 is the DC of Y = 0.299 R + 0.587 G + 0.114 B
    y = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(coeffs[:, 0, 0, 0], 8 * y[:, :8, :8].mean(dim=(1, 2)))
    # a gray image has no chroma: Cb and Cr channels (64..191) are zero
    gray = images[:, :1].expand(-1, 3, -1, -1)
    assert dct(gray)[:, 64:].abs().max() < 1e-6
    assert torch.allclose(dct.inverse(coeffs, 3), images, atol=1e-10)
    single = images[:, :1]
    assert torch.allclose(dct.inverse(dct(single), 1), single, atol=1e-12)


@pytest.mark.parametrize("shape, match", [((1, 1, 10, 8), "multiple"),
                                          ((1, 2, 8, 8), "grayscale"), ((8, 8), "batch")])
def test_bad_images_are_one_line_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        BlockDCT(4)(torch.zeros(shape))


def test_dct_resnet_shapes_strides_and_macs_against_downsampling():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    dct = create_model("dct_resnet", input_shape=(1, 28, 28), num_classes=10, block=4,
                       width=0.25)
    down = create_model("downsampled_resnet", input_shape=(1, 28, 28), num_classes=10,
                        factor=4, width=0.25)
    assert dct(x).shape == down(x).shape == (2, 10)
    assert dct.trunk.conv1.in_channels == 16 and down.trunk.conv1.in_channels == 1
    assert dct.trunk.layer3[0].conv1.stride == (1, 1)  # both reductions removed for block 4
    rows_dct = {r.name: r for r in nmsparse.summary(dct, x[:1]).rows}
    rows_down = {r.name: r for r in nmsparse.summary(down, x[:1]).rows}
    # the trunk runs on the same 7x7 grid; only the stem's input channels differ (16 vs 1)
    assert rows_dct["trunk.layer3.0.conv2"].macs_dense == rows_down[
        "trunk.layer3.0.conv2"].macs_dense == 49 * 16 * 16 * 9
    assert rows_dct["trunk.conv1"].macs_dense == 16 * rows_down["trunk.conv1"].macs_dense
    selected = create_model("dct_resnet", input_shape=(1, 28, 28), num_classes=10, block=4,
                            channels=[0, 5, 1], width=0.25)
    assert selected.trunk.conv1.in_channels == 3
    assert selected.channels.tolist() == [0, 1, 5]


@pytest.mark.parametrize("options, match", [
    ({"block": 3}, "multiple"), ({"channels": [16]}, "channels"), ({"channels": []}, "channels"),
    ({"gate_target": 1.5}, "gate_target"), ({"base": "resnet18"}, "base"),
])
def test_bad_dct_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as error:
        create_model("dct_resnet", input_shape=(1, 28, 28), num_classes=10,
                     **{"block": 4, **options})
    assert "\n" not in str(error.value)


def test_gate_reaches_its_sparsity_target_and_keeps_informative_channels(one_thread):
    """16 channels, the label depends on channels 3, 7, 9 and 12 only; a gate with target
    0.25 in front of a linear model must end up keeping exactly those 4."""
    torch.manual_seed(0)
    informative = [3, 7, 9, 12]
    x = torch.randn(512, 16, 1, 1)
    y = (x[:, informative, 0, 0] * torch.tensor([1.0, -1.0, 1.0, -1.0])).sum(1)
    gate = ChannelGate(16, target=0.25, weight=4.0)
    head = torch.nn.Linear(16, 1)
    optimizer = torch.optim.Adam([*gate.parameters(), *head.parameters()], lr=0.05)
    gate.train()
    for _ in range(400):
        prediction = head(gate(x).flatten(1)).squeeze(1)
        loss = (prediction - y).pow(2).mean() + gate.gate_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gate.kept_fraction() == pytest.approx(0.25, abs=1 / 16)
    assert top_channels(gate, 4) == informative
    gate.eval()
    assert torch.equal(gate(x)[:, informative], x[:, informative])
    assert gate.gate_loss().item() == 0.0  # no loss from an inference forward


def test_gated_model_adds_its_gate_loss():
    model = create_model("dct_resnet", input_shape=(1, 8, 8), num_classes=3, block=4,
                         gate_target=0.5, gate_weight=2.0, width=0.25).train()
    model(torch.randn(2, 1, 8, 8))
    kept = model.gate._decision.mean()
    assert model.auxiliary_loss().item() == pytest.approx(2.0 * (kept.item() - 0.5) ** 2)
