"""CHEX: leverage-score pruning, budgeted re-allocation, regrowth with saved values, masks
that survive the optimizer, and an exported smaller model equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.app.models import create_model
from nmsparse.channels import Chex, allocate, leverage_scores, projection_residuals


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 3))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def parameters(model):
    return sum(p.numel() for p in model.parameters())


def dropped_are_zero(chex):
    tensors = dict(chex.model.named_parameters())
    for group, keep in zip(chex.groups, chex.keep, strict=True):
        for piece in group.producers + group.consumers:
            window = tensors[piece.tensor].narrow(piece.dim, piece.start, piece.length)
            if window.index_select(piece.dim, (~keep).nonzero().flatten()).abs().sum() != 0:
                return False
    return True


def test_leverage_scores_by_hand_and_dominant_columns():
    basis = torch.zeros(5, 3)
    basis[0, 0] = 1.0
    basis[1, 1] = 2.0  # orthogonal columns: rank-2 leverage is 1, 1 and 0 for the zero one
    assert torch.allclose(leverage_scores(basis, 2), torch.tensor([1.0, 1.0, 0.0],
                                                                   dtype=torch.float64))
    torch.manual_seed(0)
    matrix = 1e-3 * torch.randn(20, 8)
    matrix[:, 2] += torch.randn(20)
    matrix[:, 5] += torch.randn(20)
    top = leverage_scores(matrix, 2).topk(2).indices.sort().values
    assert top.tolist() == [2, 5]
    # the residual of a column inside the span is 0, of an orthogonal one its norm
    residual = projection_residuals(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]),
                                    torch.tensor([[1.0], [1.0], [0.0]]))
    assert torch.allclose(residual, torch.tensor([0.0, 3.0], dtype=torch.float64))


def test_allocate_is_proportional_bounded_and_exact():
    assert allocate([1.0, 3.0], [16, 16], 16, 4) == [4, 12]
    assert allocate([1.0, 100.0], [8, 8], 12, 4) == [4, 8]  # capped at the size
    assert allocate([0.0, 5.0, 5.0], [8, 8, 8], 12, 4) == [4, 4, 4]  # at least one multiple
    widths = allocate([0.3, 2.0, 0.7, 1.1], [32, 16, 64, 24], 68, 4)
    assert sum(widths) == 68 and all(w % 4 == 0 and w >= 4 for w in widths)


@pytest.mark.parametrize("multiple_of", [1, 4])
def test_widths_follow_the_budget_through_explorations(multiple_of):
    torch.manual_seed(0)
    model = mlp()
    chex = Chex(model, torch.randn(2, 12), budget=0.5, every=2, until=6,
                multiple_of=multiple_of)
    assert len(chex.groups) == 2
    for _ in range(4):
        assert sum(chex.widths) == 16
        assert all(w % multiple_of == 0 and w >= multiple_of for w in chex.widths)
        assert [int(k.sum()) for k in chex.keep_masks()] == chex.widths
        with torch.no_grad():
            model[1].weight[:, 0].add_(1.0)  # move the importance around
        chex.explore()


def test_regrowth_restores_the_saved_values_exactly():
    torch.manual_seed(0)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    chex = Chex(model, torch.randn(2, 12), budget=0.5)
    dropped = (~chex.keep[0]).nonzero().flatten()
    assert dropped.numel() == 8 and dropped_are_zero(chex)
    back = chex.regrow_group(0, 3)
    assert back.numel() == 3 and bool(chex.keep[0][back].all())
    for piece in chex.groups[0].members:
        now = model.state_dict()[piece.tensor].index_select(piece.dim, back)
        assert torch.equal(now, before[piece.tensor].index_select(piece.dim, back))


def test_masked_channels_stay_zero_under_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = ConvBN()
    x, y = torch.randn(8, 3, 5, 5), torch.randint(0, 4, (8,))
    chex = Chex(model, x[:2], budget=0.5, every=3, until=9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    chex.attach(optimizer)
    for _ in range(12):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert dropped_are_zero(chex)
    assert chex.step == 12 and sum(chex.widths) == 8


def test_regrown_channels_start_with_fresh_optimizer_state():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    chex = Chex(model, x[:2], budget=1.0, every=1000, until=1000)  # all channels train
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    chex.attach(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    chex.prune_group(0, 10)  # drop 6 channels that have momentum
    chex.enforce()
    tensors = dict(model.named_parameters())
    before = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in tensors.items()}
    back = chex.regrow_group(0, 2)
    producer = chex.groups[0].producers[0]
    had = before[producer.tensor].narrow(producer.dim, producer.start, producer.length)
    assert had.index_select(producer.dim, back).abs().sum() > 0  # so the reset is visible
    touched = set()
    for piece in chex.groups[0].members:
        buffer = optimizer.state[tensors[piece.tensor]]["momentum_buffer"]
        window = buffer.narrow(piece.dim, piece.start, piece.length)
        assert window.index_select(piece.dim, back).abs().sum() == 0, piece.tensor
        touched.add(piece.tensor)
        before_window = before[piece.tensor].narrow(piece.dim, piece.start, piece.length)
        keep = torch.ones(piece.length, dtype=torch.bool)
        keep[back] = False
        index = keep.nonzero().flatten()
        assert torch.equal(window.index_select(piece.dim, index),
                           before_window.index_select(piece.dim, index))
    consumer = next(p.tensor for p in chex.groups[0].consumers)
    assert before[consumer].abs().sum() > 0 and consumer in touched


def resnet20():
    return create_model("resnet20", input_shape=(1, 8, 8), num_classes=3, width=0.5)


@pytest.mark.parametrize("build, shape", [(mlp, (5, 12)), (ConvBN, (5, 3, 6, 6)),
                                          (resnet20, (5, 1, 8, 8))])
def test_export_equals_the_masked_model_and_is_smaller(build, shape):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    chex = Chex(model, x[:2], budget=0.5, every=1, until=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chex.attach(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    small = chex.export().eval()
    assert parameters(small) < parameters(model)
    assert torch.allclose(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_composes_with_nm_when_widths_are_multiples_of_m():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(),
                          nn.Linear(20, 4))
    chex = Chex(model, torch.randn(2, 16), budget=0.5, multiple_of=4)
    small = chex.export()
    assert all(small[i].in_features % 4 == 0 for i in (2, 4))
    handle = nmsparse.sparsify(small, "2:4")
    assert handle is not None
    assert small(torch.randn(3, 16)).shape == (3, 4)


def test_state_dict_round_trip_and_bad_arguments():
    torch.manual_seed(0)
    example = torch.randn(2, 12)
    chex = Chex(mlp(), example, budget=0.5, every=1, until=5)
    chex.after_step()
    other = Chex(mlp(), example, budget=0.75)
    other.load_state_dict(chex.state_dict())
    assert other.step == 1 and other.widths == chex.widths
    pairs = zip(other.keep_masks(), chex.keep_masks(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match="budget"):
        Chex(mlp(), example, budget=0)
    with pytest.raises(ValueError, match="no channel group"):
        Chex(nn.Linear(12, 3), example)


def test_fixed_widths_explore_channels_only():
    torch.manual_seed(0)
    model = mlp()
    chex = Chex(model, torch.randn(2, 12), budget=0.5, every=1, until=4, reallocate=False)
    first = list(chex.widths)
    with torch.no_grad():
        model[1].weight[:4].mul_(10)  # would pull width to the first group
    for _ in range(4):
        chex.after_step()
        assert chex.widths == first
        assert [int(k.sum()) for k in chex.keep] == first


def test_importance_is_batchnorm_gamma_else_producer_row_norms():
    torch.manual_seed(0)
    model = ConvBN()
    chex = Chex(model, torch.randn(2, 3, 5, 5), budget=0.5)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8]))
    expected = float(model.bn1.weight.abs()[chex.keep[0]].sum())
    assert chex.importance(0) == pytest.approx(expected)
    mlp_model = mlp()
    mlp_chex = Chex(mlp_model, torch.randn(2, 12), budget=0.5)
    keep = mlp_chex.keep[0]
    rows = torch.cat([mlp_model[1].weight, mlp_model[1].bias[:, None]], 1)
    assert mlp_chex.importance(0) == pytest.approx(float(rows.norm(dim=1)[keep].sum()))
