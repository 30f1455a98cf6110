"""Nested files: every level loads back exactly, the file is no bigger than the densest level
packed alone, and defects are named."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.export import PackedFormatError, load_nested, save_nested, save_packed
from nmsparse.levels import set_level
from nmsparse.methods import Nested


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.conv = nn.Conv2d(8, 16, 3)
        self.b = nn.Linear(32, 4)


def nested_model(levels="1:8,2:8,4:8", pattern="4:8"):
    torch.manual_seed(0)
    model = Net()
    handle = nmsparse.sparsify(model, pattern, Nested(levels=levels, training="joint"))
    return model, handle


def finalized_at(model, level):
    import copy

    copied = copy.deepcopy(model)
    set_level(copied, level)
    return nmsparse.finalize(copied).state_dict()


@pytest.mark.parametrize(("levels", "pattern"), [("1:8,2:8,4:8", "4:8"), ("1:4,2:4", "2:4")])
def test_every_level_round_trips_and_the_file_is_no_bigger(tmp_path, levels, pattern):
    model, _ = nested_model(levels, pattern)
    report = save_nested(model, tmp_path / "m.nested")
    specs = levels.split(",")
    for index, spec in enumerate(specs):
        expected = finalized_at(model, spec)
        for level in (index, spec):
            state = load_nested(tmp_path / "m.nested", level)
            assert list(state) == list(expected)
            for key in expected:
                assert torch.equal(state[key], expected[key]), (spec, key)
    # the densest level alone, packed: same tensor bytes, and no smaller file
    set_level(model, -1)
    packed = save_packed(model, tmp_path / "m.packed", pattern)
    assert report.tensor_bytes == packed.packed_bytes
    assert os.path.getsize(tmp_path / "m.nested") <= os.path.getsize(tmp_path / "m.packed")


def test_defects_are_named(tmp_path):
    model, _ = nested_model()
    path = tmp_path / "m.nested"
    save_nested(model, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a stored byte: the position check or the checksum catches it
    (tmp_path / "bad.nested").write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="sha256|positions"):
        load_nested(tmp_path / "bad.nested")
    set_level(model, -1)
    save_packed(model, tmp_path / "m.packed", "4:8")
    with pytest.raises(PackedFormatError, match="expected 'nmsparse-nested'"):
        load_nested(tmp_path / "m.packed")
    with pytest.raises(ValueError, match="no level '3:8'"):
        load_nested(path, "3:8")
    with pytest.raises(ValueError, match="nested weights"):
        save_nested(Net(), tmp_path / "x.nested")
    assert not (tmp_path / "x.nested").exists()
