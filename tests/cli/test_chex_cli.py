"""``nmsparse train --chex-budget``: CHEX during a dense run, the exported slim model's size in
summary.json and the checkpoint, and one-line errors for unusable settings."""

import json

import torch

from nmsparse.app.cli.main import main

FAST = ["--epochs", "2", "--limit-train-batches", "4", "--limit-test-batches", "2",
        "--batch-size", "8", "--log-every", "1", "--no-plots", "--data", "digits",
        "--model", "mlp", "--model-option", "hidden=[16,16]", "--pattern", "dense"]


def test_chex_run_reports_the_slim_model(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--chex-budget", "0.5", "--chex-every", "2",
                 "--out", str(out)]) == 0
    result = json.loads((out / "summary.json").read_text())
    chex = result["chex"]
    assert sum(chex["widths"]) == 16 and chex["budget"] == 0.5
    # digits: 64 inputs, 10 classes; hidden 16-16 slimmed to the widths (with biases)
    a, b = chex["widths"]
    assert chex["params"] == 64 * a + a + a * b + b + b * 10 + 10
    assert chex["macs"] == 64 * a + a * b + b * 10
    assert chex["params"] < result["params_dense"]
    saved = torch.load(out / "latest.pt", weights_only=False)["model_methods"]  # the handle's
    assert saved["steps"] == 8  # 2 epochs of 4 steps, counted by the handle that runs CHEX
    state = saved["model_methods"]["chex"]
    assert state["step"] == 8
    assert [int(k.sum()) for k in state["keep"]] == chex["widths"]


def test_chex_settings_are_checked(tmp_path, capsys):
    for flags, words in ((["--chex-budget", "1.5"], "--chex-budget must be in (0, 1]"),
                         (["--chex-budget", "0.5", "--pattern", "2:4"], "needs --pattern dense"),
                         (["--chex-budget", "0.5", "--chex-every", "0"], "--chex-every"),
                         (["--chex-budget", "0.5", "--chex-until", "2"], "--chex-until")):
        out = tmp_path / "bad"
        assert main(["train", *FAST, *flags, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert words in error and len(error.splitlines()) == 1
        assert not out.exists()


def test_resumed_chex_run_equals_the_straight_one(tmp_path):
    from resumed_run import straight_and_resumed

    from nmsparse.app.train.config import TrainConfig

    def config(out):
        return TrainConfig(pattern="dense", chex_budget=0.5, chex_every=2, chex_until=1.0,
                           epochs=3, batch_size=32, limit_train_batches=4,
                           limit_test_batches=2, model_options={"hidden": [16, 16]},
                           plots=False, out=str(out)).validate()

    a, b = straight_and_resumed(config, tmp_path)
    a_chex, b_chex = (run["model_methods"]["model_methods"]["chex"] for run in (a, b))
    assert a_chex["step"] == b_chex["step"] == 12
    for mask_a, mask_b in zip(a_chex["keep"], b_chex["keep"], strict=True):
        assert torch.equal(mask_a, mask_b)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
