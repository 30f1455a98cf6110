"""Packed N:M files: round trips, sizes, per-layer patterns, validation and atomic writes."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

import nmsparse
from nmsparse.export import (
    FORMAT_VERSION,
    PackedFormatError,
    load_packed,
    read_packed_header,
    save_packed,
)
from nmsparse.packing import pack


def mlp(width=64, depth=4, bias=True, dtype=torch.float32):
    layers = [nn.Linear(width, width, bias=bias) for _ in range(depth)]
    return nn.Sequential(*layers).to(dtype)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # 3 input channels: stays dense
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                                    nn.ReLU())
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.grouped(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def finalized(model, pattern="2:4", **kwargs):
    nmsparse.sparsify(model, pattern, method="ste", **kwargs)
    return nmsparse.finalize(model)


def bits(tensor):
    """Bit pattern of a tensor: equal bits means equal everything, -0.0 and NaN included."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(ints[tensor.element_size()])


def assert_same_state(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert torch.equal(bits(actual[key]), bits(value)), key


def file_tensors(path):
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def rewrite(path, header=None, tensors=None):
    """Re-save a packed file after ``header(dict)`` / ``tensors(dict)`` edited it in place."""
    with safe_open(path, "pt") as handle:
        content = json.loads(handle.metadata()["nmsparse"])
        stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if header:
        header(content)
    if tensors:
        tensors(stored)
    path.write_bytes(save(stored, metadata={"nmsparse": json.dumps(content)}))


# ------------------------------------------------------------------------------ round trips


def test_round_trip_finalized_mlp(tmp_path):
    model = finalized(mlp())
    path = tmp_path / "model.nmp"
    report = save_packed(model, path, "2:4", metadata={"architecture": "mlp", "width": 64})
    assert [layer.pattern for layer in report.layers] == [nmsparse.NM(2, 4)] * 4
    assert report.file_bytes == path.stat().st_size
    assert set(file_tensors(path)) == {f"{i}.{name}" for i in range(4)
                                       for name in ("bias", "weight.nm_values",
                                                    "weight.nm_indices")}
    state = load_packed(path)
    assert_same_state(state, model.state_dict())
    fresh = load_packed(path, mlp())
    assert type(fresh) is nn.Sequential and type(fresh[0]) is nn.Linear
    x = torch.randn(8, 64)
    assert torch.equal(fresh(x), model(x))
    header = read_packed_header(path)
    assert header["version"] == FORMAT_VERSION
    assert header["metadata"] == {"architecture": "mlp", "width": 64}
    assert header["packed"]["0.weight"] == {"shape": [64, 64], "dtype": "float32", "n": 2,
                                            "m": 4, "layout": "in", "index_bits": 2}


@pytest.mark.parametrize("layout", ["in", "flat"])
def test_round_trip_conv_net(tmp_path, layout):
    model = finalized(ConvNet(), layout=layout)
    with torch.no_grad():  # non-trivial BatchNorm statistics must survive too
        model.layer1[1].running_mean.uniform_()
        model.layer1[1].num_batches_tracked.fill_(7)
    path = tmp_path / "conv.nmp"
    report = save_packed(model, path, "2:4", layout=layout)
    rows = {layer.name: layer for layer in report.layers}
    if layout == "in":
        assert not rows["stem.weight"].packed and "not divisible by M=4" in rows["stem.weight"].note
    assert rows["layer1.0.weight"].packed and rows["grouped.weight"].packed
    stored = file_tensors(path)
    assert "layer1.1.num_batches_tracked" in stored
    values = stored["layer1.0.weight.nm_values"]
    # "in": one row per (out, kernel position), groups along the 8 input channels
    assert values.shape == ((16 * 9, 4) if layout == "in" else (16, 36))
    fresh = load_packed(path, ConvNet()).eval()
    assert_same_state(fresh.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), model.eval()(x))


def test_excluded_layer_is_stored_dense(tmp_path):
    model = finalized(mlp(), exclude="0")
    path = tmp_path / "model.nmp"
    report = save_packed(model, path, "2:4", exclude="0")
    assert report.layers[0].note == "excluded by '0'" and report.layers[0].pattern is None
    assert report.layers[0].packed_bytes == report.layers[0].dense_bytes
    stored = file_tensors(path)
    assert "0.weight" in stored and "0.weight.nm_values" not in stored
    assert "1.weight.nm_values" in stored
    fresh = load_packed(path, mlp())
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))


