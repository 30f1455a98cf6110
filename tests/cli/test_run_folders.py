"""Run and export folders: one process at a time, never someone else's files, no links
followed, interrupted writes cleaned up, permissions from the umask."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import QUICK

from nmsparse.app.cli.main import main
from nmsparse.app.train import run_dir


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = run_dir.claim(out, "run")  # as a running training holds it
    try:
        assert main(["train", "--out", str(out), *QUICK]) == 2
        assert "in use by another nmsparse process" in one_error_line(capsys)
        assert sorted(p.name for p in out.iterdir()) == [run_dir.MARKER]
    finally:
        holder.release()
    assert main(["train", "--out", str(out), *QUICK]) == 0  # free again


def holds(folder, process) -> bool:
    """Whether ``process`` has claimed ``folder`` (the marker names the holder's pid)."""
    try:
        return json.loads((folder / run_dir.MARKER).read_text())["pid"] == process.pid
    except (OSError, ValueError, KeyError):
        return False


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT (a suite started in the background by a
    # non-interactive shell, as CI may do), and Python then keeps ignoring it, as a
    # command started with nohup should. The test needs the interactive case.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_lock_signals_and_resume_hint_with_a_real_process(tmp_path, capsys):
    out = tmp_path / "run"
    # far more epochs than the test lasts: only the signal ends the run
    command = [sys.executable, "-m", "nmsparse", "train", "--out", str(out), "--epochs", "100000",
               "--no-plots", "--model-option", "hidden=[16]", "--threads", "1"]
    env = {**os.environ, "NMSPARSE_COMPILE": "0"}
    for signum, status, words in ((signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                  (signal.SIGINT, 130, "interrupted")):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, preexec_fn=_default_sigint)
        deadline = time.monotonic() + 120
        while not (holds(out, process) and (out / "latest.pt").exists()):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        assert (out / "latest.pt").exists() and process.poll() is None, process.stderr.read()
        # while it trains, nobody else may write into its folder
        assert main(["train", "--out", str(out), *QUICK]) == 2
        assert f"pid {process.pid}" in one_error_line(capsys)
        assert main(["train", "--resume", str(out)]) == 2
        assert "in use" in one_error_line(capsys)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        assert process.returncode == status, err
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"nmsparse train: {words}"), err
        assert f"nmsparse train --resume {out}" in lines[-1] and "Traceback" not in err
        if signum == signal.SIGTERM:  # then start again from scratch for the SIGINT round
            command = command[:4] + ["--resume", str(out), "--threads", "1"]


def test_foreign_folder_is_refused_and_untouched(tmp_path, trained_run, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own file")
    (mine / "notes.txt").write_text("keep")
    assert main(["train", "--out", str(mine), *QUICK]) == 2
    assert "files nmsparse did not write ('config.json', 'notes.txt')" in one_error_line(capsys)
    assert main(["export", str(trained_run), "--out", str(mine)]) == 2
    one_error_line(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == "my own file"
    # an export folder is reused by the next export; a run folder is not an export folder
    assert main(["export", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    assert main(["export", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    assert main(["export", str(trained_run), "--out", str(trained_run)]) == 2
    assert "not an export folder" in one_error_line(capsys)


def test_an_empty_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["train", "--out", str(out), *QUICK]) == 0


@pytest.mark.parametrize("link", ["metrics.jsonl", "latest.pt", "summary.json"])
def test_links_inside_a_run_folder_are_not_followed(link, trained_run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = trained_run / link
    target.unlink()
    target.symlink_to(victim)
    before = victim.read_text()
    for args in (["train", "--resume", str(trained_run)], ["eval", str(trained_run)]):
        status = main(args)
        if link == "latest.pt" or args[0] == "train":
            assert status == 2
            assert "symbolic link" in one_error_line(capsys)
    assert victim.read_text() == before and target.is_symlink()


def test_link_planted_during_a_run_is_replaced_not_followed(tmp_path):
    from nmsparse.app.train.metrics_log import MetricsLog

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        MetricsLog(tmp_path).write("step", 1, loss=1.0)  # O_NOFOLLOW: refused
    from nmsparse.atomic import atomic_open

    (tmp_path / "summary.json").symlink_to(victim)
    with atomic_open(tmp_path / "summary.json") as file:
        file.write("{}")
    assert victim.read_text() == "precious" and not (tmp_path / "summary.json").is_symlink()


def test_temp_files_of_an_interrupted_write_are_removed_on_resume(trained_run, capsys):
    stale = trained_run / ".latest.pt.x7k2abcd.tmp"
    stale.write_bytes(b"\0" * 1_000_000)  # what kill -9 during a checkpoint write leaves
    own = trained_run / "notes.tmp"  # not a temp-file name of nmsparse: left alone
    own.write_text("x")
    assert main(["train", "--resume", str(trained_run)]) == 0
    assert not stale.exists() and own.exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_created_files_honour_the_umask(umask, tmp_path, trained_run):
    previous = os.umask(umask)
    try:
        out = tmp_path / "fresh"
        assert main(["train", "--out", str(out), *QUICK]) == 0
        assert main(["export", str(trained_run), "--out", str(tmp_path / "e")]) == 0
        assert main(["export", str(trained_run), "--packed", "--out", str(tmp_path / "p")]) == 0
    finally:
        os.umask(previous)
    files = [*out.iterdir(), *(tmp_path / "e").iterdir(), *(tmp_path / "p").iterdir()]
    assert {p.name for p in files} >= {"latest.pt", "best.pt", "config.json", "metrics.jsonl",
                                       "summary.json", "model.safetensors",
                                       "model.packed.safetensors"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_run_written_before_markers_is_adopted(trained_run, capsys):
    (trained_run / run_dir.MARKER).unlink()
    assert main(["train", "--resume", str(trained_run)]) == 0
    assert (trained_run / run_dir.MARKER).is_file()


def test_failed_export_leaves_no_folder(trained_run, tmp_path, monkeypatch, capsys):
    """The export folder is made only to be written: a failure inside it removes it again
    (it once left an empty folder behind)."""
    from nmsparse.app.train import export

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_packed", failing)
    out = tmp_path / "packed"
    assert main(["export", str(trained_run), "--packed", "--out", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert not out.exists()
