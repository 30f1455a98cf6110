"""nmsparse.kernels.semi_structured: 2:4 verification, tile/padding rules, the plan and report,
the CPU errors, and the SemiStructuredLinear wrapper logic on the CPU (with the compression
replaced by the identity); then, on a CUDA GPU of compute capability >= 8.0 only, outputs of
accelerated models against the dense ones for both backends."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.kernels import semi_structured as ss

HAS_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
_sm80 = pytest.mark.skipif(not HAS_SM80, reason="needs a CUDA GPU with compute capability "
                           ">= 8.0 (2:4 sparse tensor cores)")


def needs_sm80(test):
    """Marked cuda (selected by `pytest -m cuda`) and skipped below compute capability 8.0."""
    return pytest.mark.cuda(_sm80(test))


def two_four(rows: int, cols: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    weight = torch.randn(rows, cols)
    return (weight * nmsparse.nm_mask(weight, 2, 4)).to(device, dtype)


def finalized(*sizes: int, bias: bool = True, dtype=torch.bfloat16,
              device="cpu") -> nn.Sequential:
    """An MLP with Linear(sizes[i], sizes[i+1]) layers, finalized at 2:4."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
    model = nn.Sequential(*layers)
    nmsparse.sparsify(model, "2:4", "fixed")
    nmsparse.finalize(model)
    return model.to(device, dtype).eval()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


# ------------------------------------------------------------------ verification (CPU)

def test_verify_accepts_2to4_and_sparser():
    assert ss.verify_2to4(two_four(32, 64)).ok
    one_four = torch.zeros(8, 16)
    one_four[:, ::4] = 1.0
    check = ss.verify_2to4(one_four)
    assert check and check.groups == 8 * 4 and check.max_nonzeros == 1
    assert ss.verify_2to4(torch.zeros(4, 8)).ok


def test_verify_catches_a_single_three_of_four_group():
    weight = two_four(16, 32)
    weight[5, 12:16] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 non-zeros in group 3 of row 5
    check = ss.verify_2to4(weight)
    assert not check
    assert (check.violating, check.max_nonzeros, check.first) == (1, 3, (5, 12))
    message = check.describe()
    assert "1 of 128 groups" in message and "row 5, columns 12..15" in message


def test_verify_counts_nan_as_nonzero_and_dense_groups():
    weight = torch.zeros(2, 8)
    weight[1, 4:7] = torch.tensor([float("nan"), 1.0, 1.0])
    weight[0, :4] = 1.0
    check = ss.verify_2to4(weight)
    assert check.violating == 2 and check.max_nonzeros == 4 and check.first == (0, 0)


@pytest.mark.parametrize("shape", [(16,), (4, 6), (2, 4, 4)])
def test_verify_rejects_shapes_without_groups(shape):
    with pytest.raises(ValueError, match="2-D|multiple of 4"):
        ss.verify_2to4(torch.zeros(shape))


# ------------------------------------------------------------------ tile / padding rules (CPU)

def test_tile_rules_per_backend_and_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        assert ss.tile_rule("cusparselt", dtype) == ss.TileRule(16, 16, 8)
        assert ss.tile_rule("cutlass", dtype) == ss.TileRule(32, 64, 8)
    assert ss.tile_rule("cusparselt", torch.float32) is None
    with pytest.raises(ValueError, match="unknown backend"):
        ss.tile_rule("auto", torch.float16)


def test_plan_shape_exact_fit_needs_no_padding():
    plan = ss.plan_shape((4096, 11008), torch.bfloat16, "cusparselt")
    assert isinstance(plan, ss.ShapePlan)
    assert plan.padded == (4096, 11008) and not plan.is_padded and plan.overhead == 0
    assert ss.plan_shape((11008, 4096), torch.float16, "cutlass").padded == (11008, 4096)


def test_plan_shape_pads_when_cheap():
    plan = ss.plan_shape((1000, 4096), torch.bfloat16, "cusparselt")
    assert plan.padded == (1008, 4096) and plan.is_padded
    plan = ss.plan_shape((1000, 4000), torch.bfloat16, "cutlass")
    assert plan.padded == (1024, 4032)  # rows to 32, columns to 64
    assert 0 < plan.overhead <= ss.DEFAULT_MAX_PADDING