def test_live_sparse_model_is_saved_as_finalized_and_left_untouched(tmp_path):
    model = mlp()
    nmsparse.sparsify(model, "2:4")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    path = tmp_path / "live.nmp"
    report = save_packed(model, path, "2:4")
    assert len(report.packed_layers) == 4
    assert_same_state(model.state_dict(), before)  # still live: dense weights and masks
    assert "0.weight_mask" in before and not any("mask" in k for k in file_tensors(path))
    x = torch.randn(4, 64)
    expected = model(x)
    reference = nmsparse.finalize(copy.deepcopy(model))
    fresh = load_packed(path, mlp())
    assert_same_state(fresh.state_dict(), reference.state_dict())
    assert torch.equal(fresh(x), expected)
    with pytest.raises(ValueError, match="live nmsparse masks"):
        load_packed(path, model)


def test_kept_negative_zero_survives_bit_exact(tmp_path):
    model = finalized(mlp(width=8, depth=1, bias=False))
    with torch.no_grad():
        weight = model[0].weight
        weight[0, :4] = torch.tensor([-0.0, 0.0, 1.5, 0.0])  # one -0.0 kept, one group short
    path = tmp_path / "model.nmp"
    save_packed(model, path, "2:4")
    restored = load_packed(path)["0.weight"]
    assert torch.equal(bits(restored), bits(model[0].weight.detach()))
    assert torch.signbit(restored[0, 0])


def test_tied_weights_and_fp16(tmp_path):
    model = mlp(dtype=torch.float16)
    model[1].weight = model[0].weight  # one shared Parameter under two keys
    finalized(model, tied="sparse")  # both readers use the masked weight
    path = tmp_path / "tied.nmp"
    report = save_packed(model, path, "2:4")
    assert len(report.packed_layers) == 4  # masked once through layer 0: both keys are 2:4
    state = load_packed(path)
    assert_same_state(state, model.state_dict())


# -------------------------------------------------------------------------- sizes, patterns


@pytest.mark.parametrize("pattern, fraction", [("2:4", 9 / 16), ("2:8", 5 / 16)])
@pytest.mark.parametrize("width, bias", [(256, False), (512, True)])
def test_packed_file_size(tmp_path, pattern, fraction, width, bias):
    model = finalized(mlp(width=width, bias=bias, dtype=torch.float16), pattern)
    dense = len(save({k: v.clone() for k, v in model.state_dict().items()}))
    path = tmp_path / "model.nmp"
    report = save_packed(model, path, pattern)
    ratio = path.stat().st_size / dense
    assert abs(ratio / fraction - 1) < 0.01, (ratio, fraction)
    assert report.packed_bytes / report.dense_bytes == pytest.approx(ratio, rel=0.01)


def test_per_layer_pattern_mapping(tmp_path):
    patterns = {"0": "2:8", "1": "1:4", "2": None, "*": "2:4"}
    model = finalized(mlp(), patterns)
    path = tmp_path / "model.nmp"
    report = save_packed(model, path, patterns)
    assert [str(layer.pattern) for layer in report.layers] == ["2:8", "1:4", "None", "2:4"]
    assert report.layers[2].note == "dense by pattern rule '2'"
    entries = read_packed_header(path)["packed"]
    assert {key: (e["n"], e["m"], e["index_bits"]) for key, e in entries.items()} == {
        "0.weight": (2, 8, 4), "1.weight": (1, 4, 2), "3.weight": (2, 4, 2)}
    assert_same_state(load_packed(path), model.state_dict())


def test_weight_violating_the_pattern_is_stored_dense(tmp_path):
    model = finalized(mlp(), "2:4")
    report = save_packed(model, tmp_path / "model.nmp", {"0": "1:4", "*": "2:4"})
    assert report.layers[0].pattern is None
    assert report.layers[0].note.startswith("not 1:4: ") and "keep more than 1" in \
        report.layers[0].note
    table = str(report)
    assert "3 of 4 eligible weights packed" in table and "total" in table
    assert "dense bytes" in table and "(other tensors: 4)" in table


def test_packed_shapes_agree_with_pack():
    from nmsparse.packing import packed_shapes

    for shape, n, m, layout in [((6, 8), 2, 4, "in"), ((5, 12, 3, 3), 1, 3, "in"),
                                ((5, 12, 3, 3), 3, 6, "flat"), ((4, 16, 2), 2, 16, "in"),
                                ((3, 4, 2, 2, 2), 1, 4, "flat"), ((2, 256), 3, 256, "in")]:
        packed = pack(torch.randn(shape), n, m, layout, mask=nmsparse.nm_mask(
            torch.randn(shape), n, m, layout))
        assert packed_shapes(shape, n, m, layout) == (tuple(packed.values.shape),
                                                      tuple(packed.indices.shape))


