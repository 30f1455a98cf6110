"""``nmsparse prune RUN`` and recovery with ``nmsparse train --init``."""

import json

import pytest
import torch

from nmsparse.cli.main import main
from nmsparse.patterns import parse_pattern
from nmsparse.train import checkpoint

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
    from nmsparse.train.init import load_init
    from nmsparse.train.trainer import build, from_dict

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