def test_plan_shape_reasons():
    too_small = ss.plan_shape((8, 40), torch.bfloat16, "cusparselt")
    assert isinstance(too_small, str) and "too small" in too_small and "16x48" in too_small
    assert isinstance(ss.plan_shape((8, 40), torch.bfloat16, "cusparselt", max_padding=2.0),
                      ss.ShapePlan)
    assert "float32" in ss.plan_shape((64, 64), torch.float32, "cusparselt")
    assert "multiple of 4" in ss.plan_shape((64, 66), torch.float16, "cusparselt")
    assert "empty" in ss.plan_shape((0, 64), torch.float16, "cutlass")


def test_capability_rule():
    assert ss.capability_error((8, 0)) is None
    assert ss.capability_error((9, 0)) is None
    message = ss.capability_error((7, 5), "Tesla T4")
    assert "Tesla T4" in message and "7.5" in message and "8.0" in message


# ------------------------------------------------------------------ plan and report (CPU)

def test_plan_reports_every_linear_with_reasons():
    model = finalized(128, 64, 40)
    bad = nn.Linear(64, 32).to(torch.bfloat16)  # dense: 4 of 4 non-zero per group
    fp32 = finalized(64, 64, dtype=torch.float32)[0]
    padded = finalized(64, 1000)[0]  # 1000 rows -> 1008 for cuSPARSELt
    for module in (nn.ReLU(), bad, fp32, padded):
        model.append(module)
    report = ss.plan(model)
    status = {layer.name: (layer.status, layer.reason) for layer in report.layers}
    assert list(status) == ["0", "2", "4", "5", "6"]
    assert status["0"] == ("eligible", "")
    assert status["2"][0] == "skipped" and "too small" in status["2"][1]
    assert status["4"][0] == "skipped" and "not 2:4" in status["4"][1]
    assert status["5"][0] == "skipped" and "float32" in status["5"][1]
    assert status["6"] == ("eligible", "")
    assert ss.plan(model, backend="cusparselt").layers[-1].padded == (1008, 64)
    assert not report.converted
    text = str(report)
    assert "plan only" in text
    for header in ("layer", "shape", "dtype", "status", "backend", "note"):
        assert header in text.splitlines()[1]
    assert "64x128" in text and "bfloat16" in text


def test_plan_strict_raises_on_violation_and_filter_excludes():
    model = finalized(64, 64, 64)
    with torch.no_grad():
        model[2].weight[3, 8:12] = 1.0
    with pytest.raises(nmsparse.NMViolationError, match=r"2: not 2:4 .*row 3, columns 8\.\.11"):
        ss.plan(model, strict=True)
    report = ss.plan(model, strict=True, exclude="2")
    assert [layer.status for layer in report.layers] == ["eligible", "skipped"]
    assert report.layers[1].reason == "excluded by '2'"
    with pytest.warns(DeprecationWarning, match="filter_fn"):  # the old predicate, one release
        report = ss.plan(model, strict=True, filter_fn=lambda name, module: name != "2")
    assert report.layers[1].reason == "excluded by filter_fn"


def test_plan_structural_skips():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4)
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight  # tied

    net = Net().to(torch.bfloat16)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(nmsparse.nm_mask(module.weight, 2, 4))
    reasons = {layer.name: layer.reason for layer in ss.plan(net).layers}
    assert "MultiheadAttention" in reasons["attn.out_proj"]
    assert "shared" in reasons["a"] and "shared" in reasons["b"]


def test_plan_explicit_backend_records_backend_and_padding():
    model = finalized(64, 40, 64)  # weights 40x64 and 64x40: CUTLASS tiles are 32x64
    report = ss.plan(model, backend="cutlass", max_padding=1.0)
    first, second = report.layers
    assert (first.status, first.backend, first.padded) == ("eligible", "cutlass", (64, 64))
    assert (second.status, second.backend, second.padded) == ("eligible", "cutlass", (64, 64))
    assert "padded to 64x64" in first.note()
    assert all(layer.status == "skipped" for layer in ss.plan(model, backend="cutlass").layers)
    with pytest.raises(ValueError, match="unknown backend"):
        ss.plan(model, backend="cusparse")


