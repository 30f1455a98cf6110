"""A run is not tied to its data path: resume and eval take the data's new place, export and
summary need no data at all (the run records input shape, classes and task)."""

import json
import shutil

import torch
from conftest import QUICK
from data_fixtures import write_fashion

from nmsparse.app.cli.main import main
from nmsparse.app.train.trainer import DataInfo, load_trained


def fashion_run(tmp_path, epochs="1"):
    write_fashion(tmp_path / "data")
    out = tmp_path / "run"
    args = QUICK[2:]  # all but --epochs 1
    assert main(["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out), "--epochs", epochs, *args]) == 0
    return out


def test_moved_data_resume_and_eval_with_data_dir(tmp_path, capsys):
    run = fashion_run(tmp_path, epochs="2")
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "data", moved)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--data-dir", str(moved)]) == 0
    assert json.loads((run / "config.json").read_text())["data_dir"] == str(moved)
    assert torch.load(run / "latest.pt", weights_only=True)["epoch"] == 2
    capsys.readouterr()
    assert main(["eval", str(run), "--data-dir", str(moved)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["test_acc"] <= 1


def test_export_and_summary_need_no_data(tmp_path, capsys):
    run = fashion_run(tmp_path)
    shutil.rmtree(tmp_path / "data")  # the data set is gone entirely
    capsys.readouterr()
    assert main(["summary", str(run)]) == 0
    assert "TOTAL" in capsys.readouterr().out
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    info = json.loads((tmp_path / "e" / "model.json").read_text())
    assert info["input_shape"] == [1, 28, 28] and info["num_classes"] == 10
    assert main(["export", str(run), "--packed", "--out", str(tmp_path / "p")]) == 0
    config, data, model, _ = load_trained(run, with_data=False)
    assert data == DataInfo((1, 28, 28), 10, "classification", "float32")
    assert model(data.example()).shape == (1, 10)


def test_run_without_recorded_shape_uses_data_dir(tmp_path, capsys):
    """Checkpoints written before the data description existed still work, with data."""
    run = fashion_run(tmp_path)
    for name in ("latest.pt", "best.pt"):
        payload = torch.load(run / name, weights_only=True)
        del payload["data_info"]
        torch.save(payload, run / name)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "data", moved)
    capsys.readouterr()
    assert main(["summary", str(run)]) == 2
    assert "give --data-dir with its new place" in capsys.readouterr().err
    assert main(["summary", str(run), "--data-dir", str(moved)]) == 0
    assert main(["export", str(run), "--data-dir", str(moved), "--out", str(tmp_path / "e")]) == 0


def test_data_dir_not_needed_is_said(trained_run, capsys):
    assert main(["summary", str(trained_run), "--data-dir", "/nowhere"]) == 0
    assert "--data-dir not needed" in capsys.readouterr().err


def test_summary_of_a_fresh_model_without_data(capsys):
    assert main(["summary", "--model", "resnet20", "--input-shape", "3,32,32",
                 "--num-classes", "10", "--pattern", "2:4", "--exclude", "conv1", "fc"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "layer1" in out
