"""The library refuses what it cannot use with one clear error instead of a raw torch error
or silence (issue 22): a meta-device model or a tensor given to sparsify, an all-False mask,
another model's handle state or masks, a folder given to save_packed/load_packed, a NaN
weight to save packed."""

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.export.packed import PackedFormatError, load_packed, save_packed


def two_layers(width: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


def test_sparsify_of_a_meta_device_model():
    with torch.device("meta"):
        model = two_layers()
    with pytest.raises(ValueError, match=r"meta device .*materialise it first"):
        nmsparse.sparsify(model, "2:4")
    assert not hasattr(model[0], "weight_mask")


@pytest.mark.parametrize("thing", [torch.randn(4, 8), "model", None])
def test_sparsify_of_something_that_is_not_a_module(thing):
    with pytest.raises(TypeError, match=r"takes a torch\.nn\.Module .*got "):
        nmsparse.sparsify(thing, "2:4")


def test_an_all_false_mask_is_refused():
    model = two_layers()
    with pytest.raises(ValueError, match=r"0\.weight: the given mask keeps no weight at all"):
        nmsparse.sparsify(model, "2:4", "fixed",
                          masks={"0.weight": torch.zeros(16, 8, dtype=torch.bool)})
    assert not hasattr(model[0], "weight_mask")  # nothing changed


@pytest.mark.parametrize(("other", "words"), [
    (lambda: nmsparse.sparsify(two_layers(32), "2:4"), r"0\.weight has shape \[32, 8\]"),
    (lambda: nmsparse.sparsify(nn.Sequential(nn.Linear(8, 16)), "2:4"), "lacks weights"),
    (lambda: nmsparse.sparsify(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8), nn.ReLU(),
                                             nn.Linear(8, 4)), "2:4"), "does not have"),
    (lambda: nmsparse.sparsify(two_layers(), "2:4", "ste"), "method 'ste' there"),
    (lambda: nmsparse.sparsify(two_layers(), "4:8"), "pattern '4:8' there"),
])
def test_handle_refuses_the_state_of_another_model(other, words):
    handle = nmsparse.sparsify(two_layers(), "2:4")
    handle.steps = 7
    with pytest.raises(ValueError, match=f"state is of another model.*{words}"):
        handle.load_state_dict(other().state_dict())
    assert handle.steps == 7
    handle.load_state_dict(handle.state_dict())  # its own state still loads


def test_handle_state_saved_before_layers_were_recorded_still_loads():
    handle = nmsparse.sparsify(two_layers(), "2:4")
    old = {k: v for k, v in handle.state_dict().items() if k != "layers"}
    handle.load_state_dict(old)
    wider = {k: v for k, v in nmsparse.sparsify(nn.Sequential(nn.Linear(8, 16)),
                                                "2:4").state_dict().items() if k != "layers"}
    with pytest.raises(ValueError, match="lacks weights"):
        handle.load_state_dict(wider)


def test_model_load_state_dict_of_masks_breaking_the_pattern():
    two_four = two_layers()
    nmsparse.sparsify(two_four, "2:4")
    one_four = two_layers()
    nmsparse.sparsify(one_four, "1:4", "fixed")
    with pytest.raises(RuntimeError, match=r"0\.weight: the loaded mask '0\.weight_mask' "
                                           r"breaks pattern 1:4"):
        one_four.load_state_dict(two_four.state_dict())
    assert nmsparse.check(one_four, "1:4").ok  # its own masks were kept
    empty = {k: (torch.zeros_like(v) if k.endswith("_mask") else v)
             for k, v in one_four.state_dict().items()}
    with pytest.raises(RuntimeError, match="keeps no weight at all"):
        one_four.load_state_dict(empty)
    one_four.load_state_dict(one_four.state_dict())  # a fitting state loads


def test_packed_files_and_folders(tmp_path):
    model = two_layers()
    nmsparse.sparsify(model, "2:4")
    with pytest.raises(ValueError, match=r"it is a folder; give a file path"):
        save_packed(model, tmp_path, "2:4")
    with pytest.raises(PackedFormatError, match=r"is a folder, not a packed file"):
        load_packed(tmp_path)
    nmsparse.finalize(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'0\.weight' holds NaN or Inf"):
        save_packed(model, tmp_path / "m.safetensors", "2:4")
    assert list(tmp_path.iterdir()) == []