def test_plan_refuses_a_model_that_is_not_finalized():
    model = nn.Sequential(nn.Linear(64, 64))
    nmsparse.sparsify(model, "2:4")
    with pytest.raises(ValueError, match="finalize"):
        ss.plan(model)


def test_report_table_formatting():
    report = ss.AccelerateReport("auto", device="NVIDIA H100 (cuda:0)",
                                 notes=["cutlass not used for bfloat16 on cuda:0: sm8x only"])
    report.layers = [
        ss.LayerResult("blocks.0.fc", (8192, 2048), torch.bfloat16, "converted", "cusparselt",
                       "auto: faster at 16 tokens", (8192, 2048),
                       {"cusparselt": 12.25, "cutlass": 20.5}),
        ss.LayerResult("head", (100, 2048), torch.bfloat16, "converted", "cusparselt", "",
                       (112, 2048)),
        ss.LayerResult("proj", (64, 64), torch.float32, "skipped", "", "dtype float32: ..."),
    ]
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == ("accelerate: 2 of 3 Linear layer(s) converted to 2:4 semi-structured, "
                        "backend=auto on NVIDIA H100 (cuda:0)")
    assert lines[1] == "note: cutlass not used for bfloat16 on cuda:0: sm8x only"
    assert lines[2].split() == ["layer", "shape", "dtype", "status", "backend", "note"]
    assert "timed cusparselt 12.2 us, cutlass 20.5 us" in text
    assert "padded to 112x2048" in text
    assert lines[-1].split()[:5] == ["proj", "64x64", "float32", "skipped", "-"]
    assert [layer.name for layer in report.converted] == ["blocks.0.fc", "head"]
    assert [layer.name for layer in report.skipped] == ["proj"]


# ------------------------------------------------------------------ CPU errors

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_accelerate_on_cpu_raises_and_leaves_the_model_alone():
    model = finalized(64, 64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError,
                       match=r"compute capability >= 8\.0.*is_available\(\) is False"):
        ss.accelerate(model)
    assert all(type(m) is not ss.SemiStructuredLinear for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_accelerate_argument_errors():
    model = finalized(64, 64)
    with pytest.raises(ValueError, match="unknown backend"):
        ss.accelerate(model, backend="cusparse")
    with pytest.raises(ValueError, match="no .*nn.Linear"):
        ss.accelerate(nn.Sequential(nn.ReLU()))


def test_accelerate_on_cpu_model_with_cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="model.cuda"):
        ss.accelerate(finalized(64, 64))


# ------------------------------------------------------------------ wrapper logic (CPU)

