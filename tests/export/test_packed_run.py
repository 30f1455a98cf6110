"""``export_run_packed``: a trained run, packed, loads into the plain architecture."""

import pytest
import torch

from nmsparse.app.cli.main import main
from nmsparse.app.models import create_model
from nmsparse.app.train.export import PACKED_NAME, export_run_packed
from nmsparse.export import load_packed, read_packed_header

FAST = ["--epochs", "1", "--limit-train-batches", "2", "--limit-test-batches", "2",
        "--batch-size", "8", "--log-every", "1", "--no-plots"]


def train(tmp_path, *extra):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "mlp", "--model-option",
                 "hidden=[16]", "--out", str(run), *FAST, *extra]) == 0
    return run


def test_packed_export_of_a_run_matches_the_dense_export(tmp_path):
    run = train(tmp_path)
    written, report = export_run_packed(run, tmp_path / "out")
    assert written == [tmp_path / "out" / PACKED_NAME] and report.packed_layers
    assert main(["export", str(run), "--out", str(tmp_path / "dense")]) == 0
    from safetensors.torch import load_file

    dense = load_file(tmp_path / "dense" / "model.safetensors")
    meta = read_packed_header(written[0])["metadata"]
    plain = create_model(meta["model"], input_shape=tuple(meta["input_shape"]),
                         num_classes=meta["num_classes"], **meta["model_options"])
    load_packed(written[0], plain)
    state = plain.state_dict()
    assert state.keys() == dense.keys()
    assert all(torch.equal(state[key], dense[key]) for key in dense)


def test_dense_run_has_nothing_to_pack(tmp_path):
    run = train(tmp_path, "--pattern", "dense")
    with pytest.raises(ValueError, match="trained dense"):
        export_run_packed(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
