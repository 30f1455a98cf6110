"""No code runs because a file says so: a run or recipe naming a ``module:factory`` model is
rebuilt only when the user trusts that factory (--trust-model, trusted_models=, or the
NMSPARSE_TRUSTED_MODELS allow-list)."""

import json
import sys
import textwrap

import pytest
from conftest import QUICK, plant_model

from nmsparse.cli.main import main
from nmsparse.models.trust import TRUST_ENV, is_trusted
from nmsparse.train.trainer import load_trained

COMMANDS = {
    "eval": lambda run, tmp: ["eval", str(run)],
    "summary": lambda run, tmp: ["summary", str(run)],
    "export": lambda run, tmp: ["export", str(run), "--out", str(tmp / "export")],
    "export --packed": lambda run, tmp: ["export", str(run), "--packed", "--out",
                                         str(tmp / "export")],
    "train --resume": lambda run, tmp: ["train", "--resume", str(run)],
    "eval of best.pt": lambda run, tmp: ["eval", str(run / "best.pt")],
}


@pytest.fixture
def planted(trained_run, tmp_path, monkeypatch):
    """The run's checkpoints now say model "os:system" with a shell command as its option."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    evidence = tmp_path / "pwned"
    plant_model(trained_run, "os:system", {"command": f"touch {evidence}"})
    return trained_run, evidence


@pytest.mark.parametrize("command", list(COMMANDS))
def test_planted_os_system_checkpoint_runs_nothing(command, planted, tmp_path, capsys):
    run, evidence = planted
    before = sorted(p.name for p in run.iterdir())
    assert main(COMMANDS[command](run, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "'os:system'" in err and "--trust-model" in err, err
    assert not evidence.exists()  # the command never ran
    assert sorted(p.name for p in run.iterdir()) == before
    assert not (tmp_path / "export").exists()


def test_planted_checkpoint_refused_by_load_trained(planted):
    run, evidence = planted
    with pytest.raises(ValueError, match=r"names the model factory 'os:system'"):
        load_trained(run)
    with pytest.raises(ValueError, match=r"names the model factory 'os:system'"):
        load_trained(run, trusted_models=["mypkg:net", "os.path:*"])
    assert not evidence.exists()


def test_planted_recipe_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    evidence = tmp_path / "pwned"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "os:system"\nmodel_options = {{ command = "touch {evidence}" }}\n')
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "--trust-model" in capsys.readouterr().err
    assert not evidence.exists() and not (tmp_path / "run").exists()


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package ``mynets`` in the current folder (not installed, not on the path)."""
    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(input_shape, num_classes, hidden=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delenv(TRUST_ENV, raising=False)
    yield "mynets.nets:tiny"
    for name in ("mynets", "mynets.nets"):
        sys.modules.pop(name, None)


def test_user_factory_from_its_own_folder_and_trust_on_reload(user_package, tmp_path,
                                                              capsys, monkeypatch):
    args = [a for a in QUICK if a not in ("--model-option", "hidden=[16]")]
    # typed on the command line: trusted, found in the current folder like python -m does
    assert main(["train", "--model", user_package, "--out", "run", *args]) == 0
    capsys.readouterr()
    assert main(["eval", "run"]) == 2  # the run names it: not imported without trust
    assert "--trust-model mynets.nets:tiny" in capsys.readouterr().err
    assert main(["eval", "run", "--trust-model", user_package]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["test_acc"] <= 1
    monkeypatch.setenv(TRUST_ENV, "other:thing, mynets.*")
    assert main(["summary", "run"]) == 0
    assert main(["export", "run", "--out", "exported"]) == 0


def test_trust_rules():
    assert is_trusted("a.b:f", ["a.b:f"]) and is_trusted(" a.b : f ", ["a.b:f"])
    assert is_trusted("a.b:f", ["a.*"]) and is_trusted("a:f", ["a.*"])
    assert not is_trusted("ab:f", ["a.*"]) and not is_trusted("a.b:g", ["a.b:f"])
    assert not is_trusted("os:system", ["*"]) and not is_trusted("os:system", [".*"])