def identity(weight: torch.Tensor, backend: str) -> torch.Tensor:
    return weight  # stands in for the compression: tests reshape / padding / slicing only


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (40, 68)])
def test_wrapper_matches_linear_on_cpu(bias, shape):
    out_features, in_features = shape
    linear = nn.Linear(in_features, out_features, bias=bias)
    plan = ss.plan_shape(shape, torch.bfloat16, "cutlass", max_padding=10.0)
    module = ss.SemiStructuredLinear.from_linear(linear, plan, convert=identity)
    assert (module.padded_out, module.padded_in) == plan.padded
    with torch.no_grad():
        for lead in [(1,), (7,), (2, 5), (3, 1, 4), ()]:
            x = torch.randn(*lead, in_features)
            torch.testing.assert_close(module(x), linear(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(in_features, 6).t()  # non-contiguous
        torch.testing.assert_close(module(x), linear(x), rtol=1e-5, atol=1e-5)
        assert module(torch.randn(0, 3, in_features)).shape == (0, 3, out_features)
    assert "backend=cutlass" in repr(module)


def test_wrapper_rejects_wrong_input():
    linear = nn.Linear(64, 32)
    module = ss.SemiStructuredLinear.from_linear(
        linear, ss.plan_shape((32, 64), torch.float16, "cusparselt"), convert=identity)
    with pytest.raises(ValueError, match="in_features=64"):
        module(torch.randn(2, 63))
    with pytest.raises(RuntimeError, match="dtype"):
        module(torch.randn(2, 64, dtype=torch.float64))


# ------------------------------------------------------------------ accelerate, GPU faked
# The conversion pipeline (probing, auto choice and its cache per shape, output check,
# replacement) run on the CPU with the GPU-only pieces replaced: compression by the identity
# (or a corruption), CUDA-event timing by fixed numbers. Not a test of the kernels.


@pytest.fixture
def fake_gpu(monkeypatch):
    state = {"times": {"cusparselt": 10.0, "cutlass": 7.0}, "errors": {}, "timed": [],
             "convert": identity}
    plan = ss._plan
    monkeypatch.setattr(ss, "_require_cuda", lambda model: [torch.device("cpu")])
    monkeypatch.setattr(ss, "_plan", lambda *args, devices: plan(*args, devices=False))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "FakeGPU")
    monkeypatch.setattr(ss, "backend_error", lambda b, d, t: state["errors"].get(b))
    monkeypatch.setattr(ss, "to_semi_structured", lambda w, b: state["convert"](w, b))

    def fake_time(module, x, iterations=20):
        state["timed"].append(module.backend)
        return state["times"][module.backend]

    monkeypatch.setattr(ss, "_time_us", fake_time)
    return state


def test_accelerate_pipeline_auto_choice_and_cache(fake_gpu):
    dense = finalized(256, 512, 256, 512, 256)  # 512x256, 256x512, 512x256, 256x512
    model = copy.deepcopy(dense)
    report = ss.accelerate(model)
    assert [layer.status for layer in report.layers] == ["converted"] * 4
    assert [layer.backend for layer in report.layers] == ["cutlass"] * 4  # the faster one
    assert fake_gpu["timed"] == ["cusparselt", "cutlass"] * 2  # once per distinct shape
    assert report.layers[0].timings_us == {"cusparselt": 10.0, "cutlass": 7.0}
    assert report.layers[2].reason == "auto: as timed on 0"
    assert all(type(model[i]) is ss.SemiStructuredLinear for i in (0, 2, 4, 6))
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x))
    assert "FakeGPU (cpu)" in str(report)


def test_accelerate_pipeline_unusable_backend(fake_gpu):
    fake_gpu["errors"]["cutlass"] = "cutlass failed on FakeGPU: sm8x only"
    model = finalized(256, 512)
    report = ss.accelerate(model)
    assert report.layers[0].backend == "cusparselt" and not fake_gpu["timed"]
    assert any("sm8x only" in note for note in report.notes)
    with pytest.raises(RuntimeError, match="sm8x only"):
        ss.accelerate(finalized(256, 512), backend="cutlass")


def test_accelerate_pipeline_rejects_wrong_outputs(fake_gpu):
    fake_gpu["convert"] = lambda weight, backend: weight * 2 if backend == "cutlass" else weight
    model = finalized(256, 512)
    report = ss.accelerate(model)
    layer = report.layers[0]
    assert layer.backend == "cusparselt" and "cutlass: ValueError: output differs" in layer.reason
    fake_gpu["convert"] = lambda weight, backend: -weight
    model = finalized(256, 512)
    with pytest.warns(UserWarning, match="converted no layer"):
        report = ss.accelerate(model)
    assert report.layers[0].status == "skipped" and type(model[0]) is nn.Linear


def test_accelerate_pipeline_replaces_a_reused_module_everywhere(fake_gpu):
    shared = finalized(256, 256)[0]
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = ss.accelerate(model, backend="cusparselt")
    assert len(report.layers) == 1 and report.layers[0].converted
    assert type(model[0]) is ss.SemiStructuredLinear and model[0] is model[2]


# ------------------------------------------------------------------ GPU

def _usable(backend: str, dtype=torch.bfloat16) -> None:
    error = ss.backend_error(backend, "cuda", dtype)
    if error:
        pytest.skip(f"{backend} cannot run here: {error}")


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("sizes", [(128, 256, 128), (512, 1024, 512), (96, 200, 96)])
def test_gpu_outputs_match_dense(backend, sizes, dtype):
    _usable(backend, dtype)
    dense = finalized(*sizes, dtype=dtype, device="cuda")
    model = copy.deepcopy(dense)
    report = ss.accelerate(model, backend=backend, max_padding=1.0)
    assert len(report.converted) == len(report.layers), str(report)
    assert all(layer.backend == backend for layer in report.layers)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-2
    with torch.no_grad():
        for batch in (1, 7, 16, 100):
            x = torch.randn(batch, sizes[0], device="cuda", dtype=dtype)
            assert rel_error(model(x), dense(x)) < tolerance


