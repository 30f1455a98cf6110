"""Failures that used to be a traceback or a misleading line: each is now one line on stderr,
exit 2, saying what is wrong (issue 22)."""

import pickle
from collections import OrderedDict

import pytest
import torch
from conftest import QUICK

from nmsparse.app.cli.main import main


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_resume_of_a_checkpoint_with_wrong_weight_shapes(trained_run, capsys):
    payload = torch.load(trained_run / "latest.pt", weights_only=True)
    name = next(k for k, v in payload["model"].items() if v.dim() == 2)
    payload["model"][name] = torch.zeros(3, 5)
    torch.save(payload, trained_run / "latest.pt")
    for command in (["train", "--resume", str(trained_run), "--threads", "1"],
                    ["eval", str(trained_run)]):
        assert main(command) == 2
        err = one_line(capsys)
        assert "do not fit the model" in err and name in err, err


def test_resume_of_a_damaged_training_state(trained_run, capsys):
    payload = torch.load(trained_run / "latest.pt", weights_only=True)
    payload["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(payload, trained_run / "latest.pt")
    assert main(["train", "--resume", str(trained_run), "--threads", "1"]) == 2
    assert "saved training state does not fit" in one_line(capsys)


def test_a_model_too_large_for_memory(tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in QUICK if a not in ("--model-option", "hidden=[16]")]
    assert main(["train", "--out", str(out), *args, "--model-option",
                 "hidden=[1000000000000]"]) == 2
    err = one_line(capsys)
    assert "out of memory" in err and "--batch-size" in err, err
    assert not out.exists()


CHECKPOINTS = {
    "random bytes": (bytes(range(256)) * 16, "not a PyTorch checkpoint (neither the zip"),
    "a JSON file": (b'{"model": "mlp", "epochs": 3}\n', "a JSON or text file"),
    "a raw pickle": (pickle.dumps(OrderedDict(a=1), protocol=4), "never loads"),
}


@pytest.mark.parametrize("what", list(CHECKPOINTS))
def test_what_a_file_that_is_no_checkpoint_is(tmp_path, capsys, what):
    data, words = CHECKPOINTS[what]
    (tmp_path / "x.pt").write_bytes(data)
    with _no_warnings():
        assert main(["eval", str(tmp_path / "x.pt")]) == 2
    err = one_line(capsys)  # no torch UserWarning lines before it
    assert words in err, err
    if what != "a raw pickle":
        assert "Python objects" not in err


class _no_warnings:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [str(w.message) for w in self.seen], [str(w.message) for w in self.seen]
        return False


@pytest.mark.parametrize("seed", [2**70, -1, 2**63])
def test_an_out_of_range_seed_names_the_flag_and_the_range(tmp_path, capsys, seed):
    assert main(["train", "--out", str(tmp_path / "r"), "--seed", str(seed), *QUICK]) == 2
    err = one_line(capsys)
    assert "--seed" in err and "2**63 - 1" in err and str(seed) in err, err
    assert not (tmp_path / "r").exists()


def test_an_out_of_range_prune_seed(trained_run, tmp_path, capsys):
    assert main(["prune", str(trained_run), "--out", str(tmp_path / "p"), "--seed",
                 str(2**70)]) == 2
    assert "--seed" in one_line(capsys)


def test_a_binary_recipe_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(b"\x00\xff\xfe\x80 binary")
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "r")]) == 2
    err = one_line(capsys)
    assert str(recipe) in err and "not a text file" in err, err


@pytest.mark.parametrize("flag", ["--text-file", "--recipe"])
def test_a_device_is_not_a_file(tmp_path, capsys, flag):
    extra = ["--data", "text"] if flag == "--text-file" else []
    assert main(["train", *extra, flag, "/dev/zero", "--out", str(tmp_path / "r")]) == 2
    err = one_line(capsys)
    assert "/dev/zero" in err and "not a regular file" in err and "does not exist" not in err
