"""The new methods and the transposable pattern from the command line and from recipe files."""

from __future__ import annotations

import json

import pytest

from nmsparse.app.cli.main import main

FAST = ["--epochs", "1", "--limit-train-batches", "3", "--limit-test-batches", "1",
        "--batch-size", "8", "--no-plots", "--model-option", "hidden=[16]"]

CASES = {
    "decaying": ["--method", "decaying", "--method-option", "steps=2",
                 "--method-option", "where=gradients", "--method-option", "schedule=cosine"],
    "gradual": ["--method", "gradual", "--method-option", "counts=[4]",
                "--method-option", "steps=2", "--method-option", 'inner_options={"decay": 1e-3}'],
    "step": ["--method", "step", "--optimizer", "adamw", "--lr", "1e-3",
             "--method-option", "switch_step=2"],
    "sste": ["--method", "sste"],
    "maskllm": ["--method", "maskllm", "--method-option", "steps=3",
                "--method-option", "lr=0.01", "--method-option", "temperature_start=2"],
    "proxsparse": ["--method", "proxsparse", "--method-option", "lambda1=0.01",
                   "--method-option", "restore=false"],
    "transposable": ["--pattern", "transposable:2:4", "--exclude", "classifier"],
}


def summary_and_config(run):
    return (json.loads((run / "summary.json").read_text()),
            json.loads((run / "config.json").read_text()))


@pytest.mark.parametrize("case", list(CASES))
def test_train_from_the_command_line(case, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *FAST, *CASES[case], "--out", str(run)]) == 0
    result, config = summary_and_config(run)
    assert result["steps"] == 3 and result["params_kept"] < result["params_dense"]
    if case == "transposable":
        assert config["pattern"] == "transposable:2:4"
    else:
        assert config["method"] == case


def test_method_options_from_a_recipe_file(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "gradual"\npattern = "1:4"\nepochs = 1\nbatch_size = 8\n'
                      "limit_train_batches = 2\nplots = false\nmodel_options = { hidden = [16] }\n"
                      "[method_options]\nsteps = 2\ncounts = [4, 2]\ninner = \"decaying\"\n"
                      "inner_options = { steps = 2, where = \"weights\" }\n")
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    _, config = summary_and_config(run)
    assert config["method_options"] == {"steps": 2, "counts": [4, 2], "inner": "decaying",
                                        "inner_options": {"steps": 2, "where": "weights"}}


@pytest.mark.parametrize("args, message", [
    (["--method", "step"], "--method step does not work with --optimizer sgd; use "
                           "--optimizer adamw"),
    (["--method", "decaying", "--method-option", "where=both"], "where must be one of"),
    (["--method", "gradual", "--method-option", "inner=fixed"], "inner must be one of"),
    (["--pattern", "transposable:4:2"], "invalid pattern 'transposable:4:2'"),
    (["--method", "maskllm", "--pattern", "8:16"], "refused above 1000"),
    (["--method", "maskllm", "--method-option", "logit_dtype=int8"],
     "logit_dtype must be one of"),
])
def test_bad_choices_are_one_line_errors_and_write_nothing(args, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *FAST, *args, "--out", str(run)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not run.exists()


def test_maskllm_from_a_recipe_file(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "maskllm"\npattern = "4:8"\nepochs = 1\nbatch_size = 8\n'
                      "limit_train_batches = 2\nplots = false\nmodel_options = { hidden = [16] }\n"
                      "[method_options]\nsteps = 2\nscale_end = 300.0\nweight_reg = 0.0\n")
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    result, config = summary_and_config(run)
    assert config["method_options"] == {"steps": 2, "scale_end": 300.0, "weight_reg": 0.0}
    assert result["steps"] == 2
