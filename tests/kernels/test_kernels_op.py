"""The nm_linear op (fallback path), NMLinear, swap_linear_layers and torch.compile on CPU.

Everything here runs without Triton and without the CPU kernels: the autouse fixture removes
TRITON_INTERPRET and sets NMSPARSE_KERNELS=torch, so the op takes unpack + F.linear, which must
equal the dense layer exactly (the CPU kernels are tested in test_kernels_cpu.py).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmsparse
from nmsparse.engine.masks import nm_mask
from nmsparse.kernels import NMLinear, nm_linear, reference, swap_linear_layers
from nmsparse.packing import pack


@pytest.fixture(autouse=True)
def _fallback_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("NMSPARSE_KERNELS", "torch")


def nm_linear_layer(inp: int, out: int, n: int = 2, m: int = 4, bias: bool = True,
                    dtype: torch.dtype = torch.float32) -> nn.Linear:
    layer = nn.Linear(inp, out, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.masked_fill_(~nm_mask(layer.weight.float(), n, m), 0)
    return layer


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 16), (5, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_fallback_equals_dense_linear(n, m, dtype):
    layer = nm_linear_layer(64, 24, n, m, dtype=dtype)
    packed = pack(layer.weight.detach(), n, m)
    x = torch.randn(2, 5, 64, dtype=dtype)
    y = nm_linear(x, packed.values, packed.indices, n, m, layer.bias)
    assert y.shape == (2, 5, 24) and y.dtype == dtype
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y = torch.ops.nmsparse.nm_linear(x, packed.values, packed.indices, n, m, None)
    assert torch.equal(y, F.linear(x, layer.weight))


def test_op_validates_its_arguments():
    packed = pack(nm_linear_layer(16, 8).weight.detach(), 2, 4)
    v, i = packed.values, packed.indices
    with pytest.raises(ValueError, match="16 input features"):
        nm_linear(torch.randn(3, 12), v, i, 2, 4)
    with pytest.raises(ValueError, match="dtype torch.float16 differs"):
        nm_linear(torch.randn(3, 16).half(), v, i, 2, 4)
    with pytest.raises(ValueError, match="indices of shape"):
        nm_linear(torch.randn(3, 16), v, i[:, :1], 2, 4)
    with pytest.raises(ValueError, match="uint8 indices"):
        nm_linear(torch.randn(3, 16), v, i.int(), 2, 4)
    with pytest.raises(ValueError, match="bias must be"):
        nm_linear(torch.randn(3, 16), v, i, 2, 4, torch.zeros(7))


def test_backend_choice(monkeypatch):
    packed = pack(nm_linear_layer(16, 8).weight.detach(), 2, 4)
    x = torch.randn(3, 16)
    monkeypatch.setenv("NMSPARSE_KERNELS", "triton")
    with pytest.raises(ValueError, match="without TRITON_INTERPRET=1|not installed"):
        nm_linear(x, packed.values, packed.indices, 2, 4)
    monkeypatch.setenv("NMSPARSE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="is not one of"):
        nm_linear(x, packed.values, packed.indices, 2, 4)
    monkeypatch.setenv("NMSPARSE_KERNELS", "torch")
    assert torch.equal(nm_linear(x, packed.values, packed.indices, 2, 4),
                       reference(x, packed.values, packed.indices, 2, 4))


def test_opcheck_schema_fake_and_autograd():
    layer = nm_linear_layer(32, 8)
    packed = pack(layer.weight.detach(), 2, 4)
    x = torch.randn(3, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.nmsparse.nm_linear.default,
                          (x, packed.values, packed.indices, 2, 4, layer.bias.detach()))


def test_backward_gives_input_and_bias_gradients():
    layer = nm_linear_layer(32, 8)
    module = NMLinear.from_linear(layer, 2, 4)
    module.bias.requires_grad_(True)
    x = torch.randn(4, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    module(x).square().sum().backward()
    layer(x_ref).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(module.bias.grad, layer.bias.grad, atol=1e-6)


# --- NMLinear ------------------------------------------------------------------------------


def test_nmlinear_from_linear_matches_the_dense_layer():
    layer = nm_linear_layer(48, 20, 2, 8)
    module = NMLinear.from_linear(layer, 2, 8)
    x = torch.randn(7, 48)
    assert torch.equal(module(x), layer(x))
    assert (module.in_features, module.out_features, str(module.pattern)) == (48, 20, "2:8")
    assert "pattern=2:8" in repr(module)
    assert torch.equal(module.dense_weight(), layer.weight)
    assert torch.equal(module.to_linear()(x), layer(x))
    assert sorted(module.state_dict()) == ["bias", "indices", "values"]
    assert module.packed.nbytes < layer.weight.numel() * 4


def test_nmlinear_needs_an_nm_weight_or_a_mask():
    layer = nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"shape \(4, 16\) is not 2:4"):
        NMLinear.from_linear(layer, 2, 4)
    mask = nm_mask(layer.weight, 2, 4)
    module = NMLinear.from_linear(layer, 2, 4, mask=mask)
    x = torch.randn(3, 16)
    expected = F.linear(x, layer.weight * mask, layer.bias)
    assert torch.equal(module(x), expected)


def test_nmlinear_state_dict_and_dtype_casts():
    layer = nm_linear_layer(32, 16, bias=False)
    module = NMLinear.from_linear(layer, 2, 4)
    clone = NMLinear.from_linear(nm_linear_layer(32, 16, bias=False), 2, 4)
    clone.load_state_dict(module.state_dict())
    x = torch.randn(2, 32)
    assert torch.equal(clone(x), module(x))
    half = module.half()
    assert half.values.dtype == torch.float16 and half.indices.dtype == torch.uint8
    assert torch.equal(half(x.half()), F.linear(x.half(), layer.weight.half()))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(NMLinear.from_linear(nm_linear_layer(32, 16), 2, 4), nn.ReLU(),
                          NMLinear.from_linear(nm_linear_layer(16, 8, 1, 8), 1, 8))
    x = torch.randn(5, 32)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(x), model(x), rtol=1e-6, atol=1e-6)


# --- swap_linear_layers --------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 6)  # 16 % 8 == 0 but 6 outputs: fine for in-grouping
        self.odd = nn.Linear(16, 12)

    def forward(self, x):
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return torch.cat([self.head(x), self.odd(x)], dim=-1)


def test_swap_after_finalize_keeps_outputs():
    model = Net()
    handle = nmsparse.sparsify(model, "2:4")
    x = torch.randn(3, 32)
    report = swap_linear_layers(model, "2:4")
    assert set(report.skipped) == {"fc1", "fc2", "head", "odd"}
    assert all("finalize" in reason for reason in report.skipped.values())
    handle.finalize()
    with torch.no_grad():
        model.odd.weight.fill_(1.0)  # dense: not 2:4
    expected = model(x)
    report = swap_linear_layers(model, "2:4")
    assert report.swapped == ["fc1", "fc2", "head"]
    assert "not 2:4" in report.skipped["odd"]
    assert isinstance(model.fc1, NMLinear) and type(model.odd) is nn.Linear
    assert torch.equal(model(x), expected)
    assert "3 Linear layer(s) swapped" in str(report)


def test_swap_skips_what_it_cannot_replace():
    class Sub(nn.Linear):
        pass

    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    model.embed = nn.Embedding(10, 16)
    model.tied = nn.Linear(16, 10, bias=False)
    model.tied.weight = model.embed.weight
    model.sub = Sub(16, 16)
    model.filtered = nn.Linear(16, 16)
    model.uneven = nn.Linear(6, 4)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.zero_()
    report = swap_linear_layers(model, (2, 4), exclude="filtered")
    assert report.swapped == []
    skipped = report.skipped
    assert "MultiheadAttention" in skipped["attn.out_proj"]
    assert "shared" in skipped["tied"]
    assert "subclass" in skipped["sub"]
    assert skipped["filtered"] == "excluded by 'filtered'"
    assert "not divisible by M=4" in skipped["uneven"]
    assert "use NMLinear.from_linear" in swap_linear_layers(nn.Linear(8, 8)).skipped["(model)"]
