"""sparsify / finalize / checkpoints: selection, reports, errors and round trips."""

import copy
import io

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.engine.masks import nm_mask


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.grouped(self.layer1(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def dense(module, name="weight"):
    return module._parameters[name]


def test_report_lists_every_eligible_layer_with_reasons():
    model = Net()
    handle = nmsparse.sparsify(model, "2:4", exclude="fc")
    rows = {layer.name: layer for layer in handle.layers}
    assert list(rows) == ["stem.weight", "layer1.0.weight", "grouped.weight", "fc.weight"]
    assert not rows["stem.weight"].sparse and "not divisible by M=4" in rows["stem.weight"].reason
    assert "(8, 3, 3, 3)" in rows["stem.weight"].reason
    assert rows["fc.weight"].reason == "excluded by 'fc'"
    assert str(rows["layer1.0.weight"].pattern) == "2:4"
    assert rows["grouped.weight"].shape == (8, 4, 3, 3)  # grouped by its per-group input dim
    table = str(handle)
    assert "2 of 4 eligible weights sparse" in table
    for name in rows:
        assert name in table
    assert set(handle.masks()) == {"layer1.0.weight", "grouped.weight"}


def test_conv_masks_group_along_input_channels():
    model = Net()
    nmsparse.sparsify(model, "2:4")
    conv = model.layer1[0]
    assert torch.equal(conv.weight_mask, nm_mask(dense(conv).detach(), 2, 4, "in"))
    counts = conv.weight_mask.permute(0, 2, 3, 1).reshape(-1, 4).sum(-1)
    assert counts.eq(2).all()


def test_flat_layout_masks_memory_order():
    model = Net()
    nmsparse.sparsify(model, "2:4", layout="flat", include=["layer1.*"])
    conv = model.layer1[0]
    assert torch.equal(conv.weight_mask, nm_mask(dense(conv).detach(), 2, 4, "flat"))
    assert conv.weight_mask.reshape(-1, 4).sum(-1).eq(2).all()


def test_include_and_per_layer_patterns_first_match_wins():
    model = Net()
    handle = nmsparse.sparsify(model, {"fc": None, "layer1.*": "1:4", "*": "2:8"},
                               exclude=["stem"])
    patterns = {layer.name: layer.pattern for layer in handle.layers}
    assert str(patterns["layer1.0.weight"]) == "1:4"
    assert patterns["grouped.weight"] is None
    assert patterns["fc.weight"] is None
    reasons = {layer.name: layer.reason for layer in handle.layers}
    assert reasons["fc.weight"] == "dense by pattern rule 'fc'"
    assert "not divisible by M=8" in reasons["grouped.weight"]  # 4 input channels per group
    model2 = Net()
    handle2 = nmsparse.sparsify(model2, "2:4", include=["layer1.0", "grouped"])
    assert [layer.name for layer in handle2.sparse_layers] == ["layer1.0.weight",
                                                                "grouped.weight"]
    assert "not matched by include" in {layer.reason for layer in handle2.layers}


def test_multihead_attention_projections():
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    handle = nmsparse.sparsify(attn, "2:4")
    assert [layer.name for layer in handle.sparse_layers] == ["in_proj_weight",
                                                               "out_proj.weight"]
    x = torch.randn(2, 5, 16)
    out, _ = attn(x, x, x)
    out.sum().backward()
    assert dense(attn, "in_proj_weight").grad is not None
    expected = nn.MultiheadAttention(16, 4, batch_first=True)
    state = {k: v for k, v in attn.state_dict().items() if not k.endswith("_mask")}
    expected.load_state_dict(state)
    with torch.no_grad():
        expected.in_proj_weight.mul_(attn.in_proj_weight_mask)
        expected.out_proj.weight.mul_(attn.out_proj.weight_mask)
    torch.testing.assert_close(out, expected(x, x, x)[0])
    separate = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    names = [layer.name for layer in nmsparse.sparsify(separate, "2:4").sparse_layers]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_conv1d_and_conv3d():
    model = nn.Sequential(nn.Conv1d(8, 4, 3), nn.Flatten(), nn.Unflatten(1, (4, 1, 2, 2, 2)))
    model3 = nn.Conv3d(4, 4, 2)
    assert len(nmsparse.sparsify(model, "1:4").sparse_layers) == 1
    assert len(nmsparse.sparsify(model3, "2:4").sparse_layers) == 1
    model3(torch.randn(1, 4, 3, 3, 3)).sum().backward()


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": "4:2"}, "accepted"),
    ({"pattern": "2/4"}, "accepted"),
    ({"method": "magic"}, "unknown method 'magic'; accepted: asp, .*fixed, .*srste, .*ste"),
    ({"method": "ste", "decay": 1e-3}, "takes no decay"),
    ({"decay": -1.0}, "decay must be a finite number >= 0"),
    ({"layout": "out"}, "unknown layout 'out'"),
    ({"exclude": ["fcc"]}, "exclude glob 'fcc' matches no eligible layer"),
    ({"include": "nothing*"}, "include glob 'nothing\\*' matches no eligible layer"),
    ({"pattern": {"nope": "2:4"}}, "pattern glob 'nope' matches no eligible layer"),
    ({"pattern": "dense"}, "no layer of the model can take"),
    ({"strict": True}, "stem.weight: input dimension \\(dim 1\\) 3"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, message):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        nmsparse.sparsify(model, **kwargs)
    assert model.state_dict().keys() == before.keys()
    assert type(model.fc) is nn.Linear
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_non_finite_weight_raises_naming_layer_and_changes_nothing():
    model = Net()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'fc.weight' contains NaN or Inf"):
        nmsparse.sparsify(model, "2:4")
    assert type(model.layer1[0]) is nn.Conv2d and "weight_mask" not in model.layer1[0]._buffers


def test_sparsify_twice_is_an_error_and_no_eligible_layer_is_an_error():
    model = Net()
    nmsparse.sparsify(model, "2:4")
    with pytest.raises(ValueError, match="already sparse; call nmsparse.finalize"):
        nmsparse.sparsify(model, "2:4")
    with pytest.raises(ValueError, match="no layer nmsparse can make sparse"):
        nmsparse.sparsify(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "2:4")
    with pytest.raises(ValueError, match="lazy module"):
        nmsparse.sparsify(nn.LazyLinear(4), "2:4")


def test_tied_weights_stay_dense_unless_asked_and_then_every_reader_is_sparse():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    handle = nmsparse.sparsify(nn.Sequential(a, b, nn.Linear(8, 4)), "2:4")
    assert [layer.sparse for layer in handle.layers] == [False, False, True]
    assert "tied to 1.weight: kept dense (tied='sparse'" in handle.layers[0].reason
    assert "tied to 0.weight: kept dense" in handle.layers[1].reason

    model = nn.Sequential(a, b)
    handle = nmsparse.sparsify(model, "2:4", tied="sparse")
    assert [layer.sparse for layer in handle.layers] == [True, False]
    assert handle.layers[1].reason == "tied to 0.weight: reads its sparse weight"
    assert torch.equal(b.weight, a.weight) and (a.weight == 0).sum() == 32  # both masked
    x = torch.randn(3, 8)
    expected = model(x)
    nmsparse.finalize(model)
    assert type(a) is nn.Linear and type(b) is nn.Linear and "_nmsparse_tied" not in b.__dict__
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tied must be 'dense' or 'sparse'"):
        nmsparse.sparsify(model, "2:4", tied="yes")


def train(model, steps, seed, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_state_dict_holds_masks_and_resume_is_bit_identical():
    torch.manual_seed(3)
    model = Net()
    nmsparse.sparsify(model, "2:4", exclude="stem")
    opt = train(model, 3, seed=1)
    assert "layer1.0.weight_mask" in model.state_dict()
    assert model.state_dict()["layer1.0.weight_mask"].dtype == torch.bool
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, 3, seed=2, opt=opt)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Net()
    nmsparse.sparsify(resumed, "2:4", exclude="stem")
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(saved["opt"])
    train(resumed, 3, seed=2, opt=opt2)
    expected, got = model.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def test_fixed_mask_comes_back_from_the_state_dict():
    model = nn.Linear(8, 4)
    nmsparse.sparsify(model, "2:4", method="fixed")
    state = model.state_dict()
    other = nn.Linear(8, 4)
    nmsparse.sparsify(other, "2:4", method="fixed")
    other.load_state_dict(state)
    assert torch.equal(other.weight_mask, state["weight_mask"])
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_finalize_restores_classes_keys_and_outputs():
    model = Net()
    reference_keys = list(model.state_dict())
    handle = nmsparse.sparsify(model, "2:4")
    train(model, 2, seed=0)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    masks = {name: mask.clone() for name, mask in handle.masks().items()}
    assert nmsparse.finalize(model) is model
    assert type(model.layer1[0]) is nn.Conv2d and type(model.fc) is nn.Linear
    assert list(model.state_dict()) == reference_keys
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    plain = Net().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    assert not plain.layer1[0].weight[~masks["layer1.0.weight"]].any()
    assert nmsparse.check(plain, "2:4", exclude="stem").ok
    assert nmsparse.finalize(model) is model  # idempotent


def test_check_reports_violations_on_models_and_state_dicts():
    model = Net()
    report = nmsparse.check(model, "2:4")
    assert not report.ok and {row.name for row in report.violations} == {
        "layer1.0.weight", "grouped.weight", "fc.weight"}
    stem = next(row for row in report.rows if row.name == "stem.weight")
    assert stem.status == "skipped" and "not divisible" in stem.note
    with pytest.raises(nmsparse.NMViolationError, match="3 layer\\(s\\) violate"):
        nmsparse.check(model, "2:4", raise_on_violation=True)
    nmsparse.sparsify(model, "2:4")
    assert nmsparse.check(model, "2:4").ok  # the live masks are checked
    assert nmsparse.check(model.state_dict(), "2:4", exclude="stem").ok
    assert not nmsparse.check(model.state_dict(), "1:4", exclude="stem").ok
    finalized = copy.deepcopy(model)
    nmsparse.finalize(finalized)
    assert nmsparse.check(finalized.state_dict(), "2:4", exclude="stem").ok
    row = nmsparse.check(finalized, "1:4", exclude="stem").violations[0]
    assert row.max_kept == 2 and row.violating_groups == row.groups
    with pytest.raises(ValueError, match="nn.Module or a state dict"):
        nmsparse.check([1, 2], "2:4")


def test_check_golden_counts():
    weight = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    report = nmsparse.check({"fc.weight": weight}, "2:4")
    (row,) = report.rows
    assert (row.groups, row.violating_groups, row.max_kept) == (2, 1, 3)


def test_deepcopy_and_device_moves_keep_working():
    model = Net()
    nmsparse.sparsify(model, "2:4")
    clone = copy.deepcopy(model)
    opt = torch.optim.SGD(clone.parameters(), lr=1.0)
    x = torch.randn(2, 3, 6, 6)
    clone(x).sum().backward()
    g = dense(clone.fc).grad.clone()
    w0, m0 = dense(clone.fc).detach().clone(), clone.fc.weight_mask.clone()
    opt.step()  # the copy's optimizer still applies the refinement term
    torch.testing.assert_close(dense(clone.fc).detach(),
                               w0 - (g + 2e-4 * (~m0) * w0), rtol=0, atol=1e-7)
    model.double()
    assert model(x.double()).dtype == torch.float64
    assert model.fc.weight.dtype == torch.float64


def test_whole_model_pickles_and_keeps_training():
    model = Net()
    nmsparse.sparsify(model, "2:4", decay=0.05)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.fc).__name__ == "SparseLinear" and isinstance(loaded.fc, nn.Linear)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (model, loaded)]
    for m, opt in zip((model, loaded), opts, strict=True):
        m(x).sum().backward()
        opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert "SparseLinear(in_features=8" in repr(model)