# ------------------------------------------------------------------------ invalid files


@pytest.fixture
def packed_file(tmp_path):
    """A 2:8 file (4-bit positions, so out-of-range codes exist) of a 2-layer MLP."""
    model = finalized(mlp(width=16, depth=2), "2:8")
    path = tmp_path / "model.nmp"
    save_packed(model, path, "2:8")
    return path


def test_truncated_and_garbage_files(packed_file):
    data = packed_file.read_bytes()
    packed_file.write_bytes(data[:-10])
    with pytest.raises(PackedFormatError, match="not a readable safetensors file: .*incomplete"
                       ) as error:
        load_packed(packed_file)
    assert str(packed_file) in str(error.value)
    packed_file.write_bytes(b"this is not a model")
    with pytest.raises(PackedFormatError, match="not a readable safetensors file"):
        load_packed(packed_file)
    packed_file.write_bytes(b"")
    with pytest.raises(PackedFormatError, match="not a readable safetensors file"):
        load_packed(packed_file)


def test_plain_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "dense.safetensors"
    path.write_bytes(save({"w": torch.zeros(2)}))
    with pytest.raises(PackedFormatError, match="not a packed nmsparse file"):
        load_packed(path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "nope.nmp")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(version=3),
     r"packed format version 3 is not supported: this nmsparse \(.*\) reads versions 1 and 2"),
    (lambda h: h.update(version="1"), "version '1' is not supported"),
    (lambda h: h.update(format="something-else"), "format is 'something-else'"),
    (lambda h: h.update(extra=1), "header has fields"),
    (lambda h: h["packed"]["0.weight"].update(shape=[16, 8]),
     r"packed weight '0.weight': 0.weight.nm_values is float32 of shape \(16, 4\), but the "
     r"header \(shape \[16, 8\], 2:8, layout 'in', float32\) implies float32 of shape \(16, 2\)"),
    (lambda h: h["packed"]["0.weight"].update(n=1),
     r"0.weight.nm_values is float32 of shape \(16, 4\), but .* 1:8.* shape \(16, 2\)"),
    (lambda h: h["packed"]["1.weight"].update(m=4, index_bits=2),
     r"packed weight '1.weight': 1.weight.nm_values .* implies float32 of shape \(16, 8\)"),
    (lambda h: h["packed"]["0.weight"].update(m=4),
     "entry of packed weight '0.weight' index_bits=4 but M=4 is stored in 2 bits"),
    (lambda h: h["packed"]["0.weight"].update(m=5, index_bits=4), "not divisible by M=5"),
    (lambda h: h["packed"]["0.weight"].update(n=8), "invalid N:M pattern 8:8"),
    (lambda h: h["packed"]["0.weight"].update(dtype="float16"),
     r"0.weight.nm_values is float32 of shape \(16, 4\), but .* implies float16"),
    (lambda h: h["packed"]["0.weight"].update(dtype="os.system"), "not a torch floating"),
    (lambda h: h["packed"]["0.weight"].update(layout="diagonal"), "layout 'diagonal'"),
    (lambda h: h["keys"].remove("0.weight"), "packed weight '0.weight' is not in the header"),
    (lambda h: h["keys"].remove("0.bias"), "tensor '0.bias' is not declared in the header"),
    (lambda h: h["keys"].append("0.extra"), "missing tensor '0.extra'"),
    (lambda h: h["packed"].pop("1.weight"), "missing tensor '1.weight'"),
    (lambda h: h.update(sha256="0" * 63), "'sha256' is not a sha256"),
])
def test_tampered_header(packed_file, edit, message):
    rewrite(packed_file, header=edit)
    with pytest.raises(PackedFormatError, match=message) as error:
        load_packed(packed_file)
    assert str(packed_file) in str(error.value)


def test_header_that_is_not_json(packed_file):
    stored = file_tensors(packed_file)
    packed_file.write_bytes(save(stored, metadata={"nmsparse": '{"format": "nmsparse-pa'}))
    with pytest.raises(PackedFormatError, match="header is not valid JSON"):
        load_packed(packed_file)


def test_missing_and_extra_tensors(packed_file):
    rewrite(packed_file, tensors=lambda t: t.pop("0.weight.nm_indices"))
    with pytest.raises(PackedFormatError,
                       match=r"missing tensor '0.weight.nm_indices' \(indices of packed "
                             r"weight '0.weight'\)"):
        load_packed(packed_file)
    rewrite(packed_file, tensors=lambda t: t.update({
        "0.weight.nm_indices": torch.zeros(16, 2, dtype=torch.uint8),
        "smuggled": torch.zeros(1)}))
    with pytest.raises(PackedFormatError, match="tensor 'smuggled' is not declared"):
        load_packed(packed_file)


