"""The Triton kernels compiled for a CUDA GPU; skipped cleanly without one."""

import pytest
import torch
import torch.nn.functional as F
from _nm_kernel_cases import TOLERANCES, cases, run_case
from torch import nn

pytestmark = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)

CASES = cases()


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NMSPARSE_KERNELS", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_kernel_matches_dense_linear_on_cuda(case):
    result = run_case(case, "cuda")
    assert result["shape"] == result["expected_shape"] and result["finite"]
    assert result["excess"] <= 0, f"max error {result['max_err']} beyond tolerance"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (2, 8), (4, 16)])
@pytest.mark.parametrize("rows", [1, 8, 64, 300])
def test_larger_shapes_through_the_op(dtype, n, m, rows):
    from nmsparse.engine.masks import nm_mask
    from nmsparse.packing import pack

    torch.manual_seed(0)
    weight = torch.randn(1000, 1024, device="cuda") * 0.05
    weight = weight.masked_fill(~nm_mask(weight, n, m), 0).to(dtype)
    bias = torch.randn(1000, device="cuda").to(dtype)
    packed = pack(weight, n, m)
    x = torch.randn(rows, 1024, device="cuda").to(dtype)
    y = torch.ops.nmsparse.nm_linear(x, packed.values, packed.indices, n, m, bias)
    ref = F.linear(x.float(), weight.float(), bias.float())
    rtol, atol = TOLERANCES["fp16" if dtype == torch.float16 else "bf16"]
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=atol)


def test_swap_and_compile_on_cuda():
    import nmsparse
    from nmsparse.kernels import NMLinear, swap_linear_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128))
    handle = nmsparse.sparsify(model, "2:4")
    handle.finalize()
    model = model.half().cuda()
    x = torch.randn(4, 256, device="cuda").half()
    expected = model(x).float()
    report = swap_linear_layers(model, "2:4")
    assert report.swapped == ["0", "2"] and isinstance(model[0], NMLinear)
    torch.testing.assert_close(model(x).float(), expected, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x).float(), expected, rtol=2e-2, atol=2e-2)