@needs_sm80
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_inputs_with_more_dims(backend):
    _usable(backend)
    dense = finalized(256, 512, bias=True, device="cuda")
    model = copy.deepcopy(dense)
    ss.accelerate(model, backend=backend)
    with torch.no_grad():
        for shape in [(2, 5, 256), (3, 1, 4, 256), (256,)]:
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            out = model(x)
            assert out.shape == (*shape[:-1], 512)
            assert rel_error(out, dense(x)) < 3e-2
        x = torch.randn(256, 9, device="cuda", dtype=torch.bfloat16).t()  # non-contiguous
        assert rel_error(model(x), dense(x)) < 3e-2


@needs_sm80
def test_gpu_auto_records_choice_and_skips_violations():
    dense = finalized(256, 512, 256, device="cuda")
    with torch.no_grad():
        dense[2].weight[0, :4] = 1.0  # one 4-of-4 group
    model = copy.deepcopy(dense)
    report = ss.accelerate(model)
    first, second = report.layers
    assert first.converted and first.backend in ss.KERNEL_BACKENDS
    assert type(model[0]) is ss.SemiStructuredLinear and model[0].backend == first.backend
    assert not second.converted and "not 2:4" in second.reason and type(model[2]) is nn.Linear
    usable = [b for b in ss.KERNEL_BACKENDS if ss.backend_error(b, "cuda") is None]
    if len(usable) == 2:
        assert set(first.timings_us) == set(usable)
    with torch.no_grad():
        x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
        assert rel_error(model(x), dense(x)) < 3e-2
    strict = copy.deepcopy(dense)
    with pytest.raises(nmsparse.NMViolationError):
        ss.accelerate(strict, strict=True)
    assert all(type(m) is not ss.SemiStructuredLinear for m in strict.modules())


@needs_sm80
def test_gpu_unavailable_backend_raises():
    for backend in ss.KERNEL_BACKENDS:
        error = ss.backend_error(backend, "cuda")
        if error is None:
            continue
        model = finalized(128, 128, device="cuda")
        with pytest.raises(RuntimeError, match=backend):
            ss.accelerate(model, backend=backend)
        assert type(model[0]) is nn.Linear


@needs_sm80
def test_gpu_gpt_logits_match():
    from nmsparse.app.models import create_model

    torch.manual_seed(0)
    dense = create_model("gpt_tiny", input_shape=(64,), num_classes=256,
                         task="language_model", n_layer=2, n_head=2, d_model=128)
    nmsparse.sparsify(dense, "2:4", "fixed")
    nmsparse.finalize(dense)
    dense = dense.to("cuda", torch.bfloat16).eval()
    model = copy.deepcopy(dense)
    report = ss.accelerate(model)
    assert len(report.converted) == len(report.layers), str(report)
    idx = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.no_grad():
        assert rel_error(model(idx), dense(idx)) < 5e-2


@needs_sm80
def test_gpu_semi_structured_linear_helper():
    _usable("cusparselt")
    weight = two_four(1000, 512, torch.bfloat16, "cuda")
    bias = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    module = ss.semi_structured_linear(weight, bias)
    assert (module.padded_out, module.padded_in) == (1008, 512)
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_error(module(x), torch.nn.functional.linear(x, weight, bias)) < 3e-2
    weight[0, :4] = 1.0
    with pytest.raises(nmsparse.NMViolationError):
        ss.semi_structured_linear(weight)


def test_import_and_plan_load_no_triton_and_no_cuda():
    import subprocess
    import sys

    code = ("import sys, torch, nmsparse\n"
            "from nmsparse.kernels import semi_structured as ss\n"
            "m = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)\n"
            "with torch.no_grad(): m[0].weight.mul_(nmsparse.nm_mask(m[0].weight, 2, 4))\n"
            "assert ss.plan(m).layers[0].status == 'eligible'\n"
            "assert 'triton' not in sys.modules and not torch.cuda.is_initialized()\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
