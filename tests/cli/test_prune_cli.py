"""``nmsparse prune RUN`` and recovery with ``nmsparse train --init``."""

import json

import pytest
import torch

from nmsparse.app.cli.main import main
from nmsparse.app.train import checkpoint
from nmsparse.patterns import parse_pattern

FAST = ["--epochs", "1", "--limit-train-batches", "2", "--limit-test-batches", "2",
        "--batch-size", "8", "--log-every", "1", "--no-plots"]


def train_tiny_gpt(folder, name: str, text: str, layers: int, pattern: str):
    """A short `nmsparse train` run of a tiny byte GPT on ``text``; returns its folder."""
    corpus = folder / "corpus.txt"
    corpus.write_text(text * 300)
    run = folder / name
    assert main(["train", "--data", "text", "--text-file", str(corpus), "--seq-len", "16",
                 "--model", "gpt_tiny", "--model-option", f"n_layer={layers}",
                 "--model-option", "n_head=2", "--model-option", "d_model=16",
                 "--pattern", pattern, "--out", str(run), *FAST]) == 0
    return run


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    return train_tiny_gpt(tmp_path_factory.mktemp("dense"), "dense",
                          "def add(a, b):\n    return a + b\n", 2, "dense")


def _masks(run):
    state = checkpoint.load(run)["model"]
    return {k: v for k, v in state.items() if k.endswith("_mask")}


@pytest.mark.parametrize(("method", "pattern"), [("sparsegpt", "2:4"), ("wanda", "4:8"),
                                                 ("magnitude", "unstructured:0.5")])
def test_prune_writes_a_run_that_eval_reads(dense_run, tmp_path, capsys, method, pattern):
    out = tmp_path / "pruned"
    assert main(["prune", str(dense_run), "--method", method, "--pattern", pattern,
                 "--calibration", "12", "--calibration-batch-size", "5",
                 "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["method"] == method and report["calibration_samples"] == 12
    assert report["after"]["test_bpb"] > 0
    masks = _masks(out)
    assert len(masks) == 9  # 4 Linear per block, 2 blocks, and the head
    assert all(parse_pattern(pattern).violations(m).ok for m in masks.values())
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_bpb"] == pytest.approx(report["after"]["test_bpb"], rel=1e-5)


@pytest.mark.parametrize("then", ["fixed", "srste"])
def test_train_init_recovers_from_the_pruned_run(dense_run, tmp_path, then):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense_run), "--pattern", "2:4", "--calibration", "8",
                 "--out", str(pruned)]) == 0
    one_shot = _masks(pruned)
    recovered = tmp_path / "recovered"
    assert main(["train", "--init", str(pruned), "--method", then, "--out", str(recovered),
                 *FAST]) == 0
    config = json.loads((recovered / "config.json").read_text())
    assert config["model_options"] == {"n_layer": 2, "n_head": 2, "d_model": 16}
    assert config["pattern"] == "2:4" and config["init"] == str(pruned)
    after = _masks(recovered)
    assert set(after) == set(one_shot)
    if then == "fixed":  # the one-shot mask is held
        assert all(torch.equal(after[k], one_shot[k]) for k in one_shot)