def test_indices_tensor_of_wrong_dtype(packed_file):
    rewrite(packed_file, tensors=lambda t: t.update({
        "1.weight.nm_indices": t["1.weight.nm_indices"].to(torch.int16)}))
    with pytest.raises(PackedFormatError, match=r"1.weight.nm_indices is int16 of shape "
                                                r"\(16, 2\), but .* implies uint8 of shape"):
        load_packed(packed_file)


def test_index_out_of_range(packed_file):
    def corrupt(tensors):
        tensors["1.weight.nm_indices"][3, 1] = 0x9A  # low nibble 10 >= M=8

    rewrite(packed_file, tensors=corrupt)
    with pytest.raises(PackedFormatError, match=r"packed weight '1.weight': corrupted indices: "
                                                r"row 3, group 1 stores position 10, not < M=8"):
        load_packed(packed_file)


def test_indices_not_ascending(packed_file):
    def corrupt(tensors):
        tensors["0.weight.nm_indices"][0, 0] = 0x33  # positions 3, 3

    rewrite(packed_file, tensors=corrupt)
    with pytest.raises(PackedFormatError, match=r"row 0, group 0 stores positions \[3, 3\], "
                                                "not strictly ascending"):
        load_packed(packed_file)


def test_nonzero_padding_bits(tmp_path):
    model = finalized(nn.Sequential(nn.Linear(4, 3)), "1:4")  # 1 position of 2 bits per row
    path = tmp_path / "model.nmp"
    save_packed(model, path, "1:4")

    def corrupt(tensors):
        tensors["0.weight.nm_indices"][1] |= 0x40

    rewrite(path, tensors=corrupt)
    with pytest.raises(PackedFormatError, match="padding bits"):
        load_packed(path)


def test_corrupted_values_fail_the_checksum(packed_file):
    def corrupt(tensors):
        tensors["0.bias"][0] += 1

    rewrite(packed_file, tensors=corrupt)
    with pytest.raises(PackedFormatError, match="sha256 checksum: the file is corrupted"):
        load_packed(packed_file)


# ------------------------------------------------------------------------------- writing


def test_missing_folder_writes_nothing(tmp_path):
    target = tmp_path / "missing" / "model.nmp"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_packed(finalized(mlp()), target, "2:4")
    assert not target.parent.exists()


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.nmp"
    save_packed(finalized(mlp()), path, "2:4")
    old = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    import nmsparse.atomic

    monkeypatch.setattr(nmsparse.atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_packed(finalized(mlp()), path, "2:8")
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.nmp"]


def test_invalid_arguments(tmp_path):
    model = finalized(mlp())
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_packed(model, tmp_path / "m.nmp", "2:4", metadata={"x": object()})
    with pytest.raises(ValueError, match="matches no eligible layer"):
        save_packed(model, tmp_path / "m.nmp", "2:4", exclude="typo")
    with pytest.raises(ValueError, match="no layer nmsparse can pack"):
        save_packed(nn.Sequential(nn.ReLU()), tmp_path / "m.nmp", "2:4")
    assert not list(tmp_path.iterdir())


def test_negative_zeros_beyond_n_fall_back_to_value_packing(tmp_path):
    model = finalized(mlp(width=8, depth=1, bias=False))
    with torch.no_grad():
        model[0].weight[0, :4] = torch.tensor([-0.0, 2.0, -0.0, 1.0])  # 2 values + 2 "-0.0"
    path = tmp_path / "model.nmp"
    assert len(save_packed(model, path, "2:4").packed_layers) == 1
    restored = load_packed(path)["0.weight"]
    assert torch.equal(restored, model[0].weight.detach())  # equal; -0.0 signs not kept


def test_strict_flag_is_passed_to_load_state_dict(tmp_path):
    path = tmp_path / "model.nmp"
    save_packed(finalized(mlp(depth=2)), path, "2:4")
    bigger = mlp(depth=3)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_packed(path, bigger)
    assert load_packed(path, bigger, strict=False) is bigger


def test_loaded_tensors_do_not_depend_on_the_file(packed_file):
    state = load_packed(packed_file)
    packed_file.write_bytes(b"x")  # a memory-mapped tensor would now crash the process
    assert torch.isfinite(state["0.bias"]).all() and state["1.weight"].count_nonzero() > 0
