"""The prepared CPU layout (nmsparse.kernels.cpu.prepacked) and PreparedNMLinear.

The kernel is held to the float64 product of the bf16-rounded inputs: fp32 accumulation of K
products in any order is within K * 2**-24 * S of it (S = |x| @ |W|.T + |b|, as in
test_kernels_cpu), while a wrong position or a dropped value moves a result by about S / K.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.engine.masks import nm_mask
from nmsparse.kernels import (
    NMLinear,
    PreparedNMLinear,
    cpu,
    prepare_cpu,
    swap_linear_layers,
    unprepare_cpu,
)
from nmsparse.kernels.cpu import prepacked
from nmsparse.packing import pack, pack_positions, unpack_positions, unpack_rows

REASON = None if cpu.build_error() is None and cpu.isa_reason("avx512bf16") is None else (
    cpu.build_error() or cpu.isa_reason("avx512bf16"))
needs_bf16_kernels = pytest.mark.skipif(REASON is not None, reason=f"needs AVX512_BF16: {REASON}")
# every pattern the layout takes, from the library's own rule
CANDIDATES = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 8), (3, 8), (5, 8), (6, 8),
              (7, 8), (2, 16), (1, 16), (4, 16), (7, 16), (8, 16), (1, 3), (2, 6), (1, 32)]
TAKEN = [(n, m) for n, m in CANDIDATES if prepacked.prepacked_take(n, m)]


def nm_weight(out, inp, n, m, generator):
    weight = torch.randn(out, inp, generator=generator)
    return (weight * nm_mask(weight, n, m)).bfloat16()


def assert_exact(y, x, weight, bias, n, m):
    x64 = x.bfloat16().double()
    w64 = weight.double()
    b64 = None if bias is None else bias.double()
    exact = F.linear(x64, w64, b64)
    scale = F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    k = weight.shape[1] * n // m + 1
    allowed = k * 2.0**-24 * scale
    if y.dtype == torch.bfloat16:
        allowed = allowed + 2.0**-8 * (exact.abs() + allowed)
    assert y.shape == exact.shape
    assert bool(((y.double() - exact).abs() <= allowed).all()), float(
        ((y.double() - exact).abs() - allowed).max())


def test_the_layout_takes_m_2_4_or_8_with_any_n_and_up_to_7_of_16():
    assert TAKEN == [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 8), (3, 8), (5, 8),
                     (6, 8), (7, 8), (2, 16), (1, 16), (4, 16), (7, 16)]


@needs_bf16_kernels
@pytest.mark.parametrize(("n", "m"), TAKEN)
def test_prepared_kernel_matches_over_blocks_panels_row_blocks_and_window_tails(n, m):
    """Outputs around the blocks of 16 and panels of 32 (1, 17, 47 and many per thread),
    inputs ending inside an 8-input window (and, for N = 1, a last pair holding one value),
    rows around the blocks of 8 (9 and 17 read expanded controls, then a remainder), one
    and two threads, with and without bias; the layout gives back the packed bytes."""
    generator = torch.Generator().manual_seed(7 * n + m)
    inputs = {2: (24, 132, 1032), 4: (24, 132, 1032), 8: (16, 136, 1024), 16: (32, 144, 1024)}
    shapes = [(1, m)] + list(zip((17, 47, 300), inputs[m], strict=True))
    for out, inp in shapes:
        weight = nm_weight(out, inp, n, m, generator)
        weight[out // 2] = 0  # a row of kept zeros (M = 16: told from the layout's padding)
        packed = pack(weight, n, m)
        layout = prepacked.prepack(packed.values, packed.indices, n, m, inp)
        values, indices = prepacked.unprepack(layout, n, m, inp, out)
        assert torch.equal(values.view(torch.int16), packed.values.view(torch.int16))
        assert torch.equal(indices, packed.indices)
        for rows in (1, 5, 8, 9, 17):
            x = torch.randn(rows, inp, generator=generator)
            bias = torch.randn(out, generator=generator).bfloat16() if rows % 2 else None
            for threads in (1, 2):
                torch.set_num_threads(threads)
                try:
                    y = prepacked.nm_linear_prepacked(x, layout, n, m, inp, out, bias)
                finally:
                    torch.set_num_threads(2)
                assert y.dtype == torch.float32
                assert_exact(y, x, weight, bias, n, m)
        y = prepacked.nm_linear_prepacked(x.bfloat16(), layout, n, m, inp, out, None)
        assert y.dtype == torch.bfloat16
        assert_exact(y, x, weight, None, n, m)


@needs_bf16_kernels
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (2, 8), (6, 8)])
def test_positions_in_any_order_are_exact_and_a_moved_position_is_seen(n, m):
    generator = torch.Generator().manual_seed(n + 10 * m)
    out, inp = 40, 256
    packed = pack(nm_weight(out, inp, n, m, generator), n, m)
    slots = packed.values.shape[1]
    order = torch.arange(slots).view(-1, 2).flip(-1).flatten()
    positions = unpack_positions(packed.indices, m, slots)[:, order]
    values = packed.values[:, order].contiguous()
    weight = unpack_rows(values, pack_positions(positions, m), n, m)
    x = torch.randn(9, inp, generator=generator)
    layout = prepacked.prepack(values, pack_positions(positions, m), n, m, inp)
    assert_exact(prepacked.nm_linear_prepacked(x, layout, n, m, inp, out), x, weight, None,
                 n, m)
    largest = int(values[30].float().abs().argmax())
    positions[30, largest] = (positions[30, largest] + 1) % m
    moved = prepacked.prepack(values, pack_positions(positions, m), n, m, inp)
    y = prepacked.nm_linear_prepacked(x, moved, n, m, inp, out)
    with pytest.raises(AssertionError):
        assert_exact(y, x, weight, None, n, m)


@pytest.fixture
def lanes_everywhere(monkeypatch):
    """NMLinear's bf16 calls on the lanes kernel at every row count: the same products summed
    in the same order as the prepared kernel, so the two must agree bit for bit."""
    monkeypatch.setitem(cpu.DISPATCH, ("avx512bf16", torch.bfloat16), ((None, "lanes"),))
    monkeypatch.setenv("NMSPARSE_KERNELS", "cpu")


def model_24(generator, dtype=torch.bfloat16):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40, bias=False),
                          nn.Linear(40, 24)).to(dtype)
    with torch.no_grad():
        for layer, (n, m) in zip((model[0], model[2], model[3]), [(2, 4), (2, 8), (2, 4)],
                                   strict=True):
            layer.weight.copy_(nm_weight(layer.out_features, layer.in_features, n, m,
                                         generator).to(dtype))
    swap_linear_layers(model, "2:4", include=["0", "3"])
    swap_linear_layers(model, "2:8", include=["2"])
    return model


@needs_bf16_kernels
def test_prepared_model_matches_checkpoints_interchange_and_it_compiles_and_backprops(
        tmp_path, lanes_everywhere):
    generator = torch.Generator().manual_seed(3)
    model = model_24(generator)
    x = torch.randn(5, 64, generator=generator).bfloat16()
    expected = model(x)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    report = prepare_cpu(model)
    assert report.prepared == ["0", "2", "3"] and not report.skipped
    assert all(isinstance(model[i], PreparedNMLinear) for i in (0, 2, 3))
    assert torch.equal(model(x), expected)
    prepared_state = model.state_dict()
    assert sorted(prepared_state) == sorted(state)
    for key in state:
        assert torch.equal(prepared_state[key].view(torch.uint8), state[key].view(torch.uint8))
    torch.save(prepared_state, tmp_path / "model.pt")
    fresh = model_24(torch.Generator().manual_seed(99))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(fresh(x), expected)
    prepare_cpu(fresh)
    fresh.load_state_dict(state)  # an unprepared model's checkpoint into a prepared one
    assert torch.equal(fresh(x), expected)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), expected)
    given = x.float().requires_grad_()
    grad = torch.randn(5, 48, generator=generator)
    model[0](given).backward(grad)
    assert torch.allclose(given.grad, grad @ model[0].dense_weight().float(), rtol=1e-5,
                          atol=1e-5)
    assert unprepare_cpu(model) == 3 and isinstance(model[0], NMLinear)
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8), state[key].view(torch.uint8))


@needs_bf16_kernels
def test_a_bad_checkpoint_is_named_and_loses_nothing():
    model = model_24(torch.Generator().manual_seed(5))
    prepare_cpu(model)
    before = model[0].layout.clone()
    state = model.state_dict()
    del state["0.indices"]
    state["0.extra"] = torch.zeros(1)
    result = model.load_state_dict(state, strict=False)
    assert "0.indices" in result.missing_keys and "0.extra" in result.unexpected_keys
    assert torch.equal(model[0].layout, before)
    state = model.state_dict()
    state["0.values"] = state["0.values"][:, :-2]
    with pytest.raises(RuntimeError, match="do not fit a packed 2:4 48x64 weight"):
        model.load_state_dict(state)
    assert torch.equal(model[0].layout, before)


@needs_bf16_kernels
def test_moving_or_casting_a_prepared_layer_is_refused_and_changes_nothing():
    model = model_24(torch.Generator().manual_seed(6))
    prepare_cpu(model)
    before = model[0].layout.clone()
    for move in (lambda: model.float(), lambda: model.to("meta"), lambda: model.half()):
        with pytest.raises(ValueError, match="unprepare_cpu"):
            move()
    assert torch.equal(model[0].layout, before) and model[0].bias.dtype == torch.bfloat16
    model.to("cpu", torch.bfloat16)  # what it already is: allowed


@needs_bf16_kernels
def test_prepare_skips_what_the_layout_cannot_hold_with_the_reason(monkeypatch):
    generator = torch.Generator().manual_seed(8)
    model = nn.Sequential(*(nn.Linear(32, 16) for _ in range(4)))
    with torch.no_grad():
        model[0].weight.copy_(nm_weight(16, 32, 2, 4, generator).float())
        model[1].weight.copy_(nm_weight(16, 32, 8, 16, generator).float())
        model[2].weight.copy_(nm_weight(16, 32, 2, 4, generator).float())
        model[3].weight.copy_(nm_weight(16, 32, 2, 16, generator).float())
    model[1:].bfloat16()
    swap_linear_layers(model, "2:4", include=["0", "2"])
    swap_linear_layers(model, "8:16", include=["1"])
    swap_linear_layers(model, "2:16", include=["3"])
    # a hand-made 2:16 weight whose group lists position 9 before position 2: the layout's
    # halves could not give those bytes back
    layer = model[3]
    positions = unpack_positions(layer.indices, 16, layer.values.shape[1]).flip(-1)
    assert bool(((positions[:, 0::2] >= 8) & (positions[:, 1::2] < 8)).any())
    layer.indices.copy_(pack_positions(positions, 16))
    layer.values.copy_(layer.values.flip(-1))
    report = prepare_cpu(model)
    assert report.prepared == ["2"]
    assert "bfloat16" in report.skipped["0"] and "8:16" in report.skipped["1"]
    assert "order" in report.skipped["3"]
    assert "prepared" in str(report) and "skipped" in str(report)
    monkeypatch.setenv(cpu.ENV_ISA, "avx2")
    assert "AVX512_BF16" in prepare_cpu(nn.Sequential(NMLinear(pack(
        nm_weight(16, 32, 2, 4, generator), 2, 4)))).skipped["0"]


@needs_bf16_kernels
def test_a_llama_from_config_generates_the_same_tokens_prepared(lanes_everywhere):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                module.weight.mul_(nm_mask(module.weight.float(), 2, 4))
    report = swap_linear_layers(model, "2:4", exclude="lm_head")
    assert len(report.swapped) == 14 and report.preparable == 14
    assert "prepare_cpu(model) would lay 14 of them out" in str(report)
    prompt = torch.randint(0, 128, (3, 7))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(prompt).logits
        tokens = model.generate(prompt, **kwargs)
        assert len(prepare_cpu(model).prepared) == 14
        assert torch.equal(model(prompt).logits, logits)
        assert torch.equal(model.generate(prompt, **kwargs), tokens)


@needs_bf16_kernels
def test_load_pretrained_prepares_a_bf16_model_on_the_cpu():
    transformers = pytest.importorskip("transformers")
    from nmsparse.hf.pretrained import swap_kernels

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                module.weight.mul_(nm_mask(module.weight.float(), 2, 4))
    report = swap_kernels(model, "2:4", torch.device("cpu"))
    assert len(report.prepared) == 7 and "7 of them prepared for the CPU kernel" in str(report)
    assert sum(isinstance(module, PreparedNMLinear) for module in model.modules()) == 7
    float_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in float_model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                module.weight.mul_(nm_mask(module.weight, 2, 4))
    report = swap_kernels(float_model, "2:4", torch.device("cpu"))
    assert report.prepared == [] and "prepared" not in str(report).splitlines()[0]


@needs_bf16_kernels
def test_modules_skip_the_dispatcher_only_where_nothing_needs_it():
    from nmsparse.kernels import _op

    generator = torch.Generator().manual_seed(11)
    packed = pack(nm_weight(40, 64, 2, 4, generator), 2, 4)
    bias = torch.randn(40, generator=generator).bfloat16()
    layer, prepared = NMLinear(packed, bias), PreparedNMLinear(packed, bias)
    x = torch.randn(3, 64, generator=generator).bfloat16()
    assert _op.call_directly(x, bias)
    assert not _op.call_directly(x.clone().requires_grad_(), bias)
    assert not _op.call_directly(x, bias.clone().requires_grad_())
    assert not _op.call_directly(nn.Parameter(x), None)  # a subclass
    with torch.no_grad():
        assert _op.call_directly(x.clone().requires_grad_(), bias)
        seen = []
        torch.func.vmap(lambda row: seen.append(_op.call_directly(row, None)) or row)(x)
        assert seen == [False]
        assert torch.equal(layer(x), torch.ops.nmsparse.nm_linear(x, packed.values,
                                                                  packed.indices, 2, 4, bias))
        assert torch.equal(prepared(x), torch.ops.nmsparse.nm_linear_prepacked(
            x, prepared.layout, 2, 4, 64, 40, prepared.bias))
        # the direct path skips the op's checks only for an x that fits the layer
        assert layer.fits(x)
        for wrong, message in [(x[:, :32], "input features"), (x.float(), "input dtype")]:
            assert not layer.fits(wrong)
            with pytest.raises(ValueError, match=message):
                layer(wrong)


@needs_bf16_kernels
def test_opcheck_schema_fake_and_autograd_of_the_prepared_op():
    generator = torch.Generator().manual_seed(12)
    packed = pack(nm_weight(24, 32, 2, 4, generator), 2, 4)
    layout = prepacked.prepack(packed.values, packed.indices, 2, 4, 32)
    x = torch.randn(3, 32, generator=generator).requires_grad_()
    bias = torch.randn(24, generator=generator).bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.nmsparse.nm_linear_prepacked.default,
                          (x, layout, 2, 4, 32, 24, bias))


@needs_bf16_kernels
def test_m16_layout_refuses_an_order_it_cannot_give_back_and_a_corrupt_layout():
    generator = torch.Generator().manual_seed(16)
    layer = PreparedNMLinear(pack(nm_weight(24, 64, 2, 16, generator), 2, 16))
    state = layer.state_dict()
    before = layer.layout.clone()
    positions = unpack_positions(state["indices"], 16, state["values"].shape[1]).flip(-1)
    state["indices"] = pack_positions(positions, 16)
    state["values"] = state["values"].flip(-1)
    with pytest.raises(RuntimeError, match="cannot be prepared: its positions are not in the"):
        layer.load_state_dict(state)
    assert torch.equal(layer.layout, before)
    with pytest.raises(ValueError, match="corrupt"):
        prepacked.unprepack(torch.full_like(before, 0x88), 2, 16, 64, 24)


@needs_bf16_kernels
@pytest.mark.parametrize(("n", "m"), TAKEN)
def test_dense_rows_of_a_layout_are_the_weight_bit_for_bit_and_the_dense_path_is_exact(n, m):
    """The layout's dense expansion (the dense path's tiles, dense_weight(), the backward) equals
    the packed weight's, kept zeros and -0.0 included, for whole weights and from any block of
    16 rows; the dense path's product is exact for fp32 and bf16 x."""
    generator = torch.Generator().manual_seed(31 * n + m)
    for out, inp in [(1, 16), (33, 4 * m if m <= 4 else 3 * m), (47, 48 if m <= 8 else 144)]:
        inp = max(inp, m)
        weight = nm_weight(out, inp, n, m, generator)
        weight[out // 2] = 0
        if weight[0, 0] == 0:
            weight[0, 0] = -0.0
        packed = pack(weight, n, m)
        layout = prepacked.prepack(packed.values, packed.indices, n, m, inp)
        expected = unpack_rows(packed.values, packed.indices, n, m).view(torch.int16)
        assert torch.equal(prepacked.dense_rows(layout, n, m, inp, out).view(torch.int16),
                           expected)
        if out > 16:
            assert torch.equal(prepacked.dense_rows(layout, n, m, inp, out, 16, out)
                               .view(torch.int16), expected[16:])
        x = torch.randn(5, inp, generator=generator)
        bias = torch.randn(out, generator=generator).bfloat16()
        y = prepacked.nm_linear_prepacked(x, layout, n, m, inp, out, bias, kernel="dense")
        assert y.dtype == torch.float32
        assert_exact(y, x, weight, bias, n, m)
        y = prepacked.nm_linear_prepacked(x.bfloat16(), layout, n, m, inp, out, bias,
                                          kernel="dense")
        assert y.dtype == torch.bfloat16
        assert_exact(y, x, weight, bias, n, m)
    with pytest.raises(ValueError, match="multiple of 16"):
        prepacked.dense_rows(layout, n, m, inp, out, 8, out)


@needs_bf16_kernels
def test_on_a_cpu_with_amx_many_bf16_rows_take_the_dense_path(monkeypatch):
    """Where the CPU reports AMX but the AMX kernel cannot run, bf16 calls from
    AMX_DENSE_ROWS rows on (plain and prepared) run oneDNN's product on expanded tiles;
    elsewhere the table and the prepared kernel rule."""
    rows = cpu.AMX_DENSE_ROWS
    monkeypatch.setitem(cpu._library._STATE, "features", cpu.features() - {"amx"})
    assert prepacked.kernel_for(rows) == "lanes"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, rows, 2, 4) != "dense"
    monkeypatch.setitem(cpu._library._STATE, "features", cpu.features() | {"amx"})
    monkeypatch.setitem(cpu._library._STATE, "amx_reason", "its self-check gave a wrong result")
    assert prepacked.kernel_for(rows - 1) == "lanes" and prepacked.kernel_for(rows) == "dense"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, rows, 2, 4) == "dense"
    assert cpu.kernel_for("avx512bf16", torch.bfloat16, rows - 1, 2, 4) != "dense"
    assert cpu.kernel_for("avx512bf16", torch.float32, rows, 2, 8) == "table"  # fp32: no AMX
    generator = torch.Generator().manual_seed(5)
    weight = nm_weight(40, 64, 2, 4, generator)
    layer = PreparedNMLinear(pack(weight, 2, 4))
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), prepacked.nm_linear_prepacked(
            x, layer.layout, 2, 4, 64, 40, kernel="dense"))
        assert_exact(layer(x), x, weight, None, 2, 4)
