"""A small trained run, made once per session and copied for every test that needs one."""

import shutil

import pytest
import torch

from nmsparse.app.cli.main import main

QUICK = ["--epochs", "1", "--limit-train-batches", "2", "--limit-test-batches", "2",
         "--batch-size", "8", "--log-every", "1", "--no-plots", "--model-option",
         "hidden=[16]"]


@pytest.fixture(scope="session")
def _trained_once(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(out), *QUICK]) == 0
    return out


@pytest.fixture
def trained_run(_trained_once, tmp_path, capsys):
    """A fresh copy of a finished 2:4 SR-STE digits MLP run (1 epoch)."""
    run = tmp_path / "run"
    shutil.copytree(_trained_once, run, symlinks=True)
    capsys.readouterr()
    return run


def plant_model(run, model, options):
    """Make the run's checkpoints name another model (what a hostile file would do)."""
    for name in ("latest.pt", "best.pt"):
        payload = torch.load(run / name, weights_only=True)
        payload["config"]["model"] = model
        payload["config"]["model_options"] = options
        torch.save(payload, run / name)
