"""The command line: a short run per data set and model family, recipes, every bad-input
case (exit status 2, one line, nothing written), eval / summary / export."""

import json
import subprocess
import sys

import pytest
from data_fixtures import write_cifar10, write_cifar100, write_fashion, write_folder

from nmsparse.app.cli.main import build_parser, main
from nmsparse.app.models import create_model

FAST = ["--epochs", "1", "--limit-train-batches", "2", "--limit-test-batches", "2",
        "--batch-size", "8", "--log-every", "1", "--no-plots"]


def text_corpus(root):
    root.mkdir()
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return root


CASES = {
    "digits-mlp": ("digits", None, "mlp", ["hidden=[16]"]),
    "fashion-resnet20": ("fashion-mnist", write_fashion, "resnet20", ["width=0.25"]),
    "cifar10-vit": ("cifar10", write_cifar10, "vit_tiny", ["dim=16", "depth=1", "heads=2"]),
    "cifar100-resnet18": ("cifar100", write_cifar100, "resnet18", ["width=0.125"]),
    "imagefolder-mlp": ("imagefolder", write_folder, "mlp", ["hidden=[16]"]),
    "text-gpt": ("text", text_corpus, "gpt_tiny", ["n_layer=1", "n_head=2", "d_model=16"]),
}


def train_args(case, tmp_path):
    data, writer, model, options = CASES[case]
    args = ["train", "--data", data, "--model", model, "--out", str(tmp_path / "run"), *FAST]
    for option in options:
        args += ["--model-option", option]
    if writer is text_corpus:
        args += ["--text-file", str(writer(tmp_path / "corpus")), "--seq-len", "16"]
    elif writer is not None:
        writer(tmp_path / "data")
        args += ["--data-dir", str(tmp_path / "data")]
    return args


@pytest.mark.parametrize("case", list(CASES))
def test_short_run_per_dataset_and_model_family(case, tmp_path, capsys):
    assert main(train_args(case, tmp_path)) == 0
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "latest.pt", "best.pt", "summary.json",
                 "sad.csv", "sad_epochs.csv"):
        assert (run / name).is_file(), name
    result = json.loads((run / "summary.json").read_text())
    steps = result["steps"]
    assert steps in (1, 2) and 0 <= result["test_acc"] <= 1  # tiny fixtures: 1 batch or 2
    assert result["params_kept"] < result["params_dense"]
    if case == "text-gpt":
        assert result["test_bpb"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["step"] * steps + ["epoch", "final"]
    assert any(key.startswith("sad_prev/") for key in records[steps])
    assert "final test" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["dense", "ste", "fixed", "asp"])
def test_methods(method, tmp_path):
    args = train_args("digits-mlp", tmp_path)
    args += ["--pattern", "dense"] if method == "dense" else ["--method", method]
    assert main(args) == 0
    result = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result["epochs"] == (2 if method == "asp" else 1)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records if r["kind"] == "epoch"]
    assert phases == (["dense", "retrain"] if method == "asp" else [method])
    if method == "dense":
        assert result["params_kept"] == result["params_dense"]


def test_plots_and_outputs_of_default_data(tmp_path):
    args = [a for a in train_args("digits-mlp", tmp_path) if a != "--no-plots"]
    assert main(args) == 0
    for name in ("curves.png", "sad.png", "density.png"):
        assert (tmp_path / "run" / name).stat().st_size > 1000