def test_train_init_loads_the_weights_before_sparsify(dense_run, tmp_path):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense_run), "--method", "magnitude", "--out", str(pruned)]) == 0
    from nmsparse.app.train.init import load_init
    from nmsparse.app.train.trainer import build, from_dict

    config = from_dict(checkpoint.load(pruned)["config"])
    _, model = build(config)
    masks = load_init(model, pruned)
    state = checkpoint.load(pruned)["model"]
    for name, mask in masks.items():
        assert torch.equal(model.state_dict()[name], state[name] * mask)


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "obs"], "invalid choice"),
    (["--pattern", "5:4"], "invalid N:M"),
    (["--calibration", "0"], "--calibration"),
    (["--option", "blocksize=0"], "blocksize"),
])
def test_prune_bad_input_is_one_line_and_writes_nothing(dense_run, tmp_path, capsys, extra,
                                                         message):
    out = tmp_path / "pruned"
    with pytest.raises(SystemExit) if message == "invalid choice" else _no_raise():
        code = main(["prune", str(dense_run), "--out", str(out), *extra])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_prune_refuses_an_out_folder_holding_a_run(dense_run, capsys):
    assert main(["prune", str(dense_run), "--out", str(dense_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_train_init_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["train", "--init", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "r"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_prune_a_sparse_run_bakes_its_masks_in_first(tmp_path):
    sparse = train_tiny_gpt(tmp_path, "sparse", "for i in range(10):\n    print(i)\n", 1,
                            "2:4")
    out = tmp_path / "pruned"
    assert main(["prune", str(sparse), "--method", "wanda", "--pattern", "1:4",
                 "--calibration", "8", "--out", str(out)]) == 0
    masks = _masks(out)
    assert masks and all(parse_pattern("1:4").violations(m).ok for m in masks.values())
    assert json.loads((out / "config.json").read_text())["pattern"] == "1:4"


def test_prune_permute_reports_kept_magnitude_and_keeps_the_dense_function(dense_run,
                                                                            tmp_path):
    out = tmp_path / "permuted"
    assert main(["prune", str(dense_run), "--method", "magnitude", "--pattern", "2:4",
                 "--calibration", "4", "--permute", "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    permutation = report["permutation"]
    assert permutation["groups"] >= 1
    assert permutation["kept_after"] >= permutation["kept_before"] > 0
    assert all(parse_pattern("2:4").violations(m).ok for m in _masks(out).values())


# -- --out goes through the run-folder gate of train and export (run_dir.claim) --------------
QUICK_PRUNE = ["--method", "magnitude", "--calibration", "4", "--limit-test-batches", "1"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_prune_does_not_write_through_a_planted_link(dense_run, tmp_path, capsys):
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "prune.json").symlink_to(outside)
    assert main(["prune", str(dense_run), "--out", str(out), *QUICK_PRUNE]) == 2
    assert "symbolic link" in _one_line(capsys)
    assert outside.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "prune.json"]


def test_prune_refuses_a_folder_of_user_files(dense_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.json", "prune.json"):
        (out / name).write_text("user data")
    assert main(["prune", str(dense_run), "--out", str(out), *QUICK_PRUNE]) == 2
    assert "files nmsparse did not write" in _one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "prune.json"]
    assert all((out / n).read_text() == "user data" for n in ("config.json", "prune.json"))


@pytest.mark.parametrize("command", ["prune", "train", "export"])
def test_empty_out_is_refused(dense_run, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    args = {"prune": ["prune", str(dense_run), "--out", "", *QUICK_PRUNE],
            "train": ["train", "--out", "", *FAST],
            "export": ["export", str(dense_run), "--out", ""]}[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    assert "--out is empty" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_prune_into_a_folder_in_use_or_an_export_folder_is_refused(dense_run, tmp_path,
                                                                    capsys):
    from nmsparse.app.train import run_dir

    out = tmp_path / "busy"
    holder = run_dir.claim(out, "run")  # another prune (or train) writing there
    try:
        assert main(["prune", str(dense_run), "--out", str(out), *QUICK_PRUNE]) == 2
        assert "in use by another nmsparse process" in _one_line(capsys)
    finally:
        holder.release()
    exported = tmp_path / "exported"
    assert main(["export", str(dense_run), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["prune", str(dense_run), "--out", str(exported), *QUICK_PRUNE]) == 2
    assert "export folder" in _one_line(capsys)
    assert not (exported / "latest.pt").exists()


class _FullDisk:
    """Atomic writes whose ``write`` fails like a full disk from the ``fail_at``-th file on."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.opened = fail_at, 0

    def __call__(self, fd, mode, **kwargs):
        import errno
        import os

        self.opened += 1
        file = os.fdopen(fd, mode, **kwargs)
        if self.opened >= self.fail_at:
            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            file.write = write
        return file


@pytest.mark.parametrize(("fail_at", "name"), [(1, "config.json"), (2, "prune.json"),
                                               (3, "latest.pt")])
@pytest.mark.parametrize("existing", [False, True])
def test_prune_on_a_full_disk_leaves_nothing_half_written(dense_run, tmp_path, capsys,
                                                          monkeypatch, fail_at, name,
                                                          existing):
    from nmsparse import atomic

    out = tmp_path / "pruned"
    if existing:
        out.mkdir()
    monkeypatch.setattr(atomic, "_open_temp", _FullDisk(fail_at))
    assert main(["prune", str(dense_run), "--out", str(out), *QUICK_PRUNE]) == 2
    err = _one_line(capsys)
    assert "No space left on device" in err and str(out / name) in err, err
    # nothing but (for a folder that existed) the marker claiming it
    assert sorted(p.name for p in out.iterdir()) == [".nmsparse"] if existing else (
        not out.exists())
    monkeypatch.undo()
    assert main(["prune", str(dense_run), "--out", str(out), *QUICK_PRUNE]) == 0


def test_prune_says_what_it_does_while_it_works(dense_run, tmp_path, capsys):
    assert main(["prune", str(dense_run), "--out", str(tmp_path / "p"), "--calibration",
                 "4", "--limit-test-batches", "1"]) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("[")]
    assert any("evaluating the model before pruning" in line for line in steps), out
    assert sum("pruned block" in line for line in steps) == 2, out  # one line per block
    assert all(line.split("]")[0].strip("[ ").endswith("s") for line in steps)
