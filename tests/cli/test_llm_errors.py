"""Bad input to the Hugging Face folder commands: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from llm_folders import llm_folders  # noqa: F401  (the session fixture)

from nmsparse.app.cli.main import main

transformers = pytest.importorskip("transformers")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _prune(source, out, *extra):
    return main(["prune", str(source), "--out", str(out), "--calibration", "2",
                 "--seq-len", "16", *extra])


def test_remote_code_is_refused(llm_folders, tmp_path, capsys):  # noqa: F811
    source = tmp_path / "remote"
    shutil.copytree(llm_folders["llama"], source)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "modeling_evil.py").write_text("raise SystemExit('ran the folder code')\n")
    out = tmp_path / "out"
    assert _prune(source, out, "--method", "magnitude") == 2
    assert "auto_map" in _error(capsys) and not out.exists()
    assert main(["eval", str(source), "--text-file", str(llm_folders["text"])]) == 2
    assert "never runs code" in _error(capsys)


def test_a_folder_that_is_not_a_causal_lm(tmp_path, capsys):
    source = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        image_size=8, patch_size=4)).save_pretrained(source)
    capsys.readouterr()  # transformers' own progress bar
    out = tmp_path / "out"
    assert _prune(source, out, "--method", "magnitude") == 2
    assert "not load as a causal language model" in _error(capsys) and not out.exists()


def test_text_too_short_for_one_window(llm_folders, tmp_path, capsys):  # noqa: F811
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 40)  # 240 bytes: its held-out 10 % is 24 tokens
    out = tmp_path / "out"
    assert _prune(llm_folders["llama"], out, "--method", "magnitude", "--eval-text",
                  str(short), "--window", "32") == 2
    assert "fewer than one window of 32" in _error(capsys) and not out.exists()
    assert main(["eval", str(llm_folders["llama"]), "--text-file", str(short),
                 "--window", "32"]) == 2
    assert "fewer than one window" in _error(capsys)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x\n" * 20)  # 36 calibration tokens
    assert _prune(llm_folders["llama"], out, "--method", "wanda", "--text-file", str(tiny),
                  "--seq-len", "60") == 2
    assert "fewer than one window of --seq-len 60" in _error(capsys) and not out.exists()


def test_a_pattern_no_layer_takes_leaves_no_folder(llm_folders, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert _prune(llm_folders["llama"], out, "--method", "wanda", "--pattern", "2:7",
                  "--text-file", str(llm_folders["text"])) == 2
    assert "no layer of the model can be pruned to 2:7" in _error(capsys)
    assert not out.exists()


def test_calibrated_methods_need_text(llm_folders, tmp_path, capsys):  # noqa: F811
    assert _prune(llm_folders["gpt2"], tmp_path / "out", "--method", "sparsegpt") == 2
    assert "needs calibration text: give --text-file" in _error(capsys)


def test_model_folder_flags_are_refused_for_a_run(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--text-file",
                 "t.txt"]) == 2
    assert "only for Hugging Face model folders" in _error(capsys)


def test_generate_needs_a_pattern_for_a_folder_nmsparse_did_not_prune(
        llm_folders, capsys):  # noqa: F811
    assert main(["generate", str(llm_folders["llama"]), "--prompt", "x"]) == 2
    assert "has no prune.json saying its pattern" in _error(capsys)
