"""No code runs because a file says so: a run or recipe naming a ``module:factory`` model is
rebuilt only when the user trusts that factory (--trust-model, trusted_models=, or the
NMSPARSE_TRUSTED_MODELS allow-list)."""

import json
import sys
import textwrap

import pytest
from conftest import QUICK, plant_model

from nmsparse.app.cli.main import main
from nmsparse.app.models.trust import TRUST_ENV, is_trusted
from nmsparse.app.train.trainer import load_trained

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


# -- train --init: trust is decided on the model of the merged configuration ------------------
PLANTS = {"os:system": {"command": "touch {evidence}"},
          " os : system ": {"command": "touch {evidence}"},
          "subprocess:getoutput": {"cmd": "touch {evidence}"}}


@pytest.mark.parametrize("trust_env", [None, "", "*", ".*", ",", " , .* * "])
@pytest.mark.parametrize("model", list(PLANTS))
def test_train_init_from_a_planted_run_runs_nothing(trained_run, tmp_path, capsys,
                                                    monkeypatch, model, trust_env):
    evidence = tmp_path / "pwned"
    options = {k: v.format(evidence=evidence) for k, v in PLANTS[model].items()}
    plant_model(trained_run, model, options)
    if trust_env is None:
        monkeypatch.delenv(TRUST_ENV, raising=False)
    else:
        monkeypatch.setenv(TRUST_ENV, trust_env)
    out = tmp_path / "new"
    assert main(["train", "--init", str(trained_run), "--out", str(out), *QUICK[:-2],
                 "--trust-model", "other.pkg:net"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-model" in err, err
    assert "--init" in err and repr(model) in err, err
    assert not evidence.exists() and not out.exists()


def test_train_init_of_a_user_factory_needs_trust(user_package, capsys):
    args = [a for a in QUICK if a not in ("--model-option", "hidden=[16]")]
    assert main(["train", "--model", user_package, "--out", "run", *args]) == 0
    capsys.readouterr()
    assert main(["train", "--init", "run", "--out", "again", *args]) == 2
    assert f"--trust-model {user_package}" in capsys.readouterr().err
    assert main(["train", "--init", "run", "--out", "again", "--trust-model", user_package,
                 *args]) == 0


# -- a package glob trusts what the package defines, not attribute chains out of it ---------
@pytest.fixture
def glob_package(tmp_path, monkeypatch):
    """``mypkg`` on the path: ``mypkg.mod`` imports os and re-exports os.system."""
    package = tmp_path / "lib" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from .mod import Nets\n")
    (package / "mod.py").write_text(textwrap.dedent("""
        import os
        from os import system
        from torch import nn

        class Nets:
            @staticmethod
            def build(input_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    yield
    for name in ("mypkg", "mypkg.mod"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", ["mypkg.mod:os.system", "mypkg.mod:system",
                                  "mypkg.mod : os . system", "mypkg.mod:Nets.__init__",
                                  "mypkg.mod:os.path.join"])
def test_glob_refuses_attribute_chains_leaving_the_package(glob_package, name):
    from nmsparse.app.models.trust import require_trusted

    with pytest.raises(ValueError, match=r"outside the trusted package 'mypkg\.\*'|'__'"):
        require_trusted(name, ["mypkg.*"], "the run")
    require_trusted(name, ["mypkg.*", "".join(name.split())], "the run")  # exact trust


@pytest.mark.parametrize("name", ["mypkg.mod:Nets.build", "mypkg:Nets.build",
                                  " mypkg.mod : Nets . build "])
def test_glob_trusts_what_the_package_defines(glob_package, name):
    from nmsparse.app.models.trust import require_trusted

    require_trusted(name, ["mypkg.*"], "the run")
    require_trusted(name, ["other.*", "mypkg.*"], "the run")


@pytest.mark.parametrize(("glob", "name", "commands"), [
    ("mypkg.*", "mypkg.mod:os.system", ("eval", "summary", "export")),
    ("nmsparse.*", "nmsparse.app.models.trust:os.system", ("eval", "summary", "export")),
])
def test_trusted_glob_runs_no_planted_chain(glob_package, planted, tmp_path, capsys,
                                            monkeypatch, glob, name, commands):
    run, evidence = planted
    plant_model(run, name, {"command": f"touch {evidence}"})
    monkeypatch.setenv(TRUST_ENV, glob)
    for command in commands:
        extra = ["--out", str(tmp_path / "export")] if command == "export" else []
        assert main([command, str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "outside the trusted package" in err, err
        assert not evidence.exists()


# -- a factory typed on the command line: only its own package comes from the current folder -
def test_typed_factory_does_not_put_the_current_folder_on_the_path(user_package, tmp_path,
                                                                   capsys):
    import importlib.util

    evidence = tmp_path / "pwned"
    for stray in ("tensorboard", "yaml", "triton", "safetensors"):
        (tmp_path / f"{stray}.py").write_text(f"open({str(evidence)!r}, 'a').write('x')\n")
    installed = {n: importlib.util.find_spec(n) for n in ("yaml", "triton", "safetensors")}
    args = [a for a in QUICK if a not in ("--model-option", "hidden=[16]")]
    assert main(["train", "--model", user_package, "--out", "run", "--tensorboard",
                 *args]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
    assert main(["train", "--model", user_package, "--out", "run", *args]) == 0
    assert not evidence.exists()
    assert importlib.util.find_spec("tensorboard") is None
    for name, spec in installed.items():  # still what is installed (or nothing)
        found = importlib.util.find_spec(name)
        assert (found and found.origin) == (spec and spec.origin), name