def test_recipe_files_and_flag_precedence(tmp_path):
    toml = tmp_path / "recipe.toml"
    toml.write_text('pattern = "1:4"\nlr = 0.05\nexclude = ["classifier"]\n'
                    'model-options = { hidden = [16] }\nepochs = 1\nbatch_size = 8\n'
                    "limit_train_batches = 1\nplots = false\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(toml), "--lr", "0.02", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["pattern"], config["lr"], config["exclude"]) == ("1:4", 0.02, ["classifier"])
    assert config["model_options"] == {"hidden": [16]}
    yaml = tmp_path / "recipe.yaml"
    yaml.write_text("method: ste\nepochs: 1\nbatch-size: 8\nlimit-train-batches: 1\n"
                    "plots: false\nmodel_options:\n  hidden: [16]\n")
    assert main(["train", "--recipe", str(yaml), "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["method"] == "ste"


def bad_recipe(folder, text, suffix=".toml"):
    folder.mkdir()
    path = folder / f"bad{suffix}"
    path.write_text(text)
    return ["--recipe", str(path)]


BAD = {
    "missing data files": (lambda p: ["--data", "fashion-mnist", "--data-dir",
                                      str(p.mkdir() or p)], "expected"),
    "unknown model": (lambda p: ["--model", "nope"], "unknown model 'nope'"),
    "unknown data": (lambda p: ["--data", "nope"], "nope"),
    "unparsable pattern": (lambda p: ["--pattern", "2/4"], "accepted"),
    "pattern no layer takes": (lambda p: ["--pattern", "1:512"], "no layer of the model"),
    "unknown recipe key": (lambda p: bad_recipe(p, "lrr = 0.1\n"), "unknown key 'lrr'"),
    "wrong recipe type": (lambda p: bad_recipe(p, 'epochs = "ten"\n'), "expected an integer"),
    "broken recipe": (lambda p: bad_recipe(p, "epochs: [\n", ".yaml"), "does not parse"),
    "resume of an empty folder": (lambda p: ["--resume", str(p.mkdir() or p)], "holds no run"),
    "bad option": (lambda p: ["--model-option", "hiddn=3"], "hiddn"),
    "negative epochs": (lambda p: ["--epochs", "0"], "--epochs must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    make_args, message = BAD[case]
    out = tmp_path / "run"
    case_args = make_args(tmp_path / "input")
    args = ["train", *case_args]
    if "--resume" not in case_args:  # a resumed run takes its settings from the run
        args = ["train", *FAST, *case_args, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmsparse train: error:") and message in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_corrupted_data_file_and_existing_run(tmp_path, capsys):
    files = write_fashion(tmp_path / "data")
    path = files["train_images"]
    path.write_bytes(path.read_bytes()[:100])
    args = ["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), *FAST]
    assert main(args) == 2 and not (tmp_path / "run").exists()
    assert "train-images" in capsys.readouterr().err
    assert main(train_args("digits-mlp", tmp_path)) == 0
    capsys.readouterr()
    assert main(train_args("digits-mlp", tmp_path)) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_process_exit_status_and_debug_traceback(tmp_path):
    command = [sys.executable, "-m", "nmsparse", "train", "--model", "nope",
               "--out", str(tmp_path / "run")]
    quiet = subprocess.run(command, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True,
                          text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_eval_summary_export(tmp_path, capsys):
    args = train_args("digits-mlp", tmp_path)
    del args[args.index("--limit-test-batches"):args.index("--limit-test-batches") + 2]
    assert main(args) == 0  # the whole test split, as eval uses
    run = tmp_path / "run"
    expected = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_acc"] == pytest.approx(expected["test_acc"])
    assert main(["eval", str(run / "best.pt")]) == 0
    capsys.readouterr()
    assert main(["summary", str(run)]) == 0
    assert "TOTAL" in capsys.readouterr().out
    assert main(["summary", "--model", "resnet20", "--data", "digits", "--pattern", "2:4"]) == 2
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert info["all_layers_nm"] and info["pattern"] == "2:4"
    assert {layer["status"] for layer in info["layers"]} == {"ok"}
    from safetensors.torch import load_file

    state = load_file(tmp_path / "export" / "model.safetensors")
    plain = create_model("mlp", input_shape=(64,), num_classes=10, hidden=[16])
    plain.load_state_dict(state)  # original keys, no masks: loads into the plain model
    first = plain.features[1].weight if hasattr(plain, "features") else None
    if first is not None:
        assert (first.reshape(first.shape[0], -1, 4) != 0).sum(-1).le(2).all()
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_listing_commands(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "resnet20" in listing and "gpt_tiny" in listing
    assert main(["datasets"]) == 0
    assert "fashion-mnist" in capsys.readouterr().out


def test_the_bench_tombstone_is_gone(capsys):
    # the kernel benchmark runs from a source checkout (python -m benchmarks.kernels)
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--quick"])
    assert stopped.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    assert "bench" not in build_parser().format_help()
