"""The prune-and-grow, GaP and nested methods from the command line and from a recipe."""

import json

import pytest
import torch

from nmsparse.app.cli.main import main

FAST = ["--data", "digits", "--model", "mlp", "--model-option", "hidden=[16]", "--epochs", "1",
        "--limit-train-batches", "4", "--limit-test-batches", "2", "--batch-size", "8",
        "--no-plots"]


@pytest.mark.parametrize(("method", "pattern", "options"), [
    ("set", "unstructured:0.25", ["every=2", "fraction=0.5"]),
    ("rigl", "2:8", ["every=2", "stop=3"]),
    ("mest", "block:2x4:0.5", ["every=2", "soft=true", "settle=1"]),
    ("gap", "1:8", ["parts=2", "phase_steps=1"]),
    ("nested", "4:8", ["levels=1:8,2:8,4:8", "training=joint"]),
])
def test_method_from_the_command_line(method, pattern, options, tmp_path):
    args = ["train", *FAST, "--method", method, "--pattern", pattern,
            "--out", str(tmp_path / "run")]
    for option in options:
        args += ["--method-option", option]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == method and config["method_options"]
    payload = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert payload["config"]["method"] == method


def test_recipe_with_method_options(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "rigl"\npattern = "unstructured:0.2"\n'
                      "method_options = { every = 2, fraction = 0.4, grow = \"momentum\" }\n"
                      "model-options = { hidden = [16] }\nepochs = 1\nbatch_size = 8\n"
                      "limit_train_batches = 4\nplots = false\n")
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method_options"] == {"every": 2, "fraction": 0.4, "grow": "momentum"}


def test_bad_option_is_one_line(tmp_path, capsys):
    args = ["train", *FAST, "--method", "rigl", "--method-option", "grow=best",
            "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "grow must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
