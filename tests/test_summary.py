"""Golden, hand-computed numbers for nmsparse.summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from nmsparse.summary import LayerRow, ModelSummary, _human, summary


def row(s: ModelSummary, name: str) -> LayerRow:
    (match,) = [r for r in s.rows if r.name == name]
    return match


def two_of_four(shape: tuple[int, ...]) -> torch.Tensor:
    """Bool mask keeping the first 2 of every 4 consecutive entries (row-major)."""
    n = int(np.prod(shape))
    return (torch.arange(n) % 4 < 2).reshape(shape)


def total_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- layer MACs


def test_linear_over_sequence_dims():
    lin = nn.Linear(8, 4)
    s = summary(lin, torch.randn(3, 5, 8))
    r = row(s, "")
    assert r.macs_dense == r.macs_sparse == 3 * 5 * 8 * 4  # 480
    assert (r.params_dense, r.params_kept) == (8 * 4 + 4, 36)
    assert r.weight_shapes == ((4, 8),)
    assert r.density == 1.0 and r.calls == 1


def test_conv2d_stride_padding_groups():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    s = summary(conv, torch.randn(2, 4, 9, 9))
    r = row(s, "")
    # H_out = floor((9 + 2*1 - 3) / 2) + 1 = 5  ->  output (2, 8, 5, 5): 400 elements
    assert r.macs_dense == 400 * (4 // 2) * 3 * 3 == 7200
    assert r.params_dense == 8 * 2 * 3 * 3 + 8 == 152


def test_conv1d_dilation():
    conv = nn.Conv1d(3, 6, 5, padding=1, dilation=2)
    s = summary(conv, torch.randn(2, 3, 20))
    # L_out = floor((20 + 2 - 2*(5-1) - 1) / 1) + 1 = 14  ->  output (2, 6, 14)
    assert row(s, "").macs_dense == 2 * 6 * 14 * 3 * 5 == 2520
    assert row(s, "").params_dense == 6 * 3 * 5 + 6


def test_conv3d_anisotropic_kernel_no_bias():
    conv = nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), bias=False)
    s = summary(conv, torch.randn(1, 2, 4, 7, 7))
    # D_out = 4, H_out = W_out = floor((7 - 3) / 2) + 1 = 3  ->  output (1, 4, 4, 3, 3)
    assert row(s, "").macs_dense == 1 * 4 * 4 * 3 * 3 * 2 * 9 == 2592
    assert row(s, "").params_dense == 4 * 2 * 9 == 72


def test_conv_transpose2d():
    deconv = nn.ConvTranspose2d(4, 6, 3, stride=2)
    s = summary(deconv, torch.randn(2, 4, 5, 5))
    # each of the 2*4*5*5 input elements is multiplied by out_channels * 3 * 3 weights
    assert row(s, "").macs_dense == 2 * 4 * 5 * 5 * 6 * 9 == 10800


def test_unbatched_conv_and_linear_vector():
    s = summary(nn.Conv1d(3, 2, 3), torch.randn(3, 10))  # (C, L) -> (2, 8)
    assert row(s, "").macs_dense == 2 * 8 * 3 * 3
    s = summary(nn.Linear(8, 4), torch.randn(8))
    assert row(s, "").macs_dense == 32


# ----------------------------------------------------------------- masks and finalized zeros


def test_mask_buffer_counts_kept_params_and_sparse_macs():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        mlp[0].weight.fill_(1.0)  # dense weight fully nonzero: the mask, not zeros, decides
        mlp[0].weight[0, 0] = 0.0  # ...even where the dense weight happens to be 0 but kept
    mlp[0].register_buffer("weight_mask", two_of_four((16, 8)))
    s = summary(mlp, torch.randn(5, 8))

    first, last = row(s, "0"), row(s, "2")
    assert (first.params_dense, first.params_kept) == (16 * 8 + 16, 64 + 16)
    assert first.density == 0.5
    assert (first.macs_dense, first.macs_sparse) == (5 * 8 * 16, 5 * 64)
    assert (last.params_dense, last.params_kept) == (68, 68)
    assert last.macs_dense == last.macs_sparse == 5 * 16 * 4

    assert s.total.params_dense == total_numel(mlp) == 212
    assert s.total.params_kept == 80 + 68
    assert (s.total.macs_dense, s.total.macs_sparse) == (640 + 320, 320 + 320)
    assert s.total.density == pytest.approx((64 + 64) / (128 + 64))
    assert s.compression == pytest.approx(212 / 148)
    assert s.mac_reduction == pytest.approx(960 / 640)
    assert [r.name for r in s.rows] == ["0", "2"]  # ReLU has no parameters


def test_mask_shape_mismatch_raises():
    lin = nn.Linear(8, 4)
    lin.register_buffer("weight_mask", torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"weight_mask has shape \(8, 4\).*\(4, 8\)"):
        summary(lin, torch.randn(2, 8))


def test_finalized_zeros_are_not_kept():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8).abs().add(0.1) * two_of_four((4, 8)))
        lin.bias.zero_()  # biases always count in full, zeros or not
    s = summary(lin, torch.randn(3, 8))
    r = row(s, "")
    assert (r.params_dense, r.params_kept) == (36, 16 + 4)
    assert r.density == 0.5
    assert (r.macs_dense, r.macs_sparse) == (3 * 32, 3 * 16)


# ---------------------------------------------------------------------- multi-head attention


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(query, kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_projections_counted_once(batch_first):
    model = SelfAttention(batch_first)
    # batch 2, query length 5, key/value length 7, embed 8
    q, kv = (torch.randn(2, 5, 8), torch.randn(2, 7, 8))
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    s = summary(model, (q, kv))

    assert [r.name for r in s.rows] == ["attn", "attn:attention", "attn.out_proj"]
    mha, attention, out_proj = s.rows
    assert mha.macs_dense == 2 * 5 * 64 + 2 * 7 * 64 + 2 * 7 * 64  # q, k, v projections
    assert mha.params_dense == 3 * 64 + 3 * 8
    assert mha.weight_shapes == ((24, 8),)
    assert out_proj.macs_dense == 2 * 5 * 64 and out_proj.calls == 1
    assert out_proj.params_dense == 64 + 8
    assert attention.macs_dense == attention.macs_sparse == 2 * 2 * 5 * 7 * 8
    assert attention.params_dense == 0
    assert s.total.macs_dense == 2432 + 640 + 1120
    assert s.total.params_dense == total_numel(model) == 288


def test_mha_in_proj_mask_is_exact_per_q_k_v_third():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    mask = torch.zeros(24, 8, dtype=torch.bool)
    mask[:8] = True  # q: all kept
    mask[8:16] = two_of_four((8, 8))  # k: half kept; v: nothing kept
    mha.register_buffer("in_proj_weight_mask", mask)
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    s = summary(mha, {"query": q, "key": kv, "value": kv})  # kwargs reach the hook too
    r = row(s, "")
    assert r.macs_dense == 2 * 5 * 64 + 2 * 2 * 7 * 64
    assert r.macs_sparse == 2 * 5 * 64 + 2 * 7 * 32 + 0
    assert r.params_kept == 64 + 32 + 24
    assert r.density == pytest.approx(96 / 192)


def test_mha_separate_kdim_vdim_bias_kv_and_unbatched():
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, add_bias_kv=True, add_zero_attn=True)
    # unbatched: query (5, 8), key (7, 6), value (7, 4)
    s = summary(mha, (torch.randn(5, 8), torch.randn(7, 6), torch.randn(7, 4)))
    r = row(s, "")
    assert r.weight_shapes == ((8, 8), (8, 6), (8, 4))
    assert r.macs_dense == 5 * 64 + 7 * 48 + 7 * 32
    assert r.params_dense == 64 + 48 + 32 + 24 + 8 + 8  # + in_proj_bias, bias_k, bias_v
    # scores over 7 keys + bias_k + zero-attention position
    assert row(s, ":attention").macs_dense == 2 * 5 * (7 + 1 + 1) * 8
    assert s.total.params_dense == total_numel(mha)


def test_transformer_encoder_layer_children_are_counted_in_eval():
    # its fused eval fast path would skip the child modules; attached hooks turn it off
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True).eval()
    s = summary(layer, torch.randn(2, 5, 8))
    assert row(s, "self_attn").macs_dense == 3 * 10 * 64
    assert row(s, "self_attn:attention").macs_dense == 2 * 2 * 5 * 5 * 8
    assert row(s, "self_attn.out_proj").macs_dense == 10 * 64
    assert row(s, "linear1").macs_dense == row(s, "linear2").macs_dense == 10 * 8 * 16
    assert s.total.params_dense == total_numel(layer)


class CallsOutProj(nn.MultiheadAttention):
    """An attention whose forward also calls ``out_proj`` as a module."""

    def forward(self, query, key, value, **kwargs):
        out = super().forward(query, key, value, **kwargs)
        self.out_proj(query)
        return out


def test_out_proj_called_as_module_is_not_counted_twice():
    mha = CallsOutProj(8, 2, batch_first=True)
    s = summary(mha, (torch.randn(2, 5, 8),) * 3)
    out_proj = row(s, "out_proj")
    assert out_proj.calls == 1 and out_proj.macs_dense == 2 * 5 * 64


# ------------------------------------------------------------------------ reuse and sharing


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


def test_module_called_twice_counts_macs_twice_params_once():
    s = summary(Twice(), torch.randn(3, 4))
    r = row(s, "lin")
    assert r.calls == 2
    assert r.macs_dense == 2 * 3 * 4 * 4
    assert r.params_dense == 20 and s.total.params_dense == 20


def test_shared_parameter_counts_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    s = summary(model, torch.randn(2, 6))
    assert row(s, "a").params_dense == 42
    assert row(s, "b").params_dense == 6  # only its own bias
    assert row(s, "b").macs_dense == 2 * 36  # still computes with the shared weight
    assert s.total.params_dense == total_numel(model) == 48
    assert s.total.density == 1.0


def test_shared_sparse_weight_counts_once_in_total_density():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
    with torch.no_grad():
        model[0].weight.mul_(two_of_four((6, 6)))  # finalized 2:4, shared with layer 1
    model[1].weight = model[0].weight
    s = summary(model, torch.randn(2, 6))
    assert row(s, "1").density == 0.5 and row(s, "1").macs_sparse == 2 * 18
    assert s.total.density == pytest.approx((18 + 36) / (36 + 36))
    assert s.total.params_kept == 18 + 6 + 6 + 36 + 6


def test_mask_on_other_module_is_honoured():
    embed = nn.Embedding(10, 4)
    embed.register_buffer("weight_mask", two_of_four((10, 4)))
    s = summary(embed, torch.randint(0, 10, (3,)))
    r = row(s, "")
    assert (r.params_dense, r.params_kept, r.density) == (40, 20, 0.5)
    assert r.weight_shapes == ((10, 4),) and r.macs_dense == 0


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, tokens: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(self.embed(tokens).transpose(1, 2))).transpose(1, 2)
        return self.head(self.norm(x + extra)) * self.scale


def test_totals_cover_all_parameter_kinds():
    model = Mixed()
    tokens = torch.randint(0, 10, (2, 6))
    s = summary(model, {"tokens": tokens, "extra": torch.randn(2, 6, 4)})
    assert [r.name for r in s.rows] == ["", "embed", "conv", "bn", "norm", "head"]
    assert s.total.params_dense == s.total.params_kept == total_numel(model)
    for name in ("", "embed", "bn", "norm"):
        assert row(s, name).macs_dense == 0
        assert row(s, name).params_kept == row(s, name).params_dense
    assert row(s, "conv").macs_dense == 2 * 4 * 6 * 4 * 3
    assert row(s, "head").macs_dense == 2 * 6 * 4 * 3
    assert s.total.macs_dense == 2 * 4 * 6 * 4 * 3 + 2 * 6 * 4 * 3


# ------------------------------------------------------------------------ output and state


def test_str_table_and_to_dict():
    mlp = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    mlp[0].register_buffer("weight_mask", two_of_four((1000, 1000)))
    s = summary(mlp, torch.randn(1000, 1000))
    text = str(s)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["Layer", "Type"]
    first = next(line for line in lines if line.startswith("0 "))
    # params 1,001,000 dense / 501,000 kept; MACs 1e9 dense / 5e8 sparse
    assert first.split()[2:] == ["1000x1000", "1M", "501K", "50.0%", "1G", "500M"]
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert total.split()[-2:] == ["1.01G", "510M"]
    assert any(line.startswith("2 ") for line in lines)
    assert "Compression: 1.98x parameters" in text

    data = s.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["total"]["params_dense"] == total_numel(mlp)
    assert data["rows"][0]["weight_shapes"] == [[1000, 1000]]
    assert data["compression"] == pytest.approx(1011010 / 511010)


def test_all_pruned_compression_is_none_in_dict():
    lin = nn.Linear(4, 4, bias=False)
    lin.register_buffer("weight_mask", torch.zeros(4, 4, dtype=torch.bool))
    s = summary(lin, torch.randn(1, 4))
    assert s.compression == float("inf")
    json.dumps(s.to_dict(), allow_nan=False)
    assert s.to_dict()["compression"] is None


@pytest.mark.parametrize(("count", "text"), [
    (0, "0"), (999, "999"), (1000, "1K"), (25_600_000, "25.6M"), (4_090_000_000, "4.09G"),
    (999_499, "999K"), (999_950, "1M"), (123_456_789_012, "123G"),
])
def test_human_units(count, text):
    assert _human(count) == text


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks
               and not m._forward_hooks_with_kwargs for m in model.modules())


def test_hooks_removed_and_modes_restored():
    model = Mixed()
    model.train()
    model.norm.eval()  # mixed modes must come back exactly
    running_mean = model.bn.running_mean.clone()
    summary(model, (torch.randint(0, 10, (2, 6)), torch.randn(2, 6, 4)))
    assert no_hooks(model)
    assert model.training and model.bn.training and not model.norm.training
    assert torch.equal(model.bn.running_mean, running_mean)  # ran in eval mode


def test_forward_ran_once_under_no_grad_in_eval():
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            seen.append((torch.is_grad_enabled(), self.training))
            return self.lin(x)

    summary(Probe(), torch.randn(1, 2))
    assert seen == [(False, False)]


def test_cleanup_on_exception():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        summary(model, torch.randn(2, 4))
    assert no_hooks(model)
    assert model.training and model.lin.training


def test_device_argument_and_default():
    lin = nn.Linear(3, 2)
    assert row(summary(lin, torch.randn(2, 3), device="cpu"), "").macs_dense == 12
    assert row(summary(lin, torch.randn(2, 3)), "").macs_dense == 12
    s = summary(nn.ReLU(), torch.randn(2))  # no parameters at all: runs on the input as is
    assert s.rows == [] and s.total.params_dense == 0 and s.compression == 1.0


@pytest.mark.parametrize(("bad", "message"), [
    ([torch.randn(2, 3)], "got list; for positional arguments pass a tuple"),
    (np.zeros((2, 3), dtype=np.float32), "got ndarray; convert arrays with torch.as_tensor"),
    (3.0, "got float"),
    (None, "got NoneType"),
    ({0: torch.randn(2, 3)}, "dict keys must be str"),
])
def test_bad_example_input_raises(bad, message):
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="example_input") as info:
        summary(lin, bad)
    assert message in str(info.value)
    assert no_hooks(lin)
