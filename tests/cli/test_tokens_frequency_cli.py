"""``nmsparse train`` with spvit_tiny and dct_resnet from flags and recipes: the model's
auxiliary loss joins the training loss, and the run's summary counts the pruned tokens."""

from __future__ import annotations

import json

import pytest
from data_fixtures import write_fashion

from nmsparse.app.cli.main import main
from nmsparse.app.models.spvit import TokenPruningViT

QUICK = ["--data", "fashion-mnist", "--epochs", "1", "--limit-train-batches", "2",
         "--limit-test-batches", "1", "--batch-size", "8", "--no-plots"]
VIT = ["dim=16", "depth=2", "heads=2"]


@pytest.fixture
def fashion(tmp_path):
    write_fashion(tmp_path / "fashion")
    return ["--data-dir", str(tmp_path / "fashion")]


def options(*pairs):
    return [arg for pair in pairs for arg in ("--model-option", pair)]


def macs(run):
    return json.loads((run / "summary.json").read_text())["macs_dense"]


def epoch_losses(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["train_loss"] for line in lines if "train_loss" in line]


def test_spvit_trains_from_flags_and_counts_fewer_macs(tmp_path, monkeypatch, fashion):
    plain, pruned = tmp_path / "plain", tmp_path / "pruned"
    assert main(["train", "--model", "vit_tiny", "--out", str(plain), *QUICK, *fashion,
                 *options(*VIT)]) == 0
    # a visible auxiliary term proves the trainer adds it to the loss it reports and trains
    monkeypatch.setattr(TokenPruningViT, "auxiliary_loss", lambda self: self.ratio_loss() + 1e3)
    assert main(["train", "--model", "spvit_tiny", "--out", str(pruned), *QUICK, *fashion,
                 *options(*VIT, "prune_at=[1]", "keep_ratio=0.5")]) == 0
    assert all(loss > 1e3 for loss in epoch_losses(pruned))
    assert all(loss < 1e3 for loss in epoch_losses(plain))
    assert macs(pruned) < macs(plain)


def test_dct_resnet_from_a_recipe(tmp_path, fashion):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "dct_resnet"\npattern = "2:4"\n'
                      'model-options = { block = 4, width = 0.25, gate_target = 0.5 }\n')
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(run), *QUICK, *fashion]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model_options"] == {"block": 4, "width": 0.25, "gate_target": 0.5}
