"""The smaller rough edges: option merging, --version, --debug anywhere, the progress bar on
narrow terminals, plots of one point and of ASP's phases, start-up and speed notes, packed
files that would not be smaller."""

import io
import json
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import QUICK

from nmsparse.app.cli import _notes
from nmsparse.app.cli.main import main
from nmsparse.app.train import plots
from nmsparse.app.train.progress import Progress


def test_model_option_changes_one_key_of_the_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("model_options = { hidden = [16], dropout = 0.25 }\nepochs = 1\n"
                      "limit_train_batches = 1\nbatch_size = 8\nplots = false\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--model-option", "dropout=0.5",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_options"] == {"hidden": [16], "dropout": 0.5}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "nmsparse 0.1.0"


def test_debug_after_the_command_shows_the_traceback():
    # (--debug before the command: tests/cli/test_cli.py)
    result = subprocess.run([sys.executable, "-m", "nmsparse", "train", "--model", "nope",
                             "--debug"], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" in result.stderr


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("width", [30, 60, 100])
def test_progress_bar_fits_a_narrow_terminal(width):
    stream = FakeTerminal()
    bar = Progress(50, "epoch 1/30", stream=stream, width=width)
    for done in range(1, 51):
        bar.update(done, done * 64, loss=1.2345, acc=0.5)
    assert "\n" not in stream.getvalue()  # one line, rewritten in place
    updates = stream.getvalue().split("\r")[1:]
    assert len(updates) == 50 and all(len(u) == width - 1 for u in updates)
    bar.close()
    assert stream.getvalue().endswith("\n")


def test_plain_progress_goes_to_stdout(capsys):
    bar = Progress(8, "epoch 1/1")
    for done in range(1, 9):
        bar.update(done, done)
    captured = capsys.readouterr()
    assert "epoch 1/1 8/8" in captured.out and captured.err == ""


@pytest.fixture
def figures(monkeypatch):
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figures to look at
    yield kept
    monkeypatch.undo()
    plt.close("all")


def test_one_logged_point_is_drawn_and_asp_phases_are_marked(tmp_path, figures):
    records = [{"kind": "step", "step": 1, "loss": 2.0},
               {"kind": "epoch", "step": 1, "phase": "dense", "test_loss": 2.0,
                "train_acc": 0.1, "test_acc": 0.1},
               {"kind": "epoch", "step": 2, "phase": "retrain", "test_loss": 1.0,
                "train_acc": 0.2, "test_acc": 0.2}]
    history = {"step": [2], "epoch": [2], "sad_prev/fc.weight": [0],
               "sad_init/fc.weight": [3]}
    written = plots.plot_run(tmp_path, records, history, {"fc": 0.5})
    assert [p.name for p in written] == ["curves.png", "sad.png", "density.png"]
    curves, sad = figures[0], figures[1]
    for line in sad.axes[0].get_lines() + sad.axes[1].get_lines():
        if len(line.get_xdata()) == 1 and line.get_linestyle() != "--":
            assert line.get_marker() not in (None, "None", ""), "one point, no marker"
    step_loss = curves.axes[0].get_lines()[0]
    assert step_loss.get_marker() not in (None, "None", "")
    # the dashed phase boundary at the last dense step, on both curve panels
    for ax in curves.axes:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [1, 1]
    assert any("retrain" in text.get_text() for text in curves.axes[0].texts)


def test_missing_matplotlib_is_a_note_not_a_failure(tmp_path, monkeypatch, capsys):
    def unavailable():
        raise plots.PlotsUnavailable("matplotlib is not installed")

    monkeypatch.setattr(plots, "_pyplot", unavailable)
    args = [a for a in QUICK if a != "--no-plots"]
    assert main(["train", "--out", str(tmp_path / "run"), *args]) == 0
    out = capsys.readouterr().out
    assert "note: no plots: matplotlib is not installed" in out
    assert "final test accuracy" in out and (tmp_path / "run" / "summary.json").is_file()


def test_startup_message_comes_first(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *QUICK]) == 0
    assert capsys.readouterr().out.startswith("nmsparse train: setting up")


def test_busy_machine_and_cpu_amp_notes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    note = _notes.busy_machine_note(False, cores=2, load=3.1)
    assert note and "--threads 1" in note and "load 3.1 on 2 cores" in note
    assert _notes.busy_machine_note(False, cores=2, load=0.4) is None
    assert _notes.busy_machine_note(True, cores=2, load=9.0) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _notes.busy_machine_note(False, cores=2, load=9.0) is None
    assert "--amp bf16 on the CPU" in _notes.cpu_amp_note("cpu", "bf16")
    assert _notes.cpu_amp_note("cuda", "bf16") is None
    assert _notes.cpu_amp_note("cpu", "none") is None


def test_cpu_amp_note_and_threads_flag(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(tmp_path / "run"), "--amp", "bf16", "--threads",
                     "1", *QUICK]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "note: --amp bf16 on the CPU" in capsys.readouterr().err


def test_packed_export_that_is_not_smaller_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--pattern", "63:64", *QUICK]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--packed", "--out", str(tmp_path / "p")]) == 0
    assert "note: packed is not smaller than dense" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "d")]) == 0  # dense works


def test_wide_group_exports_dense(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--pattern", "1:512", "--exclude", "features.1",
                 *QUICK[:-2], "--model-option", "hidden=[512]"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "d")]) == 0
    info = json.loads((tmp_path / "d" / "model.json").read_text())
    assert info["pattern"] == "1:512" and info["all_layers_nm"]
